"""train_summary.json: written last into an output directory, so that its presence means the run finished."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_json

SUMMARY = "train_summary.json"
# lm-eval's scores (hf_vram/benchmarks/harness.py scores()): task -> {metric: value, METRIC_stderr: value, samples,
# dataset, split}, of the trained model (the recipe's eval.tasks) and of the starting one (eval.tasks_before).
LM_EVAL_AFTER = "lm_eval_after"
LM_EVAL_BEFORE = "lm_eval_before"
# What a task's entry carries besides its metrics.
SCORE_FACTS = ("samples", "dataset", "split")


def is_finished(output_dir: Path) -> bool:
    return (Path(output_dir) / SUMMARY).is_file()


def read_summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / SUMMARY).read_text())


def write_summary(output_dir: Path, summary: dict) -> None:
    atomic_write_json(Path(output_dir) / SUMMARY, summary)


def score_metrics(entry: dict) -> list[str]:
    """The metric names of one task's lm-eval scores (its stderrs and facts left out)."""
    return [k for k in entry if k not in SCORE_FACTS and "_stderr" not in k]


def score_stderr(entry: dict, metric: str) -> float | None:
    """A metric's standard error in the same entry: exact_match -> exact_match_stderr, as lm-eval names them (a
    metric read through a filter, exact_match,strict-match, has exact_match_stderr,strict-match)."""
    name, _, where = metric.partition(",")
    return entry.get(f"{name}_stderr" + (f",{where}" if where else ""))


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
