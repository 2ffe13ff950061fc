"""Find new checkpoints in a folder by content: each `.pt`/`.onnx` is announced once per sha256.

The state file (JSON, written atomically) maps sha256 -> the first path seen with that content, so a copy or a
rename of a checkpoint already announced is not announced again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from yoloq.artifacts import atomic_write_json, file_sha256, read_json
from yoloq.errors import InputError

CHECKPOINT_SUFFIXES = (".pt", ".onnx")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str
    size_bytes: int


def load_seen(state_path: Path) -> dict[str, str]:
    if not state_path.is_file():
        return {}
    try:
        data = read_json(state_path)
    except ValueError as exc:
        raise InputError(f"watch state {state_path} is not valid JSON ({exc}): fix or delete it") from exc
    return dict(data.get("seen", {}))


def save_seen(state_path: Path, seen: dict[str, str]) -> None:
    atomic_write_json(state_path, {"seen": seen})


def new_checkpoints(folder: Path, seen: dict[str, str], settle_s: float = 5.0) -> list[Checkpoint]:
    """Checkpoints in `folder` (not recursive) whose content is not in `seen`, oldest first.

    Files modified in the last `settle_s` seconds are left for the next scan (they may still be being written);
    so are hidden and temporary files. Two files with the same content in one scan count once."""
    if not folder.is_dir():
        raise InputError(f"watch folder {folder} does not exist: create it or pass another folder")
    now = time.time()
    found: list[Checkpoint] = []
    candidates = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES),
        key=lambda p: (p.stat().st_mtime, p.name),
    )
    hashes = set(seen)
    for path in candidates:
        stat = path.stat()
        if path.name.startswith(".") or now - stat.st_mtime < settle_s or stat.st_size == 0:
            continue
        digest = file_sha256(path)
        if digest in hashes:
            continue
        hashes.add(digest)
        found.append(Checkpoint(path.resolve(), digest, stat.st_size))
    return found


def inside_folder(path: Path, folder: Path) -> Path:
    """`path` with symlinks and `..` resolved, when it lies inside `folder` (resolved too); else InputError.

    For paths that come from outside (an event payload, a deployment parameter): a checkpoint announced from the
    watched folder resolves inside it; a path that leaves it, directly, through `..` or through a symlink, does not."""
    resolved, root = path.resolve(), folder.resolve()
    if not resolved.is_relative_to(root):
        shown = str(path) if resolved == path else f"{path} (resolves to {resolved})"
        raise InputError(
            f"model {shown} is outside the watched folder {root}: this deployment quantizes only checkpoints in "
            "that folder (or the model.path of its params.yaml)"
        )
    return resolved
