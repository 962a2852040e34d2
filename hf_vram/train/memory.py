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


class MemoryLog(TrainerCallback):
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / "memory.jsonl"

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **memory_now()}) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and torch.cuda.is_available():
            logs["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
