"""train_summary.json: written last into an output directory, so that its presence means the run finished."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_json

SUMMARY = "train_summary.json"


def is_finished(output_dir: Path) -> bool:
    return (Path(output_dir) / SUMMARY).is_file()


def read_summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / SUMMARY).read_text())


def write_summary(output_dir: Path, summary: dict) -> None:
    atomic_write_json(Path(output_dir) / SUMMARY, summary)


def peak_memory() -> dict:
    """Peak memory of this run on CUDA (a runner resets the statistics when training starts); on CPU the process's
    peak RSS, which includes any recipe dependency trained earlier in the same process."""
    if torch.cuda.is_available():
        return {
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(),
        }
    # Linux reports ru_maxrss in KiB.
    return {"cpu_process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
