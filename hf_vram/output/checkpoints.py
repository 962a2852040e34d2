"""Checkpoints that survive a kill at any moment.

transformers' Trainer writes checkpoint-N in place and rotates old checkpoints before the new one is
finished, so a kill during a save can leave the newest checkpoint unreadable and the previous one gone.
hf-vram turns the Trainer's rotation off, marks a checkpoint complete (an atomically written file) only
after all its files are on disk, resumes only from marked checkpoints, and removes old ones only after a
newer one is marked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from data_prep.atomic import atomic_write_json, fsync_tree

COMPLETE_MARKER = "hf_vram_complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoint directory, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p, (p / COMPLETE_MARKER).is_file()))
    return sorted(found)


def latest_complete(output_dir: str | Path) -> Path | None:
    complete = [p for _, p, ok in checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def discard_incomplete(output_dir: str | Path) -> list[Path]:
    """Remove checkpoints a kill left half-written; they would otherwise be mistaken for resumable."""
    removed = []
    for _, path, ok in checkpoints(output_dir):
        if not ok:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def mark_complete(path: Path, step: int) -> None:
    """A checkpoint whose files are all written: flush them, then mark it complete (main process only)."""
    fsync_tree(path)
    atomic_write_json(path / COMPLETE_MARKER, {"step": step})


def rotate(output_dir: Path, keep: int) -> None:
    """Remove the complete checkpoints older than the newest `keep` (train.save_total_limit); called only after the
    newest one is marked."""
    complete = [p for _, p, ok in checkpoints(output_dir) if ok]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def completed_step(path: Path) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return json.loads((path / COMPLETE_MARKER).read_text())["step"]


class CommitCheckpoints(TrainerCallback):
    """After the Trainer saved checkpoint-N on every rank: flush, mark complete, then rotate."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its own RNG state file
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
            rotate(Path(args.output_dir), self.keep)
        return control
