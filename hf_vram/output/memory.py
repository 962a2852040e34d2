"""Memory actually used, step by step: OUTPUT_DIR/memory.jsonl, one line per optimizer step.

On CUDA: allocated and reserved bytes now and at their peak since the run started (what `hf-vram plan`
predicts); on CPU: the process's resident memory. The peak also goes into the logged metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_now() -> dict:
    if torch.cuda.is_available():
        return {
            "cuda_allocated_bytes": torch.cuda.memory_allocated(),
            "cuda_reserved_bytes": torch.cuda.memory_reserved(),
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(),
        }
    return {"cpu_rss_bytes": _rss_bytes()}


def log_memory(output_dir: Path, step: int) -> None:
    """Append this optimizer step's line to OUTPUT_DIR/memory.jsonl (main process only)."""
    with open(Path(output_dir) / "memory.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **memory_now()}) + "\n")


class MemoryLog(TrainerCallback):
    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            log_memory(self.output_dir, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and torch.cuda.is_available():
            logs["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
