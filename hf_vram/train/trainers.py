"""The trainers hf-vram runs: trl's and transformers' own, each with these additions: a run stops at the first
non-finite loss, naming the step (hf_vram/output/finite.py); held-out evaluation also reports perplexity; on the
CPU trl's fused LM head runs hf-vram's chunked function; pretraining may use BitNet's two-stage schedule, trl's
fused LM head and activation offloading, and logs a mixture of experts' router (hf_vram/train/moe_router.py)."""

from __future__ import annotations

import math
from contextlib import nullcontext

from transformers import Trainer
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from hf_vram.output.finite import FiniteLossWatch
from hf_vram.train.cpu_fused_loss import cpu_fused_head
from hf_vram.train.moe_router import RouterLoss


class _StopOnNonFinite:
    """Every micro-batch's loss is recorded; the check runs at once on the CPU, and on a GPU when the trainer logs
    or saves, so a non-finite loss is never written into a checkpoint."""

    _watch: FiniteLossWatch | None = None

    @property
    def finite_watch(self) -> FiniteLossWatch:
        if self._watch is None:
            self._watch = FiniteLossWatch(self.args.output_dir)
        return self._watch

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.finite_watch.record(loss, self.state.global_step + 1)
        return loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        # On the CPU, trl's fused LM head runs hf-vram's chunked function (train/cpu_fused_loss.py) in these trainers.
        with cpu_fused_head():
            return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        self.finite_watch.check()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        # transformers 5.24's Trainer writes each checkpoint inside Trainer._save_checkpoint, entered before any of
        # its files exist: the check runs here before anything is written (tests/test_library_workarounds.py::
        # test_trainer_writes_every_checkpoint_through_save_checkpoint).
        self.finite_watch.check()
        return super()._save_checkpoint(*args, **kwargs)


class _Perplexity:
    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if "eval_loss" in metrics:
            # The Trainer logs eval_loss only; a language model's figure of merit is its perplexity.
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
            self.log({"eval_perplexity": metrics["eval_perplexity"]})
        return metrics


class _TwoStage:
    """train.lr_scheduler: two_stage (BitNet b1.58's schedule, hf_vram/models/bitnet.py), which transformers lacks;
    the runner adds the callback that drops weight decay in the second stage."""

    two_stage = False

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.two_stage and self.lr_scheduler is None:
            from hf_vram.models.bitnet import two_stage_schedule

            self.lr_scheduler = two_stage_schedule(optimizer or self.optimizer, num_training_steps,
                                                   self.args.get_warmup_steps(num_training_steps),
                                                   weight_decay=self.args.weight_decay)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)


class GuardedDPOTrainer(_StopOnNonFinite, DPOTrainer):
    pass


class GuardedKTOTrainer(_StopOnNonFinite, KTOTrainer):
    pass


class GuardedORPOTrainer(_StopOnNonFinite, ORPOTrainer):
    pass


class GuardedCPOTrainer(_StopOnNonFinite, CPOTrainer):
    """trl's CPO trainer, which the runner of task simpo gives the SimPO loss (builders/training_args.py)."""


class GuardedGRPOTrainer(_StopOnNonFinite, GRPOTrainer):
    """trl's GRPO trainer (task grpo): its loss is the policy-gradient term on sampled completions, recorded and
    checked as every other trainer's."""


class GuardedSFTTrainer(_TwoStage, _StopOnNonFinite, _Perplexity, SFTTrainer):
    pass


class GuardedTrainer(RouterLoss, _TwoStage, _StopOnNonFinite, _Perplexity, Trainer):
    """transformers' Trainer for pretraining from token shards."""

    # Set by hf_vram/train/savings.py: trl's fused LM head scores the training loss (the logits never exist whole),
    # and the context each training step runs in (activation offloading), as trl's own trainers have it.
    fused_loss = False
    maybe_activation_offload_context = nullcontext()

    def training_step(self, *args, **kwargs):
        with self.maybe_activation_offload_context:
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_loss and model.training:
            # The same loss as the model's own (summed over the shifted labels, divided by num_items_in_batch).
            inputs = {**inputs, "fused_lm_head": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.rescale_aux_loss(model, loss, outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss
