"""The trainers hf-vram runs, each with two additions: a run stops at the first non-finite loss, naming the step,
instead of training on garbage; held-out evaluation also reports perplexity (exp of the mean token loss).
Pretraining (transformers' Trainer) also logs a mixture of experts' router: its auxiliary loss and how evenly
tokens spread over the experts."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from transformers import Trainer
from trl import DPOTrainer, SFTTrainer

from hf_vram.errors import TrainingStopped
from hf_vram.train.cpu_fused_loss import cpu_fused_head


class _Guard:
    """On the CPU every micro-batch's loss is checked at once. On a GPU, reading the loss would make the CPU wait
    for the GPU every micro-batch (64 per step in the GPT-2 recipes) and stop it from queueing the next kernels,
    so a flag stays on the device and is read when the trainer logs or saves: a non-finite loss is never
    written into a checkpoint, and the run stops at most train.logging_steps later."""

    _finite = None  # device-side: all losses since the last check were finite
    _checked_step = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        if loss.device.type == "cpu":
            self._stop_if_not_finite(loss)
        return loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        # On the CPU, trl's fused LM head runs hf-vram's chunked function (train/cpu_fused_loss.py) in these trainers.
        with cpu_fused_head():
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _stop_if_not_finite(self, loss=None):
        if self._finite is None:
            return
        finite, self._finite = bool(self._finite), None
        first, self._checked_step = self._checked_step + 1, self.state.global_step + 1
        if not finite:
            at = f"at step {first}" if loss is not None else f"between steps {first} and {self.state.global_step + 1}"
            value = f"loss is {loss.item()}" if loss is not None else "the loss became inf or nan"
            raise TrainingStopped(
                f"{value} {at}; lower train.lr, check the data, or use train.precision: fp32. Re-running resumes "
                f"from the last complete checkpoint in {self.args.output_dir}"
            )

    def log(self, logs, *args, **kwargs):
        self._stop_if_not_finite()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        self._stop_if_not_finite()
        return super()._save_checkpoint(*args, **kwargs)


class _Perplexity:
    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if "eval_loss" in metrics:
            # The Trainer logs eval_loss only; a language model's figure of merit is its perplexity.
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
            self.log({"eval_perplexity": metrics["eval_perplexity"]})
        return metrics


class GuardedDPOTrainer(_Guard, DPOTrainer):
    pass


def expert_load(router_logits, top_k: int) -> torch.Tensor:
    """Fraction of the routed token slots each expert received, per layer: (layers, experts); 1/experts each when
    perfectly balanced. router_logits: one (tokens, experts) tensor per layer, as Mixtral returns them."""
    loads = []
    for logits in router_logits:
        chosen = logits.detach().float().topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        loads.append(counts / counts.sum())
    return torch.stack(loads)


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


class GuardedSFTTrainer(_TwoStage, _Guard, _Perplexity, SFTTrainer):
    pass


class GuardedTrainer(_TwoStage, _Guard, _Perplexity, Trainer):
    """transformers' Trainer for pretraining from token shards. For a mixture of experts (a config with
    output_router_logits, so that the model adds its load-balancing loss to the loss), the auxiliary loss and
    the expert load are averaged over the steps between two logs: `moe_aux_loss`, and `moe_load_max` /
    `moe_load_min`, the busiest and idlest expert's share over the balanced share (1.0 = perfectly even)."""

    # Set by hf_vram/train/savings.py: trl's fused LM head scores the training loss (the logits never exist whole),
    # and the context each training step runs in (activation offloading), as trl's own trainers have it.
    fused_loss = False
    maybe_activation_offload_context = nullcontext()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._moe: list[torch.Tensor] = []

    def training_step(self, *args, **kwargs):
        with self.maybe_activation_offload_context:
            return super().training_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_loss and model.training:
            # The same loss as the model's own (summed over the shifted labels, divided by num_items_in_batch).
            inputs = {**inputs, "fused_lm_head": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = getattr(outputs, "aux_loss", None)
        config = self.model.config
        if aux is not None and model.training and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # The model adds coef * aux to a cross-entropy already divided by the tokens of the whole optimizer step,
            # so the Trainer neither divides this loss by grad_accum nor leaves it unscaled across processes (it
            # multiplies by their number): left alone, the router's loss would weigh coef x grad_accum x processes.
            # Weighted once per optimizer step instead, averaged over micro-batches and ranks.
            processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = loss - config.router_aux_loss_coef * aux.to(loss.device) * (
                processes - 1 / self.current_gradient_accumulation_steps)
        if aux is not None and model.training and getattr(outputs, "router_logits", None):
            experts = getattr(config, "num_local_experts", None) or config.num_experts
            load = expert_load(outputs.router_logits, config.num_experts_per_tok) * experts
            # Kept as tensors until the next log: .item() every step would wait for the GPU each time.
            self._moe.append(torch.stack([aux.detach().float(), load.max(), load.min()]))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if self._moe and "loss" in logs:
            means = torch.stack(self._moe).mean(0).tolist()
            logs["moe_aux_loss"], logs["moe_load_max"], logs["moe_load_min"] = (round(v, 4) for v in means)
            self._moe.clear()
        super().log(logs, *args, **kwargs)
