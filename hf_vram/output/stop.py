"""Stopping a run on request, with a checkpoint: `touch OUTPUT_DIR/STOP` (what the UI's stop button does). At the
end of the optimizer step that sees the file, the Trainer saves a checkpoint and stops; the run then ends with
TrainingStopped (no summary is written, so the output is not taken as finished), and the same command resumes
from that checkpoint. Every rank decides together (an all-reduce of the flag), so none is left in a collective."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

STOP_FILE = "STOP"


def request_stop(output_dir: Path) -> None:
    (Path(output_dir) / STOP_FILE).touch()


def clear_stop(output_dir: Path) -> None:
    """Called when a run starts: a request left from the run before is not this run's."""
    (Path(output_dir) / STOP_FILE).unlink(missing_ok=True)


def stop_requested(output_dir: Path) -> bool:
    """Whether any process sees the request (every process must call this at the same step)."""
    flag = (Path(output_dir) / STOP_FILE).is_file()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def stopped_message(step: int) -> str:
    return (f"stopped on request (OUTPUT_DIR/{STOP_FILE}) after step {step}: checkpoint-{step} is kept; run the "
            "same command again to resume from it")


class StopOnRequest(TrainerCallback):
    def __init__(self, output_dir: Path):
        self.output_dir, self.stopped_at = Path(output_dir), None

    def on_step_end(self, args, state, control, **kwargs):
        if stop_requested(self.output_dir):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
