"""New-checkpoint detection by content: copies and renames of an announced checkpoint are not new."""

from __future__ import annotations

import os
import time

import pytest

from yoloq.checkpoints import load_seen, new_checkpoints, save_seen
from yoloq.errors import InputError


def test_each_content_is_new_once(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"weights-1")
    (folder / "a-copy.pt").write_bytes(b"weights-1")
    (folder / "notes.txt").write_text("not a checkpoint")
    (folder / ".partial.pt").write_bytes(b"being written")
    found = new_checkpoints(folder, {}, settle_s=0)
    assert [c.path.name for c in found] in (["a.pt"], ["a-copy.pt"])  # one event for one content
    state = tmp_path / "state.json"
    save_seen(state, {c.sha256: str(c.path) for c in found})
    (folder / "renamed.pt").write_bytes(b"weights-1")
    (folder / "b.onnx").write_bytes(b"weights-2")
    assert [c.path.name for c in new_checkpoints(folder, load_seen(state), settle_s=0)] == ["b.onnx"]


def test_files_still_being_written_wait_for_the_next_scan(tmp_path):
    (tmp_path / "fresh.pt").write_bytes(b"x")
    assert new_checkpoints(tmp_path, {}, settle_s=60) == []
    old = time.time() - 120
    os.utime(tmp_path / "fresh.pt", (old, old))
    assert len(new_checkpoints(tmp_path, {}, settle_s=60)) == 1


def test_bad_folder_and_state_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        new_checkpoints(tmp_path / "missing", {})
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(InputError, match="fix or delete it"):
        load_seen(tmp_path / "state.json")


def test_watch_without_a_prefect_server_says_what_to_set(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["watch", str(tmp_path), "--once"]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err
