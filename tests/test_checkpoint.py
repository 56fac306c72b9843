"""Atomic writes: permissions, full disks, the older checkpoint copy, and pretrained folders."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from imagetransformer import checkpoint, files
from imagetransformer.checkpoint import (
    CHECKPOINT_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    atomic_write_bytes,
    load_checkpoint,
    load_state_checked,
    read_pretrained,
    save_checkpoint,
    save_pretrained,
)
from imagetransformer.errors import UserError
from imagetransformer.model import ImageTransformer

from .helpers import tiny_config


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one after it."""
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _state(step: int) -> dict:
    return {"format": 1, "step": step, "model": {"w": torch.full((3,), float(step))}}


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_respects_the_umask(tmp_path, umask, mask) -> None:
    umask(mask)
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert _mode(path) == 0o666 & ~mask
    save_checkpoint(tmp_path / CHECKPOINT_FILE, _state(1))
    save_checkpoint(tmp_path / CHECKPOINT_FILE, _state(2))
    assert _mode(tmp_path / CHECKPOINT_FILE) == 0o666 & ~mask
    assert _mode(tmp_path / PREVIOUS_CHECKPOINT_FILE) == 0o666 & ~mask


def test_umask_is_read_without_proc(tmp_path, umask, monkeypatch) -> None:
    monkeypatch.setattr(files, "_PROC_STATUS", str(tmp_path / "no-such-file"))
    for mask in (0o002, 0o022):
        umask(mask)
        assert files.current_umask() == mask
        assert files.current_umask() == mask  # reading it left it as it was
        atomic_write_bytes(tmp_path / "file.bin", b"x")
        assert _mode(tmp_path / "file.bin") == 0o666 & ~mask


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(UserError, match="intact"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_full_disk_in_save_checkpoint_names_the_intact_step(tmp_path, monkeypatch) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(3))
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(UserError) as info:
        save_checkpoint(path, _state(6), previous_step=3)
    message = str(info.value)
    assert str(path) in message and "the checkpoint of step 3 is intact" in message
    assert "train --resume" in message and "\n" not in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    with pytest.raises(UserError, match="the previous checkpoint, if any, is intact"):
        save_checkpoint(path, _state(6))


def test_full_disk_while_keeping_the_older_copy(tmp_path, monkeypatch) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(3))
    before = path.read_bytes()
    real_write_temp = checkpoint._write_temp
    calls = []

    def write_temp(target, write):
        calls.append(target.name)
        if target.name == PREVIOUS_CHECKPOINT_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_temp(target, write)

    monkeypatch.setattr(os, "link", _no_space)  # no hard links: the copy fallback runs
    monkeypatch.setattr(checkpoint, "_write_temp", write_temp)
    with pytest.raises(UserError, match="step 3 is intact"):
        save_checkpoint(path, _state(6), previous_step=3)
    assert calls == [CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "copy"])
def test_second_save_keeps_the_first_as_prev(tmp_path, monkeypatch, links) -> None:
    if not links:
        monkeypatch.setattr(os, "link", _no_space)
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(1))
    assert not (tmp_path / PREVIOUS_CHECKPOINT_FILE).exists()
    first = path.read_bytes()
    save_checkpoint(path, _state(2), previous_step=1)
    assert (tmp_path / PREVIOUS_CHECKPOINT_FILE).read_bytes() == first
    assert load_checkpoint(path)["step"] == 2
    save_checkpoint(path, _state(3), previous_step=2)
    prev = torch.load(tmp_path / PREVIOUS_CHECKPOINT_FILE, weights_only=True)
    assert prev["step"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE}


def test_checkpoint_path_is_present_during_the_save(tmp_path, monkeypatch) -> None:
    """Between rotating the older copy and the final rename, both names hold the old step."""
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(1))
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == path:
            seen.append(torch.load(path, weights_only=True)["step"])
            seen.append(torch.load(tmp_path / PREVIOUS_CHECKPOINT_FILE, weights_only=True)["step"])
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(path, _state(2))
    assert seen == [1, 1]


def test_corrupt_checkpoint_falls_back_to_prev(tmp_path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(3))
    save_checkpoint(path, _state(6), previous_step=3)
    path.write_bytes(b"\x00garbage, not a zip archive" * 10)
    with pytest.warns(UserWarning) as record:
        state = load_checkpoint(path)
    assert state["step"] == 3
    assert len(record) == 1
    message = str(record[0].message)
    assert CHECKPOINT_FILE in message and PREVIOUS_CHECKPOINT_FILE in message
    assert "step 3" in message and "\n" not in message
    # the next save keeps the good older copy rather than rotating the corrupt file onto it
    save_checkpoint(path, _state(4), previous_step=3)
    assert load_checkpoint(path)["step"] == 4
    assert torch.load(tmp_path / PREVIOUS_CHECKPOINT_FILE, weights_only=True)["step"] == 3


def test_flipped_byte_is_caught_by_the_archive_checksums(tmp_path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(3))
    save_checkpoint(path, {**_state(6), "model": {"w": torch.ones(50_000)}}, previous_step=3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would accept it
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert load_checkpoint(path)["step"] == 3


def test_missing_checkpoint_falls_back_to_prev(tmp_path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(3))
    save_checkpoint(path, _state(6), previous_step=3)
    path.unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert load_checkpoint(path)["step"] == 3


def test_both_corrupt_is_a_user_error(tmp_path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _state(3))
    save_checkpoint(path, _state(6), previous_step=3)
    path.write_bytes(b"garbage")
    (tmp_path / PREVIOUS_CHECKPOINT_FILE).write_bytes(b"more garbage")
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert CHECKPOINT_FILE in message and PREVIOUS_CHECKPOINT_FILE in message
    assert "corrupt" in message


def test_single_corrupt_checkpoint_is_a_user_error(tmp_path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"checkpoint\.pt is corrupt"):
        load_checkpoint(path)


def test_no_checkpoint_at_all(tmp_path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)


def test_read_pretrained_round_trip(tmp_path) -> None:
    model = ImageTransformer(tiny_config()).eval()
    save_pretrained(model, tmp_path)
    config, state = read_pretrained(tmp_path)
    assert config == model.config
    rebuilt = ImageTransformer(config).eval()
    load_state_checked(rebuilt, state, tmp_path / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_save_pretrained_with_a_state_dict_override(tmp_path) -> None:
    model = ImageTransformer(tiny_config())
    averaged = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    save_pretrained(model, tmp_path, state_dict=averaged)
    _, state = read_pretrained(tmp_path)
    assert all(not v.any() for v in state.values())
    assert set(state) == set(model.state_dict())


def test_read_pretrained_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="config.json not found"):
        read_pretrained(tmp_path)
    save_pretrained(ImageTransformer(tiny_config()), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="corrupt"):
        read_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not saved weights"):
        read_pretrained(tmp_path)


def test_no_import_cycle() -> None:
    source = Path(checkpoint.__file__).read_text()
    assert "from .model" not in source and "import model" not in source
    assert not hasattr(checkpoint, "load_pretrained")
