"""Stop a run at the first non-finite loss, naming the step, instead of training on garbage."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from hf_vram.errors import TrainingStopped


class GuardedSFTTrainer(SFTTrainer):
    """trl's SFTTrainer, checking every micro-batch's loss. The Trainer only filters NaN out of its logs."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingStopped(
                f"loss is {loss.item()} at step {self.state.global_step + 1}; lower train.lr, check the data, or use "
                f"train.precision: fp32. Re-running resumes from the last complete checkpoint in {self.args.output_dir}"
            )
        return loss
