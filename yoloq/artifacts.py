"""Content hashes and atomic writes: an output is named by what went into it and appears only when complete."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The content hash of a file; remembered per (path, size, mtime), so a run hashes each image once."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One hash over the contents of several files, in the given order (names do not matter)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def content_key(*parts: Any, length: int = 16) -> str:
    """A short stable hash of JSON-serialisable parts (hashes, settings) for naming outputs."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    A crash, a full disk or Ctrl-C leaves no file at `final`, so a half-written model or cache is never reused.
    The file gets the mode `open()` would give it (0666 minus the umask, so shared storage stays shared), and it is
    on disk before the rename and the rename itself after (the file and then its folder are fsynced).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(final)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise OSError(f"writing {final} produced no data")
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_folder(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _create_temp(final: Path) -> Path:
    """A new empty file `.<name>.<random>.tmp` beside `final`, created like `open(path, "x")` would (umask applies).

    Not `tempfile.mkstemp`: it creates 0600 files whatever the umask, and `os.replace` keeps that mode.
    """
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {final}: remove the .{final.name}.*.tmp files")


def _fsync_file(path: Path) -> None:
    """Flush `path`'s data to disk, whoever wrote it (a writer given only the path keeps no descriptor to sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable. Filesystems that cannot sync a folder (EINVAL, ENOTSUP) are skipped."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(final: Path, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return final


def atomic_write_text(final: Path, text: str) -> Path:
    return atomic_write_bytes(final, text.encode())


def atomic_write_json(final: Path, data: Any) -> Path:
    return atomic_write_text(final, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_figure(figure: Any, path: Path) -> Path:
    """A matplotlib figure as a PNG at `path` (laid out tight, written atomically), then closed."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6


STALE_TEMP_AGE_S = 3600.0
"""A temp file or folder untouched this long belongs to a run that died: a live run keeps writing to its own."""


def remove_stale_temps(folder: Path, max_age_s: float = STALE_TEMP_AGE_S, now: float | None = None) -> int:
    """Delete the temp files (`.*.tmp`) and folders (`.*.tmpdir`) an interrupted run left anywhere under `folder`.

    Only those not modified for `max_age_s` seconds (a folder: nothing inside it either) are removed, so the temps
    of a run still writing into the same cache are kept. Returns how many files and folders were removed.
    """
    if not folder.is_dir():
        return 0
    limit = (time.time() if now is None else now) - max_age_s
    removed = 0
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        for name in [d for d in dirs if _is_temp_name(d, ".tmpdir")]:
            dirs.remove(name)  # never descend into a temp folder: it is removed or kept as a whole
            path = here / name
            if _newest_mtime(path) < limit:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        for name in files:
            path = here / name
            if _is_temp_name(name, ".tmp") and _mtime(path) < limit:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _is_temp_name(name: str, suffix: str) -> bool:
    return name.startswith(".") and name.endswith(suffix) and len(name) > len(suffix) + 1


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:  # renamed into place or removed by its own run meanwhile
        return float("inf")


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of `folder` and everything inside it."""
    newest = _mtime(folder)
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            newest = max(newest, _mtime(Path(root) / name))
    return newest
