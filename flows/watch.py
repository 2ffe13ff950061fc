"""Watch a folder for new checkpoints and announce each new content once as a Prefect event.

    yoloq watch FOLDER [--once] [--interval 30] [--state FOLDER/.yoloq-watch.json]

Event `yoloq.checkpoint.created`, resource `yoloq.checkpoint.<sha256>`, payload {path, sha256, size_bytes}. The
`yoloq-quantize` deployment's trigger (flows/deploy.py) starts a quantize run with that path. The state file is
updated only after the event was sent, so a failed send is retried at the next scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prefect.events import emit_event

from yoloq.checkpoints import Checkpoint, load_seen, new_checkpoints, save_seen

CHECKPOINT_EVENT = "yoloq.checkpoint.created"


def announce(checkpoint: Checkpoint) -> str:
    """Send the event; returns its id. Raises when Prefect did not accept it."""
    event = emit_event(
        event=CHECKPOINT_EVENT,
        resource={
            "prefect.resource.id": f"yoloq.checkpoint.{checkpoint.sha256}",
            "prefect.resource.name": checkpoint.path.name,
        },
        payload={"path": str(checkpoint.path), "sha256": checkpoint.sha256, "size_bytes": checkpoint.size_bytes},
    )
    if event is None:
        raise RuntimeError("Prefect did not send the event: set PREFECT_API_URL to a running Prefect server")
    return str(event.id)


def scan_once(folder: Path, state_path: Path, settle_s: float, say: Callable[[str], None] = print) -> list[Checkpoint]:
    seen = load_seen(state_path)
    announced = []
    for checkpoint in new_checkpoints(folder, seen, settle_s):
        event_id = announce(checkpoint)
        seen[checkpoint.sha256] = str(checkpoint.path)
        save_seen(state_path, seen)
        announced.append(checkpoint)
        say(f"new checkpoint {checkpoint.path} (sha256 {checkpoint.sha256[:12]}): event {event_id}")
    return announced


def watch(
    folder: Path, state_path: Path, interval_s: float, settle_s: float, once: bool, say: Callable[[str], None] = print
) -> int:
    """Scan every `interval_s` seconds (or once); returns how many checkpoints were announced."""
    total = 0
    say(f"watching {folder} for new .pt/.onnx every {interval_s:g} s (state {state_path})")
    while True:
        total += len(scan_once(folder, state_path, settle_s, say))
        if once:
            return total
        time.sleep(interval_s)
