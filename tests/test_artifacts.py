from __future__ import annotations

import errno

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


def test_stale_temps_from_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".model-abc.onnx.123.tmp").write_bytes(b"partial")
    (tmp_path / "model-abc.onnx").write_bytes(b"done")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model-abc.onnx"]
