"""What a running training shows from outside (the UI, `cat`): OUTPUT_DIR/progress.json, rewritten whole at every
log (the step, the steps in all, the seconds so far and the estimated seconds left, from the steps of this
process alone: a resumed run does not count the steps of the run before), and OUTPUT_DIR/log_history.jsonl, one
line per Trainer log (what trainer_state.json holds only at checkpoints)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from data_prep.atomic import atomic_write_json

PROGRESS = "progress.json"
LOG_LINES = "log_history.jsonl"


def write_progress(output_dir: Path, step: int, max_steps: int, started: float, first_step: int) -> None:
    elapsed = time.time() - started
    done = step - first_step
    left = (max_steps - step) * elapsed / done if done > 0 else None
    atomic_write_json(Path(output_dir) / PROGRESS, {"step": step, "max_steps": max_steps,
                                                    "elapsed_seconds": round(elapsed, 1),
                                                    "eta_seconds": round(left, 1) if left is not None else None})


def read_progress(output_dir: Path) -> dict | None:
    path = Path(output_dir) / PROGRESS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Progress(TrainerCallback):
    def __init__(self, output_dir: Path):
        self.output_dir, self.started, self.first_step = Path(output_dir), time.time(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.time(), state.global_step
        if state.is_world_process_zero:
            (self.output_dir / LOG_LINES).write_text("".join(json.dumps(e) + "\n" for e in state.log_history))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs is not None:
            with open(self.output_dir / LOG_LINES, "a") as f:
                f.write(json.dumps({**logs, "step": state.global_step}) + "\n")
            write_progress(self.output_dir, state.global_step, state.max_steps, self.started, self.first_step)
