"""The lm-evaluation-harness tasks hf-vram ships: task YAML files (lm-eval's own format) beside the Python hooks
they name. `lm_eval --include_path` this folder to run them with lm-eval's own CLI; `hf-vram eval` and a recipe's
eval.tasks find them here first (hf_vram/benchmarks/tasks.py)."""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
