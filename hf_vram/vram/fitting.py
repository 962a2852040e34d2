"""Fitting a recipe to a card: the smallest change of batch, checkpointing and optimizer that makes its plan fit
(every planner's --fit, and preflight's train.auto_fit)."""

from __future__ import annotations

from hf_vram.vram.estimate import OPTIMIZERS_8BIT, Plan


def fit_search(recipe, plan_of, optimizer_8bit: str = "paged_adamw_8bit") -> tuple[list[str], Plan]:
    """The smallest change that makes the recipe fit: the largest micro-batch that fits (the global batch kept
    through gradient accumulation), then gradient checkpointing, then an 8-bit optimizer. plan_of(recipe) plans a
    candidate. Returns the overrides (empty when the recipe fits as it is, at its largest micro-batch) and the plan
    they give."""
    t = recipe.train
    global_batch = t.micro_batch_size * t.grad_accum
    # trl's KTOTrainer refuses a micro-batch of 1 (its KL reference pairs each answer with another sample's prompt).
    least = 2 if recipe.task == "kto" else 1
    micros = [m for m in range(global_batch, 0, -1) if global_batch % m == 0 and m >= least]
    stages = [{}]
    if not t.gradient_checkpointing:
        stages.append({"gradient_checkpointing": True})
    if t.optimizer not in OPTIMIZERS_8BIT:
        stages.append({**stages[-1], "optimizer": optimizer_8bit})
    last = None
    for stage in stages:
        for micro in micros:
            change = {**stage, "micro_batch_size": micro, "grad_accum": global_batch // micro}
            last = plan_of(recipe.model_copy(update={"train": t.model_copy(update=change)}))
            if last.fits:
                return [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items() if getattr(t, k) != v], last
    return [], last
