from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from yoloq.artifacts import atomic_path, atomic_write_text, content_key, files_sha256, remove_stale_temps


def test_content_key_is_stable_and_order_sensitive():
    assert content_key("a", {"x": 1, "y": 2}) == content_key("a", {"y": 2, "x": 1})
    assert content_key("a", "b") != content_key("b", "a")


def test_files_hash_depends_on_content_not_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("same")
    b.write_text("same")
    assert files_sha256([a]) == files_sha256([b])
    b.write_text("other")
    assert files_sha256([a]) != files_sha256([b])


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    final = tmp_path / "model.onnx"
    with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
        tmp.write_bytes(b"half a model")
        raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_leaves_the_previous_file_untouched(tmp_path):
    final = atomic_write_text(tmp_path / "cache.json", "complete")
    with pytest.raises(OSError), atomic_path(final) as tmp:
        tmp.write_text("trunc")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert final.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_empty_output_is_refused(tmp_path):
    with pytest.raises(OSError, match="produced no data"), atomic_path(tmp_path / "x.onnx"):
        pass
    assert not (tmp_path / "x.onnx").exists()


def _age(path: Path, seconds: float) -> None:
    """Set `path`'s mtime `seconds` into the past."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_stale_temps_from_a_killed_run_are_removed_in_every_subfolder(tmp_path):
    # the cache keeps every output in a subfolder (export/, simplify/, calibration/, build/...)
    build = tmp_path / "build" / "trt"
    build.mkdir(parents=True)
    old_file = build / ".model-abc.engine.123.tmp"
    old_file.write_bytes(b"partial")
    _age(old_file, 7200)
    old_dir = tmp_path / "calibration" / ".ranges.tmpdir"
    old_dir.mkdir(parents=True)
    (old_dir / "part.npy").write_bytes(b"x")
    _age(old_dir / "part.npy", 7200)
    _age(old_dir, 7200)
    (build / "model-abc.engine").write_bytes(b"done")
    _age(build / "model-abc.engine", 7200)
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "build",
        "build/trt",
        "build/trt/model-abc.engine",
        "calibration",
    ]


def test_fresh_temps_of_a_concurrent_run_are_kept(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    fresh = folder / ".model.onnx.456.tmp"
    fresh.write_bytes(b"being written")
    fresh_dir = tmp_path / ".sens.tmpdir"
    fresh_dir.mkdir()
    (fresh_dir / "new.bin").write_bytes(b"x")  # the folder is old but a file in it is still being written
    _age(fresh_dir, 7200)
    assert remove_stale_temps(tmp_path) == 0
    assert fresh.exists() and (fresh_dir / "new.bin").exists()
    _age(fresh, 120)
    assert remove_stale_temps(tmp_path, max_age_s=60) == 1  # the age limit is an argument
    assert not fresh.exists()


def test_stale_temps_of_a_missing_folder_is_nothing(tmp_path):
    assert remove_stale_temps(tmp_path / "absent") == 0


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664)], ids=["umask-022", "umask-002"])
def test_outputs_get_the_mode_open_would_give_them(tmp_path, umask, mask, mode):
    umask(mask)
    written = atomic_write_text(tmp_path / "results.json", "{}")
    with atomic_path(tmp_path / "model.onnx") as tmp:
        with open(tmp, "wb") as handle:  # a writer that opens the path itself (onnx.save, torch.onnx.export)
            handle.write(b"model")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    assert stat.S_IMODE(written.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == mode


def test_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(tmp_path / "engine.plan") as tmp:
        tmp.write_bytes(b"engine")  # through the path: atomic_path must open and fsync it itself
    assert events == ["fsync file", "replace", "fsync folder"]
    assert (tmp_path / "engine.plan").read_bytes() == b"engine"
