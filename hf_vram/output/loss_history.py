"""OUTPUT_DIR/loss_history.jsonl of a loop that is not a Trainer: one line per optimizer step. The losses stay on
the device until flushed (when the loop logs, checkpoints or ends), so the loop never waits for the GPU to read a
loss; a resumed run keeps the lines of the steps before its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_text


class LossHistory:
    def __init__(self, output_dir: Path, resumed_step: int, main: bool):
        self.path, self.main = Path(output_dir) / "loss_history.jsonl", main
        self.lines: list[dict] = []  # {"step", "loss", "lr"} of every step so far
        if self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            self.lines = [json.loads(line) for line in lines][:resumed_step]
        if main:
            atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.lines))
        self._pending: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """The mean loss (a 0-d tensor, not read yet) of optimizer step `step` and its learning rate."""
        self._pending.append((step, loss.detach(), lr))

    def flush(self) -> list[tuple[int, float, float]]:
        """Read the pending losses (one device sync), append them to the file; returns (step, loss, lr) of each."""
        if not self._pending:
            return []
        losses = torch.stack([loss.float() for _, loss, _ in self._pending]).tolist()
        done = [(step, loss, lr) for (step, _, lr), loss in zip(self._pending, losses)]
        self._pending.clear()
        lines = [{"step": step, "loss": loss, "lr": lr} for step, loss, lr in done]
        self.lines += lines
        if self.main:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(e) + "\n" for e in lines)
        return done

    @property
    def values(self) -> list[float]:
        return [e["loss"] for e in self.lines]
