"""The web app, measured: response times of both servers, time to the first frame and to the
last of a streamed generation, and a study under load from concurrent raters, killed with
SIGKILL part-way; then screenshots of both pages by the tests' headless Chromium.

    python benchmarks/web.py [--run runs/mnist_1d] [--sr-run runs/mnist_sr] [--raters 20]
                             [--screenshots docs]

The runs must exist (`make demo`; `imagetransformer train --preset mnist_sr --out
runs/mnist_sr`). Servers run in their own processes, as `imagetransformer serve` and
`imagetransformer study serve` do; every figure is wall time on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from random import Random

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import browser  # noqa: E402  (the tests' Chromium, for the screenshots)
from tests.webserver import ServerProcess  # noqa: E402


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _post(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _timed(call, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return times


def _row(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p95:.1f} |"


def stream_times(host: str, port: int, query: str) -> tuple[float, float, int]:
    """(ms to the first frame, ms to `done`, frames) of one generation."""
    connection = http.client.HTTPConnection(host, port, timeout=600)
    started = time.perf_counter()
    connection.request("GET", f"/api/stream?{query}")
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{query}: {response.status} {response.read()!r}")
    first, frames = None, 0
    for raw in response:
        line = raw.decode().strip()
        if line == "event: frame":
            frames += 1
            first = first or 1000 * (time.perf_counter() - started)
        if line in ("event: done", "event: error", "event: cancelled"):
            if line != "event: done":
                raise RuntimeError(f"{query}: {line}")
            break
    total = 1000 * (time.perf_counter() - started)
    connection.close()
    return first, total, frames


def playground(run: str, screenshots: Path | None, lines: list[str], repeats: int) -> None:
    with ServerProcess("serve", run) as server:
        host, port = server.host_port
        lines += ["| request | n | median ms | p95 ms |", "|---|---|---|---|"]
        for name, path in (
            ("playground `GET /`", ""),
            ("`GET /api/info`", "api/info"),
            ("`GET /api/test-image`", "api/test-image?index=0&page=complete"),
        ):
            lines.append(_row(name, _timed(lambda path=path: _get(server.url + path), repeats)))
        lines += ["", "| generation | first frame ms | all done ms | frames |", "|---|---|---|---|"]
        for query in ("page=sample&n=1", "page=sample&n=16", "page=complete&n=4&index=0&keep=0.5"):
            runs = [stream_times(host, port, query) for _ in range(3)]
            first, total, frames = zip(*runs, strict=True)
            lines.append(
                f"| `{query}` (median of 3) | {statistics.median(first):.0f} | "
                f"{statistics.median(total):.0f} | {frames[0]} |"
            )
        # two generations at once: each still streams (the second is not queued behind)
        results: list[tuple[float, float, int]] = []
        pair = [
            threading.Thread(
                target=lambda: results.append(stream_times(host, port, "page=sample&n=16"))
            )
            for _ in range(2)
        ]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join()
        for first, total, _ in results:
            lines.append(
                f"| `page=sample&n=16`, one of two at once | {first:.0f} | {total:.0f} | |"
            )
        if screenshots:
            with browser() as chromium:
                page = chromium.new_page(viewport={"width": 1000, "height": 900})
                page.goto(server.url)
                page.click("#page-sample button[type=submit]")
                _when_half_drawn(page.locator("#page-sample .status"))  # the picture as it grows
                page.screenshot(path=str(screenshots / "playground_page.png"), full_page=True)
                page.wait_for_selector("#page-sample [data-state=done]", timeout=120_000)
                page.click("#tab-complete")
                page.fill("#page-complete [name=index]", "7")
                page.click("#page-complete button[type=submit]")
                page.wait_for_selector("#page-complete [data-state=done]", timeout=120_000)
                path = screenshots / "playground_complete.png"
                page.screenshot(path=str(path), full_page=True)


def _when_half_drawn(status, timeout: float = 120.0) -> None:
    """Return once the status line reads "step S of T" with S at least T/2."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"step (\d+) of (\d+)", status.text_content() or "")
        if match and 2 * int(match.group(1)) >= int(match.group(2)):
            return
        time.sleep(0.01)
    raise RuntimeError("the generation did not reach half-way")


def upscale_screenshot(sr_run: str, screenshots: Path) -> None:
    """The playground of a super-resolution run, after upscaling a test digit."""
    with ServerProcess("serve", sr_run) as server, browser() as chromium:
        page = chromium.new_page(viewport={"width": 1000, "height": 900})
        page.goto(server.url)
        page.click("#tab-upscale")
        page.fill("#page-upscale [name=index]", "7")
        page.click("#page-upscale button[type=submit]")
        page.wait_for_selector("#page-upscale [data-state=done]", timeout=120_000)
        page.screenshot(path=str(screenshots / "playground_upscale.png"), full_page=True)


def study(
    sr_run: str, raters: int, screenshots: Path | None, lines: list[str], images: int, repeats: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "study")
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "imagetransformer", "study", "create", sr_run,
             "--images", str(images), "--temperatures", "0.8", "0.9", "1.0", "--out", folder],
            check=True, capture_output=True,
        )  # fmt: skip
        lines.append(
            f"`study create` of {images} images x 3 temperatures ({3 * images} samples and "
            f"{images} truths): {time.perf_counter() - started:.1f} s"
        )
        lines += ["", "| request | n | median ms | p95 ms |", "|---|---|---|---|"]
        with ServerProcess("study", "serve", folder) as server:
            lines.append(_row("study `GET /`", _timed(lambda: _get(server.url), repeats)))
            _, made = _post(server.url + "api/raters")
            shown = json.loads(_get(server.url + f"api/next?rater={made['rater']}"))
            image = server.url + shown["left"].lstrip("/")
            lines.append(_row("`GET /stimulus/TOKEN`", _timed(lambda: _get(image), repeats)))
            new_rater = lambda: _post(server.url + "api/raters")  # noqa: E731
            lines.append(_row("`POST /api/raters`", _timed(new_rater, repeats)))
            if screenshots:
                with browser() as chromium:
                    page = chromium.new_page(viewport={"width": 900, "height": 640})
                    page.goto(server.url)
                    page.click("#start")
                    page.wait_for_selector("#task:not([hidden])")
                    page.wait_for_selector("#left:enabled")
                    page.screenshot(path=str(screenshots / "study_page.png"))
            answers = load(server, folder, raters, kill_after=None)
            lines.append(_row(f"`POST /api/answer`, {raters} raters at once", answers["ms"]))
        lines.append("")
        lines.append(
            f"Load: {raters} raters at once, each answering all {images} of their pairs and "
            f"replaying 30% of them: {answers['acknowledged']} answers acknowledged in "
            f"{answers['seconds']:.1f} s ({answers['acknowledged'] / answers['seconds']:.0f}/s), "
            f"{answers['stored']} stored, {answers['lost']} lost, {answers['duplicated']} "
            f"duplicated, {answers['replays_refused']} of {answers['replays']} replays refused."
        )
        port = server.host_port[1]
        with ServerProcess("study", "serve", folder, port=port) as server:
            killed = load(server, folder, raters, kill_after=1.5)
        lines.append(
            f"SIGKILL under load: the server killed 1.5 s into a second run of {raters} raters: "
            f"{killed['acknowledged']} answers acknowledged before the kill, "
            f"{killed['lost']} of them missing after it; {killed['unacknowledged']} more were "
            "committed whose reply never arrived."
        )


def load(server: ServerProcess, folder: str, raters: int, kill_after: float | None) -> dict:
    """`raters` threads answer their pairs (30% replayed); optionally SIGKILL the server."""
    acknowledged, ms, lock = set(), [], threading.Lock()
    replays, refused = [0], [0]

    def one(seed: int) -> None:
        rng = Random(seed)
        try:
            _, made = _post(server.url + "api/raters")
            token = made["rater"]
            shown = json.loads(_get(server.url + f"api/next?rater={token}"))
            while not shown["finished"]:
                body = {
                    "rater": token,
                    "pair": shown["pair"],
                    "choice": rng.choice(["left", "right"]),
                }
                started = time.perf_counter()
                status, reply = _post(server.url + "api/answer", body)
                took = 1000 * (time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"answer refused: {status} {reply}")
                with lock:
                    acknowledged.add((token, body["pair"]))
                    ms.append(took)
                if rng.random() < 0.3:
                    again, _ = _post(server.url + "api/answer", body)
                    with lock:
                        replays[0] += 1
                        refused[0] += again == 409
                shown = reply
        except (OSError, http.client.HTTPException):
            if kill_after is None:
                raise

    before = set(_stored(folder))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(raters)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    if kill_after is not None:
        time.sleep(kill_after)
        server.kill()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    stored = [answer for answer in _stored(folder) if answer not in before]
    return {
        "acknowledged": len(acknowledged),
        "stored": len(stored),
        "lost": len(acknowledged - set(stored)),
        "duplicated": len(stored) - len(set(stored)),
        "unacknowledged": len(set(stored) - acknowledged),
        "replays": replays[0],
        "replays_refused": refused[0],
        "seconds": seconds,
        "ms": ms,
    }


def _stored(folder: str) -> list[tuple[str, str]]:
    """(rater, pair) of every answer in the study's database."""
    path = Path(folder) / "answers.sqlite"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT rater, pair FROM answers").fetchall()


def cpu_name() -> str:
    """The CPU model and its widest vector extension, as /proc/cpuinfo says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())  # fmt: skip
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vector}{', bf16' if 'avx512_bf16' in flags else ''})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/mnist_1d")
    parser.add_argument("--sr-run", default="runs/mnist_sr")
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--images", type=int, default=50, help="images of the study")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per request")
    parser.add_argument("--screenshots", type=Path, help="save both pages here as PNG")
    args = parser.parse_args()
    for run in (args.run, args.sr_run):
        if not (Path(run) / "model.safetensors").is_file():
            print(
                f"web.py: {run} is not a trained run; train it first (see --help)", file=sys.stderr
            )
            return 2
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}.",
        "",
        f"### Playground (`imagetransformer serve {args.run}`)",
        "",
    ]
    playground(args.run, args.screenshots, lines, args.repeats)
    if args.screenshots:
        upscale_screenshot(args.sr_run, args.screenshots)
    lines += ["", f"### Study (`imagetransformer study serve`, stimuli from {args.sr_run})", ""]
    study(args.sr_run, args.raters, args.screenshots, lines, args.images, args.repeats)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
