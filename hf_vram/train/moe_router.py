"""A mixture of experts' router during pretraining with transformers' Trainer: its auxiliary (load-balancing) loss
weighted once per optimizer step, and the loss and the expert load logged."""

from __future__ import annotations

import torch


def expert_load(router_logits, top_k: int) -> torch.Tensor:
    """Fraction of the routed token slots each expert received, per layer: (layers, experts); 1/experts each when
    perfectly balanced. router_logits: one (tokens, experts) tensor per layer, as Mixtral returns them."""
    loads = []
    for logits in router_logits:
        chosen = logits.detach().float().topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        loads.append(counts / counts.sum())
    return torch.stack(loads)


class RouterLoss:
    """Trainer mixin. For a model whose config has output_router_logits (it adds its load-balancing loss to the
    loss), the auxiliary loss and the expert load are averaged over the steps between two logs: `moe_aux_loss`, and
    `moe_load_max` / `moe_load_min`, the busiest and idlest expert's share over the balanced share (1.0 = even)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._moe: list[torch.Tensor] = []

    def rescale_aux_loss(self, model, loss, outputs, num_items_in_batch):
        aux = getattr(outputs, "aux_loss", None)
        if aux is None or not model.training:
            return loss
        config = self.model.config
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # transformers 5.24 (Trainer.training_step and Trainer.compute_loss; tests/test_library_workarounds.py::
            # test_trainer_leaves_a_moe_models_aux_loss_unscaled_by_grad_accum_and_multiplies_it_by_processes): a
            # model that accepts loss kwargs returns cross-entropy / num_items_in_batch (the tokens of the whole
            # optimizer step) + coef * aux; training_step does not divide it by grad_accum, and compute_loss
            # multiplies it by the number of processes under average_tokens_across_devices. Left alone, the router's
            # loss would weigh coef x grad_accum x processes; weighted once per optimizer step instead, averaged over
            # micro-batches and ranks.
            processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = loss - config.router_aux_loss_coef * aux.to(loss.device) * (
                processes - 1 / self.current_gradient_accumulation_steps)
        if getattr(outputs, "router_logits", None):
            experts = getattr(config, "num_local_experts", None) or config.num_experts
            load = expert_load(outputs.router_logits, config.num_experts_per_tok) * experts
            # Kept as tensors until the next log: .item() every step would wait for the GPU each time.
            self._moe.append(torch.stack([aux.detach().float(), load.max(), load.min()]))
        return loss

    def log(self, logs: dict, *args, **kwargs):
        if self._moe and "loss" in logs:
            means = torch.stack(self._moe).mean(0).tolist()
            logs["moe_aux_loss"], logs["moe_load_max"], logs["moe_load_min"] = (round(v, 4) for v in means)
            self._moe.clear()
        super().log(logs, *args, **kwargs)
