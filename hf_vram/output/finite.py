"""A run stops at the first non-finite loss, naming the step, instead of training on garbage (and never writes such
weights into a checkpoint). Shared by the Trainer-based runners (hf_vram/train/trainers.py) and the diffusion loop."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_vram.errors import TrainingStopped


def _on_every_rank(finite: torch.Tensor) -> bool:
    """Whether the losses were finite on every process: all of them stop together, or none does (a process left
    running would wait in its next collective for the ones that stopped). Every rank checks at the same points."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = finite.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(finite)


class FiniteLossWatch:
    """On the CPU every loss is checked as it comes. On a GPU, reading the loss would make the CPU wait for the GPU
    every micro-batch (64 per step in the GPT-2 recipes) and stop it from queueing the next kernels, so a flag stays
    on the device and is read at the next check (when the run logs or saves): the run stops at most
    train.logging_steps later."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self._finite = None  # device-side: all losses since the last check were finite
        self._first = self._last = None  # the optimizer steps of the unchecked losses

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Note one micro-batch's loss of optimizer step `step` (1-based: the step it contributes to)."""
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        self._first, self._last = self._first or step, step
        if loss.device.type == "cpu":
            self.check(loss)

    def check(self, loss: torch.Tensor | None = None) -> None:
        """Raise TrainingStopped if a loss recorded since the last check was inf or nan."""
        if self._finite is None:
            return
        here = bool(self._finite)
        finite, first, last = _on_every_rank(self._finite), self._first, self._last
        self._finite = self._first = self._last = None
        if not finite:
            at = f"at step {last}" if loss is not None or first == last else f"between steps {first} and {last}"
            if here:
                value = "the loss of another process became inf or nan"
            else:
                value = f"loss is {loss.item()}" if loss is not None else "the loss became inf or nan"
            raise TrainingStopped(
                f"{value} {at}; lower train.lr, check the data, or use train.precision: fp32. Re-running resumes "
                f"from the last complete checkpoint in {self.output_dir}"
            )
