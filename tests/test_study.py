"""The human study: stimuli made once and stored, assignments, the answer store's refusals and
durability (SIGKILL, 20 concurrent raters), the report's statistics, the HTTP API and what it
must not reveal."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shutil
import sqlite3
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from random import Random

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer import ImageTransformer
from imagetransformer.cli import main
from imagetransformer.layout import area_downsample
from imagetransformer.run import Run
from imagetransformer.study.report import summarise, wilson_interval
from imagetransformer.study.stimuli import MANIFEST_FILE, Manifest
from imagetransformer.study.store import DATABASE_FILE, AnswerStore, Refused, read_answers

from .webserver import ServerProcess

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SR = [
    "--preset", "tiny", "--image-size", "8", "--quiet", "--task", "superres", "--scale", "2",
    "--set", "encoder_layers=1", "--set", "eval_every=0", "--set", "sample_count=4",
]  # fmt: skip
IMAGES = 6
TEMPERATURES = ["0.8", "1.0"]


def _quiet(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sr") / "run"
    code, _, err = _quiet(["train", *TINY_SR, "--out", str(run), "--set", "max_steps=3"])
    assert code == 0, err
    return run


def _create(sr_run: Path, out: Path, *extra: str, more_runs: tuple[str, ...] = ()) -> Path:
    argv = ["study", "create", str(sr_run), *more_runs, "--images", str(IMAGES), "--out", str(out)]
    code, stdout, err = _quiet([*argv, "--temperatures", *TEMPERATURES, *extra])
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def study(sr_run, tmp_path_factory) -> Path:
    """A study of the tiny run: 6 images x 2 temperatures; copy it before answering."""
    return _create(sr_run, tmp_path_factory.mktemp("study") / "study")


@pytest.fixture
def fresh(study, tmp_path) -> Path:
    shutil.copytree(study, tmp_path / "study")
    return tmp_path / "study"


# Statistics -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, n, low, high",
    [(5, 10, 0.236593, 0.763407), (0, 10, 0.0, 0.277533), (10, 10, 0.722467, 1.0),
     (1, 1, 0.206549, 1.0)],
)  # fmt: skip
def test_wilson_interval_matches_published_values(k, n, low, high) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=2e-5)


@pytest.mark.parametrize("k, n", [(36, 100), (3, 7), (499, 1000)])
def test_wilson_bounds_are_the_roots_of_the_score_equation(k, n) -> None:
    """The interval is {p : (k/n - p)^2 <= z^2 p (1 - p) / n}: its ends solve a quadratic."""
    z2, p_hat = 1.959963984540054**2, k / n
    a, b, c = 1 + z2 / n, -(2 * p_hat + z2 / n), p_hat**2
    roots = np.roots([a, b, c])
    assert wilson_interval(k, n) == pytest.approx(tuple(sorted(roots)), abs=1e-12)


def test_wilson_interval_without_answers_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


# Stimuli ----------------------------------------------------------------------------------------
def test_create_stores_truth_and_one_sample_per_temperature(sr_run, study) -> None:
    manifest = Manifest.read(study)
    assert manifest.temperatures == [0.8, 1.0]
    assert len(manifest.images) == IMAGES and len(set(manifest.images)) == IMAGES
    assert len(manifest.pairs) == IMAGES * 2
    assert {(p.image, p.temperature) for p in manifest.pairs} == {
        (i, t) for i in manifest.images for t in (0.8, 1.0)
    }
    run = Run.open(sr_run)
    test = run.load_split("test")
    model = ImageTransformer.from_pretrained(sr_run).eval()
    truth, _ = test.batch(torch.tensor(manifest.images))
    for temperature in manifest.temperatures:
        pairs = sorted(
            (p for p in manifest.pairs if p.temperature == temperature), key=lambda p: p.image
        )
        real = torch.stack([_read_png(study, p.real) for p in pairs])
        fake = torch.stack([_read_png(study, p.sample) for p in pairs])
        assert torch.equal(real, truth)  # the truth, bit for bit
        generator = torch.Generator().manual_seed(0)  # the study's seed: the samples are these
        expected = model.upscale(area_downsample(truth, 2), temperature, generator=generator)
        assert torch.equal(fake, expected)


def _read_png(study: Path, token: str) -> torch.Tensor:
    with Image.open(Manifest.stimulus_path(study, token)) as image:
        array = np.asarray(image)
    return torch.from_numpy(array.copy())[None]


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at + 4 : at + 8])
        at += 12 + length
    return chunks


def test_stimulus_files_do_not_tell_real_from_sample(study) -> None:
    manifest = Manifest.read(study)
    files = sorted((study / "stimuli").iterdir())
    assert len(files) == len(manifest.tokens()) == IMAGES * 3
    for path in files:
        assert len(path.stem) == 24 and all(c in "0123456789abcdef" for c in path.stem)
        data = path.read_bytes()
        assert set(_png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}  # no text, time or gamma
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (8, 8)


def test_create_refuses_and_writes_nothing(sr_run, study, tmp_path, capsys) -> None:
    plain = tmp_path / "plain"
    code, _, err = _quiet(
        ["train", "--preset", "tiny", "--image-size", "8", "--quiet", "--out", str(plain),
         "--set", "max_steps=1", "--set", "eval_every=0", "--set", "sample_count=1"]
    )  # fmt: skip
    assert code == 0, err
    cases = [
        ([str(plain)], "not a super-resolution run"),
        ([str(sr_run), "--images", "0"], "--images"),
        ([str(sr_run), "--temperatures", "0.8", "0.8"], "distinct"),
        ([str(sr_run), "--temperatures", "-1"], ">= 0"),
        ([f"no spaces={sr_run}"], "condition name"),
        ([f"x={sr_run}", f"x={sr_run}"], "must differ"),
        ([str(sr_run), "--image-size", "16"], "convert the images"),
    ]
    for i, (argv, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, _, err = _quiet(["study", "create", *argv, "--out", str(out)])
        assert code == 2 and needle in err and "Traceback" not in err, (argv, err)
        assert not out.exists()
    assert list(tmp_path.glob(".*partial*")) == []
    code, _, err = _quiet(["study", "create", str(sr_run), "--out", str(study)])
    assert code == 2 and "not an empty folder" in err


def test_a_study_of_several_named_runs_compares_them_on_the_same_images(sr_run, tmp_path) -> None:
    folder = _create(sr_run, tmp_path / "two", "--seed", "3", more_runs=(f"first={sr_run}",))
    manifest = Manifest.read(folder)
    names = [c.name for c in manifest.conditions]
    assert names == [sr_run.name, "first"]
    assert len(manifest.pairs) == IMAGES * 2 * 2
    for name in names:  # every condition and temperature has a sample of every image
        for t in manifest.temperatures:
            images = {p.image for p in manifest.pairs if p.condition == name and p.temperature == t}
            assert images == set(manifest.images)
    assert len(manifest.tokens()) == IMAGES + IMAGES * 4  # one truth per image, shared
    store = AnswerStore(folder, manifest)
    for seed in range(len(manifest.cells)):  # one rater per cell: every pair once
        rater = store.new_rater(Random(seed))
        while (shown := store.next_pair(rater)) is not None:
            store.answer(rater, shown.pair.id, "left")
    store.close()
    rows = summarise(manifest, read_answers(folder, manifest))["rows"]
    assert [(r["condition"], r["temperature"]) for r in rows] == [
        *manifest.cells,
        *((name, "all") for name in names),
    ]
    assert all(r["answers"] == IMAGES for r in rows[:4]) and rows[4]["answers"] == 2 * IMAGES


def test_a_damaged_study_folder_is_refused_by_name(fresh) -> None:
    (fresh / DATABASE_FILE).write_bytes(b"not a database, just bytes" * 100)
    code, _, err = _quiet(["study", "report", str(fresh)])
    assert code == 2 and str(fresh / DATABASE_FILE) in err and "Traceback" not in err
    (fresh / DATABASE_FILE).unlink()
    next(iter((fresh / "stimuli").iterdir())).unlink()
    code, _, err = _quiet(["study", "report", str(fresh)])
    assert code == 2 and "lacks 1" in err
    (fresh / MANIFEST_FILE).write_text("{not json")
    code, _, err = _quiet(["study", "report", str(fresh)])
    assert code == 2 and str(fresh / MANIFEST_FILE) in err
    code, _, err = _quiet(["study", "serve", str(fresh.parent / "nowhere"), "--port", "0"])
    assert code == 2 and "not a study folder" in err


# Assignments and the store ----------------------------------------------------------------------
def test_assignments_show_each_image_once_and_cover_every_pair(study) -> None:
    manifest = Manifest.read(study)
    cells = len(manifest.cells)
    seen = []
    for number in range(cells):
        pairs = manifest.assignment(number)
        assert sorted(p.image for p in pairs) == sorted(manifest.images)  # each image once
        seen += [p.id for p in pairs]
    assert sorted(seen) == sorted(p.id for p in manifest.pairs)  # every pair exactly once


def test_store_refuses_what_must_not_be_stored(fresh) -> None:
    manifest = Manifest.read(fresh)
    store = AnswerStore(fresh, manifest)
    alice, bob = store.new_rater(Random(1)), store.new_rater(Random(2))
    shown = store.next_pair(alice)
    assert store.next_pair(alice) == shown  # the same pair until it is answered
    theirs = {p.id for p in manifest.assignment(0)}
    not_alices = next(p.id for p in manifest.pairs if p.id not in theirs)
    later = next(p for p in theirs if p != shown.pair.id)
    refusals = [
        ((alice, "no-such-pair", "left"), "unknown pair"),
        (("no-such-rater", shown.pair.id, "left"), "unknown rater"),
        ((alice, not_alices, "left"), "not assigned"),
        ((alice, later, "left"), "not been shown"),
        ((alice, shown.pair.id, "middle"), "'left' or 'right'"),
        ((bob, shown.pair.id, "left"), "not assigned"),
    ]
    for args, needle in refusals:
        with pytest.raises(Refused, match=needle):
            store.answer(*args)
    answer = store.answer(alice, shown.pair.id, "left")
    assert answer.picked_sample == (shown.real_side == "right")
    with pytest.raises(Refused, match="answered already"):
        store.answer(alice, shown.pair.id, "right")
    assert [(a.rater, a.pair, a.choice) for a in store.answers()] == [
        (alice, shown.pair.id, "left")
    ]
    assert store.progress(alice) == (1, IMAGES)
    store.close()


def test_left_and_right_are_randomised(fresh) -> None:
    store = AnswerStore(fresh, Manifest.read(fresh))
    sides = []
    for seed in range(10):
        rater = store.new_rater(Random(100 + seed))
        while (shown := store.next_pair(rater)) is not None:
            sides.append(shown.real_side)
            store.answer(rater, shown.pair.id, "left")
    store.close()
    assert 15 <= sides.count("left") <= 45  # 60 fair coins fall outside this once in 10^4


# The server -------------------------------------------------------------------------------------
def _call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _db_answers(study: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(study / DATABASE_FILE)) as db:
        return db.execute("SELECT rater, pair, choice FROM answers").fetchall()


def test_sigkill_loses_no_acknowledged_answer(fresh) -> None:
    acknowledged = []
    with ServerProcess("study", "serve", str(fresh)) as server:
        _, rater = _call(server.url + "api/raters", "POST")
        _, shown = _call(server.url + f"api/next?rater={rater['rater']}")
        for i in range(4):
            choice = "left" if i % 2 else "right"
            body = {"rater": rater["rater"], "pair": shown["pair"], "choice": choice}
            status, next_shown = _call(server.url + "api/answer", "POST", body)
            assert status == 200
            acknowledged.append((rater["rater"], shown["pair"], choice))
            shown = next_shown
        server.kill()
    assert sorted(_db_answers(fresh)) == sorted(acknowledged)
    with ServerProcess("study", "serve", str(fresh)) as server:
        status, again = _call(server.url + f"api/next?rater={rater['rater']}")
        assert status == 200 and again["pair"] == shown["pair"] and again["done"] == 4
        status, refused = _call(server.url + "api/answer", "POST", dict(zip(
            ("rater", "pair", "choice"), acknowledged[0], strict=True)))  # fmt: skip
        assert status == 409 and "answered already" in refused["error"]
    assert sorted(_db_answers(fresh)) == sorted(acknowledged)


def test_twenty_concurrent_raters_lose_and_duplicate_nothing(fresh) -> None:
    acknowledged, lock, errors = [], threading.Lock(), []
    with ServerProcess("study", "serve", str(fresh)) as server:

        def rater_session(seed: int) -> None:
            rng = Random(seed)
            try:
                _, made = _call(server.url + "api/raters", "POST")
                token = made["rater"]
                _, shown = _call(server.url + f"api/next?rater={token}")
                while not shown["finished"]:
                    body = {
                        "rater": token,
                        "pair": shown["pair"],
                        "choice": rng.choice(["left", "right"]),
                    }
                    status, reply = _call(server.url + "api/answer", "POST", body)
                    if status == 200:
                        with lock:
                            acknowledged.append((token, body["pair"], body["choice"]))
                    if rng.random() < 0.3:  # a replay, as a double click or a retry sends it
                        again, _ = _call(server.url + "api/answer", "POST", body)
                        assert again == 409
                    shown = reply
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=rater_session, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    stored = _db_answers(fresh)
    assert len(acknowledged) == 20 * IMAGES
    assert sorted(stored) == sorted(acknowledged)  # every acknowledged answer exactly once
    assert len(set((r, p) for r, p, _ in stored)) == len(stored)


def test_pages_and_images_reveal_nothing_and_nothing_else_is_served(fresh) -> None:
    manifest = Manifest.read(fresh)
    real_tokens = {p.real for p in manifest.pairs}
    real_files = _real_files(fresh)
    with ServerProcess("study", "serve", str(fresh)) as server:
        host, port = server.host_port
        assert host == "127.0.0.1"
        _, made = _call(server.url + "api/raters", "POST")
        _, shown = _call(server.url + f"api/next?rater={made['rater']}")
        assert set(shown) == {"finished", "pair", "left", "right", "done", "total"}
        served = []
        for side in ("left", "right"):
            with urllib.request.urlopen(server.url + shown[side].lstrip("/")) as response:
                headers = {k.lower() for k in response.headers}
                assert response.headers["Content-Type"] == "image/png"
                assert response.headers["Cache-Control"] == "private"
                served.append(response.read())
            assert not headers & {"last-modified", "etag", "content-disposition"}
        assert [data in real_files for data in served].count(True) == 1  # the reply marks none
        addresses = {shown[side].rsplit("/", 1)[1] for side in ("left", "right")}
        assert not addresses & manifest.tokens()
        page = urllib.request.urlopen(server.url).read().decode()
        assert "sample" not in page.lower() and "stimuli" not in page
        attempts = [
            "/static/../study.json", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/..%2fstudy.py",
            "/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static//etc/passwd", "/stimulus/../study.json",
            f"/stimulus/..%2f{MANIFEST_FILE}", "/stimulus/%2fetc%2fpasswd", "//etc/passwd",
            f"/{MANIFEST_FILE}", f"/{DATABASE_FILE}", f"/stimuli/{next(iter(real_tokens))}.png",
            "/static/" + "..%5c" * 3 + "etc%5cpasswd", "/static/%252e%252e/study.json",
            "/static/playground.js",  # the other app's page
            f"/stimulus/{next(iter(real_tokens))}",  # a file's own name is no address
        ]  # fmt: skip
        for path, status in [*((p, 404) for p in attempts), ("/static/study.js", 200)]:
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == status, path
            response.read()
            connection.close()
        status, refused = _call(server.url + "api/answer", "POST", {"rater": made["rater"]})
        assert status == 400 and "choice" in refused["error"]


def _real_files(study: Path) -> set[bytes]:
    """The bytes of the study's real images (the server's addresses do not say which is)."""
    manifest = Manifest.read(study)
    return {Manifest.stimulus_path(study, p.real).read_bytes() for p in manifest.pairs}


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_each_rater_has_their_own_image_addresses(fresh) -> None:
    """Every rater sees every real image once: two raters' addresses for the same file differ,
    so holding two rater codes does not show which image of a pair is the real one."""
    from starlette.testclient import TestClient

    from imagetransformer.web.study import study_app

    manifest = Manifest.read(fresh)
    files = {Manifest.stimulus_path(fresh, t).read_bytes(): t for t in manifest.tokens()}
    reals = {p.real for p in manifest.pairs}
    by_file: dict[str, set[str]] = {}  # stimulus token -> the addresses it was served at
    with TestClient(study_app(fresh)) as client:
        for _ in range(2):
            rater = client.post("/api/raters").json()["rater"]
            shown = client.get(f"/api/next?rater={rater}").json()
            assert client.get(f"/api/next?rater={rater}").json() == shown  # a reload finds it
            while not shown["finished"]:
                for side in ("left", "right"):
                    response = client.get(shown[side])
                    assert response.status_code == 200
                    by_file.setdefault(files[response.content], set()).add(shown[side])
                body = {"rater": rater, "pair": shown["pair"], "choice": "left"}
                shown = client.post("/api/answer", json=body).json()
        addresses = [a for found in by_file.values() for a in found]
        assert len(addresses) == len(set(addresses)) == 2 * 2 * IMAGES
        assert reals <= set(by_file)  # every real image, to both raters
        assert all(len(by_file[t]) == 2 for t in reals)  # one address per rater
        assert not {a.rsplit("/", 1)[1] for a in addresses} & manifest.tokens()
        for token in list(reals)[:2]:
            assert client.get(f"/stimulus/{token}").status_code == 404
        wrong = addresses[0][:-1] + ("0" if addresses[0][-1] != "0" else "1")
        assert client.get(wrong).status_code == 404


def _raw(server: ServerProcess, method: str, path: str, headers: dict, body: bytes = b""):
    """(status, JSON) of one request with exactly these headers (Host included when given)."""
    connection = http.client.HTTPConnection(*server.host_port, timeout=15)
    connection.request(method, path, body=body or None, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data.startswith(b"{") else data


def _count(study: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(study / DATABASE_FILE)) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_other_hosts_and_other_sites_are_refused(fresh) -> None:
    """DNS rebinding (a hostile name resolving here) and cross-site requests create no rater,
    store no answer and show no pair; this server's own names and page still work."""
    with ServerProcess("study", "serve", str(fresh)) as server:
        host, port = server.host_port
        own = f"http://{host}:{port}"
        _, made = _call(server.url + "api/raters", "POST")
        rater = made["rater"]
        _, shown = _call(server.url + f"api/next?rater={rater}")
        answer = json.dumps({"rater": rater, "pair": shown["pair"], "choice": "left"}).encode()
        raters = _count(fresh, "raters")
        evil = {"Host": f"evil.example:{port}"}
        for method, path, body in [
            ("POST", "/api/raters", b""), ("GET", f"/api/next?rater={rater}", b""),
            ("POST", "/api/answer", answer), ("GET", "/", b""), ("GET", "/static/study.js", b""),
        ]:  # fmt: skip
            status, refused = _raw(
                server, method, path, {**evil, "Content-Type": "text/plain"}, body
            )
            assert status == 421, path
            assert "evil.example" in refused["error"] and "--host evil.example" in refused["error"]
            assert f"http://127.0.0.1:{port}/" in refused["error"]
        cross = [
            {"Origin": "http://evil.example"},
            {"Origin": f"http://{host}:{port + 1}"},  # this machine, another port: another site
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ]
        for headers in cross:
            for method, path, body, kind in [
                ("POST", "/api/raters", b"", "text/plain"),
                ("POST", "/api/answer", answer, "text/plain"),  # no preflight for text/plain
                ("POST", "/api/answer", answer, "application/json"),
                ("GET", f"/api/next?rater={rater}", b"", "text/plain"),
            ]:
                status, refused = _raw(
                    server, method, path, {**headers, "Content-Type": kind}, body
                )
                assert status == 403, (headers, path)
                assert "another site" in refused["error"] and own in refused["error"]
        assert _count(fresh, "raters") == raters and _count(fresh, "answers") == 0
        # Positive controls: this machine's names with any port, the page's own requests, and
        # a link from elsewhere to the page itself.
        for name in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
            status, _ = _raw(server, "POST", "/api/raters", {"Host": f"{name}:{port}"})
            assert status == 200, name
        same = {"Origin": own, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
        status, _ = _raw(server, "POST", "/api/raters", same)
        assert status == 200 and _count(fresh, "raters") == raters + 5
        status, _ = _raw(
            server, "POST", "/api/answer", {**same, "Content-Type": "text/plain"}, answer
        )
        assert status == 415 and _count(fresh, "answers") == 0  # an answer is JSON
        status, page = _raw(server, "GET", "/", {"Sec-Fetch-Site": "cross-site"})
        assert status == 200 and b"<main>" in page
        status, _ = _raw(server, "POST", "/api/answer", same, answer)
        assert status == 200 and _count(fresh, "answers") == 1


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
@pytest.mark.parametrize(
    "bound, answered, refused",
    [
        ("127.0.0.1", ["127.0.0.1:80", "localhost:8000", "[::1]:8000", "LocalHost"],
         ["evil.example", "127.0.0.2", "localhost.evil.example", "evil.example:127.0.0.1"]),
        ("::1", ["[::1]", "[::1]:8000", "localhost:1"], ["[::2]:8000", "evil.example:8000"]),
        ("study.lan", ["study.lan:8000", "127.0.0.1:8000"], ["evil.example", "lan:8000"]),
        ("0.0.0.0", ["192.168.1.5:8000", "[fe80::1]:8000", "localhost"], ["evil.example"]),
    ],
)  # fmt: skip
def test_the_names_a_server_answers_to(bound, answered, refused) -> None:
    """127.0.0.1, localhost and [::1] with any port, and --host; listening on every address,
    any IP address too (a hostile page is never served under an address)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from imagetransformer.web.server import Guard

    ok = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    client = TestClient(Guard(ok, bound))
    for host in answered:
        assert client.get("/", headers={"Host": host}).text == "ok", host
    for host in refused:
        response = client.get("/", headers={"Host": host})
        assert response.status_code == 421 and "--host" in response.json()["error"], host


def test_answer_bodies_are_capped_and_timed_and_idle_connections_closed(fresh) -> None:
    """A body said or shown to be over 4 KB is refused before it is read; one that stalls, and
    connections that send nothing or trickle their headers, are closed after a few seconds; a
    client gone mid-body leaves no traceback."""
    import socket

    within = 8.0  # seconds: the server gives up on a stalled body or connection after 5

    with ServerProcess("study", "serve", str(fresh)) as server:
        host, port = server.host_port

        def connect() -> socket.socket:
            sock = socket.create_connection((host, port))
            sock.settimeout(20)
            return sock

        def head(length: str, kind: str = "application/json") -> bytes:
            return (
                f"POST /api/answer HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {kind}\r\n"
                f"{length}\r\n\r\n"
            ).encode()

        def reply(sock: socket.socket) -> tuple[int, bytes]:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk  # the refusals close the connection
            return int(data.split(b" ", 2)[1]), data

        declared = connect()  # 50 MB declared, 1 KB sent: refused at once, nothing more read
        declared.sendall(head(f"Content-Length: {50 * 2**20}") + b"x" * 1024)
        status, data = reply(declared)
        assert status == 413 and b"4096-byte limit" in data
        chunked = connect()  # no length given: refused as it grows past 4 KB, mid-body
        chunked.sendall(head("Transfer-Encoding: chunked"))
        for _ in range(8):
            chunked.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        status, _ = reply(chunked)
        assert status == 413
        started = time.monotonic()
        stalled = connect()  # 2 KB declared, 1 KB sent, then nothing
        stalled.sendall(head("Content-Length: 2048") + b"x" * 1024)
        idle = [connect() for _ in range(20)]  # never send a byte
        trickle = connect()  # a header byte every half second, never the end of the headers
        trickled_for = None
        for byte in f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: {'x' * 40}".encode():
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                trickled_for = time.monotonic() - started
                break
            time.sleep(0.5)
        assert trickled_for is not None and trickled_for < within
        status, data = reply(stalled)
        assert status == 408 and b"did not arrive in time" in data
        assert time.monotonic() - started < within
        assert all(sock.recv(1) == b"" for sock in idle)  # closed by the server
        assert time.monotonic() - started < within + 2
        gone = connect()  # a client that goes away mid-body
        gone.sendall(head("Content-Length: 200") + b'{"rater": ')
        time.sleep(0.3)
        gone.close()
        time.sleep(0.5)
        for sock in (declared, chunked, stalled, *idle, trickle):
            sock.close()
        status, answered = _call(server.url + "api/raters", "POST")  # still serving
        assert status == 200 and answered["rater"]
    assert not [line for line in server.lines() if "Traceback" in line or "Disconnect" in line]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_sigterm_stops_the_server_as_ctrl_c_does(fresh, stop) -> None:
    import signal

    server = ServerProcess("study", "serve", str(fresh))
    _call(server.url + "api/raters", "POST")
    code = server.stop(getattr(signal, stop))
    lines = server.lines()
    assert code == 0, lines
    assert [line for line in lines if "stopped serving" in line] == [
        f"stopped serving the study {fresh}"
    ]
    assert not [line for line in lines if "Traceback" in line or "Error" in line], lines


def test_a_busy_port_is_one_line(fresh) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = _quiet(["study", "serve", str(fresh), "--port", str(port)])
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert len(err.strip().splitlines()) == 1


# The report -------------------------------------------------------------------------------------
def test_report_counts_and_fool_rates(fresh, tmp_path) -> None:
    manifest = Manifest.read(fresh)
    store = AnswerStore(fresh, manifest)
    given = []
    for seed in range(3):
        rng, rater = Random(seed), store.new_rater(Random(seed))
        while (shown := store.next_pair(rater)) is not None:
            given.append(store.answer(rater, shown.pair.id, rng.choice(["left", "right"])))
    store.close()
    code, out, err = _quiet(
        ["study", "report", str(fresh), "--json", "--plot", str(tmp_path / "p.png")]
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["answers"] == len(given) == 3 * IMAGES and summary["raters"] == 3
    for row in summary["rows"]:
        chosen = [
            a for a in given if a.condition == row["condition"]
            and row["temperature"] in ("all", a.temperature)
        ]  # fmt: skip
        fooled = sum(a.picked_sample for a in chosen)
        assert row["answers"] == len(chosen) and row["fooled"] == fooled
        assert row["raters"] == len({a.rater for a in chosen})
        assert row["fool_rate"] == pytest.approx(fooled / len(chosen))
        assert list(row["ci95"]) == pytest.approx(wilson_interval(fooled, len(chosen)))
    lines = (fresh / "answers.csv").read_text().splitlines()
    assert len(lines) == 1 + len(given) and lines[0].startswith("rater,pair,condition")
    with Image.open(tmp_path / "p.png") as image:
        assert image.size[0] > 100
    code, out, _ = _quiet(["study", "report", str(fresh)])
    assert code == 0 and "95% Wilson" in out
    assert summarise(manifest, [])["rows"][0]["fool_rate"] is None


# In a real browser ------------------------------------------------------------------------------
def _new_pair(page, seen: list[str]) -> str:
    """Wait for a pair not in `seen` to be on screen, both images loaded; its id."""
    return page.wait_for_function(
        """seen => {
          const pair = document.querySelector('#task').dataset.pair;
          return pair && !seen.includes(pair) ? pair : null;
        }""",
        arg=seen,
    ).json_value()


def test_a_rater_in_a_browser_stops_comes_back_after_a_restart_and_finishes(
    fresh, tmp_path
) -> None:
    """Half the pairs by click and arrow key, the server killed (a click then says it is not
    answering) and started again (the same click goes through), the page reloaded (the browser
    remembers the rater), the rest; then the report agrees with what was chosen, pair by pair.
    Which image is real is told by its bytes: the addresses do not say."""
    import urllib.parse

    from playwright.sync_api import expect

    from .browser import browser, screenshot

    real_files = _real_files(fresh)
    picked_sample = []
    shown = []  # the pairs judged, in order

    def on_screen(page) -> bool:
        """Wait for the next pair (a new one, both images loaded): whether the left is real."""
        shown.append(_new_pair(page, shown))
        expect(page.locator("#left")).to_be_enabled()
        real = []
        for side in ("left", "right"):
            address = urllib.parse.urljoin(page.url, page.get_attribute(f"#{side}-image", "src"))
            with urllib.request.urlopen(address, timeout=10) as response:
                real.append(response.read() in real_files)
        assert real[0] != real[1]
        return real[0]

    def pick(page, left_real: bool, by_key: bool) -> str:
        side = "left" if len(picked_sample) % 3 else "right"  # a rule blind to which is real
        if by_key:
            page.keyboard.press("ArrowLeft" if side == "left" else "ArrowRight")
        else:
            page.click(f"#{side}")
        return side

    def judged(page, left_real: bool, side: str) -> None:
        picked_sample.append((side == "left") != left_real)
        expect(page.locator("#progress")).to_have_text(f"{len(picked_sample)} of {IMAGES} judged")

    def judge(page, count: int) -> None:
        for i in range(count):
            left_real = on_screen(page)
            judged(page, left_real, pick(page, left_real, by_key=bool(i % 2)))

    with browser() as chromium:
        page = chromium.new_page(viewport={"width": 900, "height": 720})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))

        def slow_image(route) -> None:  # slow networks: the pair arrives after the page is up
            time.sleep(0.3)
            route.continue_()

        page.route("**/stimulus/**", slow_image)
        server = ServerProcess("study", "serve", str(fresh))
        try:
            page.goto(server.url)
            page.wait_for_selector("#display-note:has-text('nearest-neighbour')")
            page.click("#start")
            page.wait_for_selector("#task:not([hidden])")
            judge(page, 1)
            expect(page.locator("#task")).to_have_attribute("data-layout", "side")
            expect(page.locator("#left .label.side")).to_have_text("← left")
            expect(page.locator("#right .label.side")).to_be_visible()
            expect(page.locator("#left .label.stacked")).to_be_hidden()
            screenshot(page, "study", tmp_path)
            judge(page, IMAGES // 2 - 1)
            left_real = on_screen(page)
        finally:
            server.kill()
        assert len(_db_answers(fresh)) == IMAGES // 2
        side = pick(page, left_real, by_key=False)  # the server is down
        message = page.locator("#message")
        expect(message).to_contain_text("The server is not answering")
        expect(message).to_contain_text("earlier answers are saved")
        expect(message).to_contain_text("try again")
        expect(message).not_to_contain_text("Failed to fetch")
        expect(page.locator(f"#{side}")).to_be_enabled()  # the same pair, to try again
        assert page.get_attribute("#task", "data-pair") == shown[-1]
        port = server.host_port[1]  # the same address: the browser's storage keeps the rater
        with ServerProcess("study", "serve", str(fresh), port=port) as server:
            page.click(f"#{side}")  # tried again: it goes through
            judged(page, left_real, side)
            expect(message).to_have_text("")
            page.goto(server.url)
            page.wait_for_selector("#start:has-text('Continue')")
            expect(page.locator("#left")).to_be_disabled()  # no pair on screen yet
            page.click("#start")
            judge(page, IMAGES - IMAGES // 2 - 1)
            page.wait_for_selector("#finished:not([hidden])")
        assert not errors, errors

    code, out, err = _quiet(["study", "report", str(fresh), "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["answers"] == IMAGES and summary["raters"] == 1
    overall = next(r for r in summary["rows"] if r["temperature"] == "all")
    assert overall["answers"] == IMAGES and overall["fooled"] == sum(picked_sample)
    assert overall["fool_rate"] == pytest.approx(sum(picked_sample) / IMAGES)


def test_on_a_phone_the_pair_is_top_and_bottom_and_a_stale_tab_says_so(fresh) -> None:
    """At a phone's width the pair stacks: the labels, the buttons' names and the arrow keys
    say top and bottom (and follow the width when it changes). A second tab that answers a pair
    the first has answered is told so, and shows the pair that is due."""
    from playwright.sync_api import expect

    from .browser import browser

    with browser() as chromium, ServerProcess("study", "serve", str(fresh)) as server:
        phone = {"width": 390, "height": 844}
        context = chromium.new_context(viewport=phone, is_mobile=True, has_touch=True)
        errors = []
        first = context.new_page()
        first.on("pageerror", lambda err: errors.append(str(err)))
        first.goto(server.url)
        first.wait_for_selector("#display-note:has-text('nearest-neighbour')")
        first.click("#start")
        pair = _new_pair(first, [])
        rater = first.locator("#rater-code").inner_text()
        task = first.locator("#task")
        expect(task).to_have_attribute("data-layout", "stacked")
        expect(first.locator("#left .label.stacked")).to_have_text("↑ top")
        expect(first.locator("#right .label.stacked")).to_have_text("↓ bottom")
        for side in ("left", "right"):
            expect(first.locator(f"#{side} .label.side")).to_be_hidden()
        top, bottom = first.locator("#left").bounding_box(), first.locator("#right").bounding_box()
        assert bottom["y"] >= top["y"] + top["height"]  # one above the other
        assert first.get_attribute("#left", "aria-label") == "the top image came from a camera"
        assert first.get_attribute("#right", "aria-label") == "the bottom image came from a camera"

        second = context.new_page()  # the same browser: it remembers the rater
        second.on("pageerror", lambda err: errors.append(str(err)))
        second.goto(server.url)
        second.click("#start:has-text('Continue')")
        assert _new_pair(second, []) == pair

        first.keyboard.press("ArrowDown")  # the bottom image
        expect(first.locator("#progress")).to_have_text(f"1 of {IMAGES} judged")
        assert _db_answers(fresh) == [(rater, pair, "right")]
        due = _new_pair(first, [pair])
        second.click("#left")  # a stale tab answers the pair again
        expect(second.locator("#message")).to_contain_text(
            "That pair was already answered in another tab"
        )
        assert _new_pair(second, [pair]) == due
        expect(second.locator("#progress")).to_have_text(f"1 of {IMAGES} judged")
        assert _db_answers(fresh) == [(rater, pair, "right")]  # the stale answer not counted
        second.keyboard.press("ArrowUp")  # the top image, from the tab that was stale
        expect(second.locator("#progress")).to_have_text(f"2 of {IMAGES} judged")
        expect(second.locator("#message")).to_have_text("")
        assert sorted(_db_answers(fresh)) == sorted([(rater, pair, "right"), (rater, due, "left")])

        first.set_viewport_size({"width": 900, "height": 720})  # turned, or a wider window
        expect(task).to_have_attribute("data-layout", "side")
        expect(first.locator("#left .label.side")).to_be_visible()
        expect(first.locator("#left .label.stacked")).to_be_hidden()
        assert first.get_attribute("#left", "aria-label") == "the left image came from a camera"
        context.close()
        assert not errors, errors
