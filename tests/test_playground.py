"""The playground (`imagetransformer serve RUN`): streamed generations equal the verbs' own,
closing a stream cancels its work, parameters and uploads are checked, only the page's own
files are served; in-process (Starlette's test client), against a real server, and in a browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer import ImageTransformer
from imagetransformer.cli import build_parser, main
from imagetransformer.cli.common import open_model, read_image
from imagetransformer.defaults import GUIDANCE
from imagetransformer.errors import UserError
from imagetransformer.grid import make_grid
from imagetransformer.images import channel_count, check_channels
from imagetransformer.layout import area_downsample
from imagetransformer.run import DataOptions, Run
from imagetransformer.superres import upsample_nearest
from imagetransformer.web import tasks, uploads
from imagetransformer.web.generation import Busy, Jobs
from imagetransformer.web.uploads import MAX_UPLOAD_BYTES

from .webserver import ServerProcess

TINY = [
    "--preset", "tiny", "--image-size", "8", "--quiet", "--set", "max_steps=3",
    "--set", "eval_every=0", "--set", "sample_count=0",
]  # fmt: skip
SLOW_SIDE = 28  # 784 steps: a stream of 64 images lasts long enough to be cut mid-way
CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
    pytest.mark.usefixtures("one_thread"),
]


def _train(out: Path, *extra: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", *TINY, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory) -> Path:
    extra = ["--task", "superres", "--scale", "2", "--set", "encoder_layers=1"]
    return _train(tmp_path_factory.mktemp("sr") / "run", *extra)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cond") / "run"
    return _train(path, "--set", "num_classes=10", "--set", "class_dropout=0.1")


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory) -> Path:
    """An untrained 28x28 model with a run record (the test split is mnist5k's)."""
    path = tmp_path_factory.mktemp("slow") / "run"
    shape = f"image_shape=1,{SLOW_SIDE},{SLOW_SIDE}"
    run = Run.new(path, "tiny", [shape], options=DataOptions(image_size=SLOW_SIDE))
    run.write_start()
    ImageTransformer(run.config).save_pretrained(path)
    return path


@contextlib.contextmanager
def _client(run: Path):
    from starlette.testclient import TestClient

    from imagetransformer.web.playground import playground_app

    with TestClient(playground_app(run, CPU)) as client:
        yield client


@pytest.fixture(scope="module")
def tiny(tiny_run):
    with _client(tiny_run) as client:
        yield client


@pytest.fixture(scope="module")
def sr(sr_run):
    with _client(sr_run) as client:
        yield client


@pytest.fixture(scope="module")
def server(slow_run):
    with ServerProcess("serve", str(slow_run)) as process:
        yield process


def _events(text: str) -> list[tuple[str, dict]]:
    """(kind, data) of each server-sent event; comments skipped."""
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith(":")]
        if lines:
            fields = dict(line.split(": ", 1) for line in lines)
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def _png_pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return _png_pixels(base64.b64decode(data_url.split(",", 1)[1]))


def _stream(client, **params) -> list[tuple[str, dict]]:
    response = client.get("/api/stream", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return _events(response.text)


def _final(events: list[tuple[str, dict]]) -> np.ndarray:
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"frame"}, kinds
    return _pixels(events[-2][1]["image"])


def _test_split(run: Path):
    return Run.open(run).load_split("test")


def _png(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def _upload(client, page: str, body: bytes, name: str = "x.png"):
    return client.post(f"/api/upload?page={page}", files={"file": (name, body, "image/png")})


def _refused(response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------------- what a stream carries


def test_a_sample_streams_as_it_grows_and_ends_as_the_sample_verb(tiny, tiny_run) -> None:
    events = _stream(tiny, page="sample", n=5, temperature=0.8, seed=3)
    frames = [data for kind, data in events if kind == "frame"]
    assert [f["step"] for f in frames] == [16, 32, 48, 64] and {f["total"] for f in frames} == {64}
    assert events[-1][1]["seconds"] > 0
    model = open_model(str(tiny_run), CPU)
    generator = torch.Generator().manual_seed(3)
    expected = np.asarray(make_grid(model.sample(5, temperature=0.8, generator=generator)))
    assert np.array_equal(_final(events), expected)
    first = _pixels(frames[0]["image"])  # two of eight rows drawn: the rest of image 0 is grey
    side = (first.shape[1] - 2) // 3 - 2  # 3 images a row, each with 2 pixels of padding
    row = side // 8
    assert (first[2 + 2 * row : 2 + side, 2 : 2 + side] == 128).all()
    assert not (first[2 : 2 + 2 * row, 2 : 2 + side] == 128).all()


def test_the_run_facts_and_pages(tiny, sr) -> None:
    facts = tiny.get("/api/info").json()
    assert facts["preset"] == "tiny" and facts["image_shape"] == [1, 8, 8]
    assert facts["attention"] == "local_1d" and facts["parameters"] > 0
    assert 0 < facts["test_bits_per_dim"] < 9  # the final evaluation, from log.jsonl
    assert facts["pages"] == ["sample", "complete"] and facts["test_images"] > 0
    facts = sr.get("/api/info").json()
    assert facts["pages"] == ["upscale", "complete"] and facts["scale"] == 2
    _refused(sr.get("/api/stream?page=sample"), 400, "super-resolution", "upscale")
    page = tiny.get("/")
    assert page.status_code == 200 and '<script src="/static/playground.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_a_completion_of_a_test_image_is_the_complete_verbs(tiny, tiny_run) -> None:
    events = _stream(tiny, page="complete", index=3, keep=0.5, n=2, seed=1)
    model = open_model(str(tiny_run), CPU)
    original, _ = _test_split(tiny_run).batch(torch.tensor([3]))
    completions = model.complete(
        original.repeat_interleave(2, dim=0),
        model.keep_positions(0.5),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(completions[:, :, :4], original[:, :, :4].expand(2, -1, -1, -1))
    assert np.array_equal(_final(events), np.asarray(make_grid(completions)))
    thumbnail = tiny.get("/api/test-image?index=3")
    assert thumbnail.headers["content-type"] == "image/png"
    assert np.array_equal(_png_pixels(thumbnail.content), np.asarray(make_grid(original)))


def test_upscaling_a_test_image_and_an_upload(sr, sr_run) -> None:
    model = open_model(str(sr_run), CPU)
    truth, _ = _test_split(sr_run).batch(torch.tensor([0]))
    low_res = area_downsample(truth, 2)
    generator = torch.Generator().manual_seed(4)
    samples = model.upscale(low_res.repeat_interleave(2, dim=0), 0.9, generator=generator)
    events = _stream(sr, page="upscale", index=0, n=2, seed=4)
    assert np.array_equal(_final(events), np.asarray(make_grid(samples)))
    shown = sr.get("/api/test-image?index=0&page=upscale")  # the input, pixels repeated; truth
    expected = make_grid(torch.cat([upsample_nearest(low_res, 2), truth]))
    assert np.array_equal(_png_pixels(shown.content), np.asarray(expected))
    answer = _upload(sr, "upscale", _png(np.full((4, 4), 90, np.uint8))).json()
    assert "4x4 input" in answer["note"]
    events = _stream(sr, page="upscale", upload=answer["id"], n=1, temperature=0)
    assert events[-1][0] == "done"
    _refused(sr.get(f"/api/stream?page=complete&upload={answer['id']}"), 400, "upscale page")


def test_a_class_conditional_run_samples_the_asked_class(cond_run) -> None:
    model = open_model(str(cond_run), CPU)
    with _client(cond_run) as client:
        assert client.get("/api/info").json()["num_classes"] == 10
        for guidance in (GUIDANCE, 0.0):  # guided as `sample` guides it, unless told not to
            asked = {} if guidance == GUIDANCE else {"guidance": guidance}
            events = _stream(client, page="sample", n=2, seed=5, label=9, **asked)
            generator = torch.Generator().manual_seed(5)
            nines = torch.full((2,), 9)
            expected = model.sample(2, labels=nines, generator=generator, guidance=guidance)
            assert np.array_equal(_final(events), np.asarray(make_grid(expected)))
        _refused(client.get("/api/stream?page=sample&label=10"), 400, "label", "0 to 9")
        upload = _upload(client, "complete", _png(np.zeros((8, 8), np.uint8))).json()
        url = f"/api/stream?page=complete&upload={upload['id']}"
        _refused(client.get(url), 400, "class-conditional", "pick the class")
        assert _events(client.get(url + "&label=2").text)[-1][0] == "done"


@pytest.mark.parametrize(
    "query, needles",
    [
        ("page=sample&n=0", ["n must be", "1 to 64", "'0'"]),
        ("page=sample&n=65", ["1 to 64"]),
        ("page=sample&n=four", ["n must be a whole number"]),
        ("page=sample&temperature=-1", ["temperature", "at least 0"]),
        ("page=sample&temperature=nan", ["temperature"]),
        ("page=sample&seed=-1", ["seed"]),
        ("page=sample&seed=1.5", ["seed"]),
        ("page=sample&label=3", ["unconditional"]),
        ("page=sample&guidance=1", ["guidance", "class_dropout"]),
        ("page=sample&guidance=-1", ["guidance", "0 to 20"]),
        ("page=complete&index=0&guidance=1", ["guidance", "class_dropout"]),
        ("page=complete&index=2&keep=1.5", ["keep", "0 to 1"]),
        ("page=complete&index=1000", ["index", "0 to 999"]),
        ("page=complete&index=-1", ["index"]),
        ("page=complete", ["give index"]),
        ("page=complete&upload=nope", ["not kept", "upload the image again"]),
        ("page=upscale&index=0", ["does not upscale", "--task superres"]),
        ("page=paint", ["page must be sample, complete or upscale"]),
    ],
)
def test_bad_parameters_are_refused_in_one_line(tiny, query, needles) -> None:
    _refused(tiny.get(f"/api/stream?{query}"), 400, *needles)


# ---------------------------------------------------------------------------------- uploads


def test_uploads_are_checked_and_a_good_one_is_completed(
    tiny, tiny_run, tmp_path, monkeypatch
) -> None:
    _refused(_upload(tiny, "complete", b"hello, not an image"), 400, "not a PNG, JPEG")
    too_big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    _refused(_upload(tiny, "complete", too_big), 413, "5 MB limit")
    chunked = tiny.post(  # no Content-Length: refused as the body grows past the limit
        "/api/upload?page=complete",
        content=(b"\0" * 2**20 for _ in range(6)),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    _refused(chunked, 413, "5 MB limit")
    colour = _png(np.full((8, 8, 3), (200, 30, 30), np.uint8))  # red
    _refused(_upload(tiny, "complete", colour), 400, "3 channels", "1 channel", "convert it to")
    _refused(_upload(tiny, "sample", colour), 400, "takes no image")
    _refused(tiny.post("/api/upload?page=complete", data={"x": "1"}), 400, "file field 'file'")
    headers = {"content-type": "multipart/form-data; boundary=zz"}
    garbled = tiny.post("/api/upload?page=complete", content=b"x" * 99, headers=headers)
    _refused(garbled, 400, "file field 'file' of a multipart form (")
    grey = np.full((16, 16), 70, np.uint8)
    for kind in ("JPEG", "GIF", "BMP", "WEBP"):
        assert _upload(tiny, "complete", _png(grey, kind)).status_code == 200, kind
    _refused(_upload(tiny, "complete", _png(grey, "TIFF")), 400, "GIF, BMP or WebP image")
    with monkeypatch.context() as patched:
        patched.setattr(uploads, "MAX_UPLOAD_PIXELS", 255)
        _refused(_upload(tiny, "complete", _png(grey)), 400, "16x16 pixels, more than the 255")

    picture = tmp_path / "digit.png"
    gradient = np.linspace(0, 255, 24 * 20).reshape(24, 20).astype(np.uint8)
    picture.write_bytes(_png(gradient))
    answer = _upload(tiny, "complete", picture.read_bytes()).json()
    assert "20x24" in answer["note"] and "8x8" in answer["note"]
    expected = read_image(str(picture), (1, 8, 8))  # converted as `complete --image` does
    assert np.array_equal(_pixels(answer["preview"]), np.asarray(make_grid(expected[None])))
    events = _stream(tiny, page="complete", upload=answer["id"], keep=0.25, n=3, seed=2)
    model = open_model(str(tiny_run), CPU)
    completions = model.complete(
        expected[None].repeat_interleave(3, dim=0),
        model.keep_positions(0.25),
        generator=torch.Generator().manual_seed(2),
    )
    assert np.array_equal(_final(events), np.asarray(make_grid(completions)))


def test_channels_of_image_modes_and_which_a_model_takes() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for mode in ("L", "LA", "1", "I", "I;16", "F"):
        assert channel_count(Image.fromarray(grey).convert(mode)) == 1, mode
    colour = Image.fromarray(np.stack([grey, grey, 255 - grey], axis=-1))
    for image in (colour, colour.convert("RGBA"), colour.convert("P")):
        assert channel_count(image) == 3, image.mode
        check_channels(image, 3, "the upload")
        with pytest.raises(UserError, match=r"colour \(RGB\) \(3 channels.*takes grayscale"):
            check_channels(image, 1, "the upload")
    greys = Image.fromarray(grey).convert("RGB")  # as a WebP file of a digit decodes
    for image in (greys, greys.convert("RGBA"), greys.convert("P")):
        check_channels(image, 1, "the upload")
        check_channels(image, 3, "the upload")
    with pytest.raises(UserError, match=r"grayscale \(1 channel.*takes colour \(RGB\).*convert"):
        check_channels(Image.fromarray(grey), 3, "the upload")


# ------------------------------------------------------------------------ jobs and a real server


def test_a_cancelled_job_stops_before_its_last_step(slow_run) -> None:
    model = open_model(str(slow_run), CPU)
    generation = tasks.sample(model, {"n": "64"})

    async def scenario() -> None:
        jobs = Jobs(limit=1)
        job = jobs.start(generation)
        with pytest.raises(Busy, match="1 generations are running already"):
            jobs.start(generation)
        first = await job.events.get()
        assert first.kind == "frame" and first.data["step"] < first.data["total"]
        job.cancel()
        assert await asyncio.to_thread(job.join, 2.0)
        assert job.steps_done < job.total
        assert jobs.status() == {"running": 0, "limit": 1, "done": 0, "error": 0, "cancelled": 1}

    asyncio.run(scenario())


def _open_stream(server: ServerProcess, query: str) -> tuple[http.client.HTTPConnection, object]:
    connection = http.client.HTTPConnection(*server.host_port, timeout=30)
    connection.request("GET", f"/api/stream?{query}")
    return connection, connection.getresponse()


def _next_event(response) -> tuple[str, dict]:
    fields = {}
    while True:
        line = response.readline().decode()
        assert line, "the stream ended"
        if line.strip():
            if not line.startswith(":"):
                key, value = line.rstrip("\n").split(": ", 1)
                fields[key] = value
        elif fields:
            return fields["event"], json.loads(fields["data"])


def _jobs(server: ServerProcess) -> dict:
    connection = http.client.HTTPConnection(*server.host_port, timeout=10)
    connection.request("GET", "/api/jobs")
    return json.loads(connection.getresponse().read())


def test_closing_streams_cancels_their_work_and_a_full_server_refuses(server) -> None:
    before = _jobs(server)
    assert before["running"] == 0
    opened = [_open_stream(server, f"page=sample&n=64&seed={i}") for i in range(before["limit"])]
    for _, response in opened:
        assert response.status == 200 and _next_event(response)[0] == "frame"
    assert _jobs(server)["running"] == before["limit"]
    busy, refused = _open_stream(server, "page=sample&n=1")
    assert refused.status == 503
    assert "generations are running already" in json.loads(refused.read())["error"]
    busy.close()
    closed = time.monotonic()
    for connection, _ in opened:
        connection.close()
    while _jobs(server)["running"] and time.monotonic() - closed < 5:
        time.sleep(0.02)
    after = _jobs(server)
    assert after["running"] == 0 and time.monotonic() - closed < 1.0
    assert after["cancelled"] - before["cancelled"] == before["limit"]  # none reached its end
    assert after["done"] == before["done"]


def test_two_streams_at_once_both_finish_alike_for_one_seed(server) -> None:
    finals, overlap = {}, threading.Barrier(2, timeout=30)

    def follow(name: str) -> None:
        connection, response = _open_stream(server, "page=sample&n=2&seed=7")
        kind, data = _next_event(response)
        overlap.wait()  # both have a first frame before either is done
        while kind == "frame":
            last, (kind, data) = data, _next_event(response)
        assert kind == "done"
        finals[name] = last["image"]
        connection.close()

    threads = [threading.Thread(target=follow, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(finals) == {"a", "b"} and finals["a"] == finals["b"]  # each job its generator


def test_only_the_pages_own_files_are_served_and_it_binds_localhost(server) -> None:
    host, port = server.host_port
    assert host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "run"]).host == "127.0.0.1"
    attempts = [
        "/static/../x", "/static/%2e%2e/%2e%2e/etc/passwd", "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static//etc/passwd", "/static/..%2fplayground.py", "/static/%2fetc%2fpasswd",
        "//etc/passwd", "/etc/passwd", "/static/playground.js/../../server.py",
        "/static/" + "..%5c" * 3 + "etc%5cpasswd", "/static/%252e%252e/playground.py",
        "/api/../../etc/passwd", "/run.json", "/model.safetensors", "/config.json",
        f"http://{host}:{port}/static/../../etc/passwd", "/static/C:%5cWindows%5cwin.ini",
    ]  # fmt: skip
    for path in attempts:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 404, (path, response.status)
        assert b"root:" not in body and b"import" not in body
        connection.close()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/static/playground.js")
    assert connection.getresponse().status == 200


def _request(server: ServerProcess, method: str, path: str, headers: dict, body: bytes = b""):
    connection = http.client.HTTPConnection(*server.host_port, timeout=30)
    connection.request(method, path, body=body or None, headers=headers)
    response = connection.getresponse()
    return connection, response


def test_other_hosts_and_other_sites_start_no_generation(server) -> None:
    """A hostile page, after DNS rebinding or from its own origin, can neither start a
    generation (taking one of the server's slots) nor upload; the page's own requests can."""
    host, port = server.host_port
    before = _jobs(server)
    upload = (
        b"--x\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n"
        b"Content-Type: image/png\r\n\r\n" + _png(np.zeros((8, 8), np.uint8)) + b"\r\n--x--\r\n"
    )
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    attempts = [
        ({"Host": f"evil.example:{port}"}, 421, "--host evil.example"),
        ({"Host": "evil.example"}, 421, f"http://127.0.0.1:{port}/"),
        ({"Origin": "http://evil.example"}, 403, "another site"),
        ({"Origin": f"http://localhost:{port + 1}"}, 403, "another site"),
        ({"Sec-Fetch-Site": "cross-site"}, 403, f"http://{host}:{port}/"),
    ]
    for headers, status, needle in attempts:
        for method, path, body, extra in [
            ("GET", "/api/stream?page=sample&n=64", b"", {}),
            ("POST", "/api/upload?page=complete", upload, form),
        ]:
            connection, response = _request(server, method, path, {**headers, **extra}, body)
            assert response.status == status, (headers, path)
            assert needle in json.loads(response.read())["error"]
            connection.close()
    assert _jobs(server) == before  # nothing ran, nothing waits
    own = {"Origin": f"http://{host}:{port}", "Sec-Fetch-Site": "same-origin"}
    connection, response = _request(
        server, "POST", "/api/upload?page=complete", {**own, **form}, upload
    )
    assert response.status == 200 and "8x8" in json.loads(response.read())["note"]
    connection.close()
    connection, response = _request(server, "GET", "/api/stream?page=sample&n=1", own)
    assert response.status == 200 and _next_event(response)[0] == "frame"
    connection.close()


def test_an_upload_body_that_stalls_is_refused(server) -> None:
    import socket

    host, port = server.host_port
    with socket.create_connection((host, port), timeout=20) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST /api/upload?page=complete HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
            "--x\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in data
    assert time.monotonic() - started < 8.0  # the server gives up after 5 s


def test_sigterm_cancels_the_generations_and_stops_as_ctrl_c_does(slow_run) -> None:
    import signal

    process = ServerProcess("serve", str(slow_run))
    try:
        connection, response = _open_stream(process, "page=sample&n=64")
        assert _next_event(response)[0] == "frame"
        code = process.stop(signal.SIGTERM)
        kind, _ = _next_event(response)
        while kind == "frame":
            kind, _ = _next_event(response)
        assert kind == "cancelled"  # the job stopped mid-way, and the page was told
        connection.close()
    finally:
        process.kill()
    lines = process.lines()
    assert code == 0, lines
    assert [line for line in lines if "stopped serving" in line] == [
        f"stopped serving the playground of {slow_run}"
    ]
    assert not [line for line in lines if "Traceback" in line], lines


# ------------------------------------------------------------------------------ in a browser


def test_the_page_in_a_browser_samples_and_completes_an_upload(server, tmp_path) -> None:
    from playwright.sync_api import expect

    from .browser import browser, screenshot

    digit = tmp_path / "digit.png"
    digit.write_bytes(_png(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))))
    colour = tmp_path / "colour.png"
    colour.write_bytes(_png(np.full((10, 10, 3), (30, 30, 200), np.uint8)))
    with browser() as chromium:
        page = chromium.new_page(viewport={"width": 1000, "height": 800})
        errors = []

        def console(message) -> None:  # a refused request is logged too: the page shows it
            if message.type == "error" and "Failed to load resource" not in message.text:
                errors.append(message.text)

        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("console", console)
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]")
        expect(page.locator("#facts")).to_contain_text(f"1×{SLOW_SIDE}×{SLOW_SIDE}")
        expect(page.locator("#tab-upscale")).to_be_hidden()
        expect(page.locator("#page-sample .guidance")).to_be_hidden()  # unconditional
        expect(page.locator("footer")).to_contain_text("pixelated")

        sample = page.locator("#page-sample")
        sample.locator("[name=n]").fill("4")
        sample.locator("button[type=submit]").click()
        expect(sample.locator(".result")).to_have_attribute("data-state", "done", timeout=30_000)
        expect(sample.locator(".status")).to_contain_text("done in")
        assert sample.locator(".output").get_attribute("src").startswith("data:image/png;base64,")
        screenshot(page, "playground", tmp_path)

        page.click("#tab-complete")
        complete = page.locator("#page-complete")
        expect(complete.locator(".preview")).to_be_visible()  # test image 0
        complete.locator(".file").set_input_files(str(colour))
        expect(complete.locator(".source-note")).to_contain_text("3 channels")
        expect(complete.locator(".source-note")).to_have_class("source-note error")
        complete.locator(".file").set_input_files(str(digit))
        expect(complete.locator(".source-note")).to_contain_text(f"resized to {SLOW_SIDE}x")
        complete.locator("[name=n]").fill("2")
        complete.locator("button[type=submit]").click()
        expect(complete.locator(".result")).to_have_attribute("data-state", "done", timeout=30_000)
        assert complete.locator(".output").get_attribute("src").startswith("data:image/png")
        screenshot(page, "playground-complete", tmp_path)

        # closing a tab mid-generation cancels its work on the server
        before = _jobs(server)
        tab = chromium.new_page()
        tab.goto(server.url)
        tab.wait_for_selector("body[data-ready=true]")
        tab.locator("#page-sample [name=n]").fill("64")
        tab.locator("#page-sample button[type=submit]").click()
        expect(tab.locator("#page-sample .status")).to_contain_text("step", timeout=30_000)
        assert _jobs(server)["running"] == 1
        tab.close()
        closed = time.monotonic()
        while _jobs(server)["running"] and time.monotonic() - closed < 5:
            time.sleep(0.02)
        after = _jobs(server)
        assert after["running"] == 0 and time.monotonic() - closed < 2.0
        assert after["cancelled"] == before["cancelled"] + 1 and after["done"] == before["done"]
    assert not errors, errors


def test_the_page_in_a_browser_guides_a_class_dropout_model_as_asked(cond_run) -> None:
    """The sample and complete pages show the guidance weight of a class-dropout model (its
    default, as the verbs use) and send what the user sets."""
    from playwright.sync_api import expect

    from .browser import browser

    model = open_model(str(cond_run), CPU)
    nines = torch.full((2,), 9)
    expected, default = (
        model.sample(2, labels=nines, generator=torch.Generator().manual_seed(5), guidance=w)
        for w in (tasks.MAX_GUIDANCE, GUIDANCE)
    )
    assert not torch.equal(expected, default)  # so the page must send the weight set
    with ServerProcess("serve", str(cond_run)) as server, browser() as chromium:
        page = chromium.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]")
        sample = page.locator("#page-sample")
        weight = sample.locator("[name=guidance]")
        expect(weight).to_be_visible()
        expect(weight).to_have_value(f"{GUIDANCE:g}")
        expect(page.locator("#page-complete [name=guidance]")).to_be_enabled()
        sample.locator("[name=n]").fill("2")
        sample.locator("[name=seed]").fill("5")
        sample.locator("[name=label]").select_option("9")
        weight.fill(f"{tasks.MAX_GUIDANCE:g}")
        sample.locator("button[type=submit]").click()
        expect(sample.locator(".result")).to_have_attribute("data-state", "done", timeout=30_000)
        shown = _pixels(sample.locator(".output").get_attribute("src"))
    assert np.array_equal(shown, np.asarray(make_grid(expected)))
    assert not errors, errors
