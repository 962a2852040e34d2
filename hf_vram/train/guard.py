"""trl's trainers with two additions: a run stops at the first non-finite loss, naming the step, instead of
training on garbage; held-out evaluation also reports perplexity (exp of the mean token loss)."""

from __future__ import annotations

import math

import torch
from trl import DPOTrainer, SFTTrainer

from hf_vram.errors import TrainingStopped


class _Guard:
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise TrainingStopped(
                f"loss is {loss.item()} at step {self.state.global_step + 1}; lower train.lr, check the data, or use "
                f"train.precision: fp32. Re-running resumes from the last complete checkpoint in {self.args.output_dir}"
            )
        return loss


class GuardedSFTTrainer(_Guard, SFTTrainer):
    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if "eval_loss" in metrics:
            # The Trainer logs eval_loss only; a language model's figure of merit is its perplexity.
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
            self.log({"eval_perplexity": metrics["eval_perplexity"]})
        return metrics


class GuardedDPOTrainer(_Guard, DPOTrainer):
    pass
