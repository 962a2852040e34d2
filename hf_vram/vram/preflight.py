"""Before training on a GPU: the recipe's plan on this card, by its task's planner. It trains as it is when it fits,
fitted when train.auto_fit, and otherwise the run stops before loading anything, saying what to change."""

from __future__ import annotations

import dataclasses

from hf_vram.errors import UserError
from hf_vram.recipe.load import LoadedRecipe
from hf_vram.tasks import task_of
from hf_vram.vram.estimate import GiB
from hf_vram.vram.gpus import GPU
from hf_vram.vram.report import gib


def preflight(loaded: LoadedRecipe, gpu: GPU) -> LoadedRecipe:
    planner = task_of(loaded.recipe).make_planner()
    plan = planner.plan(loaded, gpu)
    if plan.fits:
        return loaded
    changes, fitted = planner.fit(loaded, gpu)
    over = f"{gib(plan.total - plan.usable)} over the {gib(plan.usable)} of {gpu.name}"
    if not changes or fitted is None or not fitted.fits:
        raise UserError(f"{loaded.name} is predicted to need {gib(plan.total)}, {over}, and no micro-batch, "
                        f"checkpointing or optimizer setting fits: {planner.fix_hint(loaded.recipe)}")
    if not loaded.recipe.train.auto_fit:
        raise UserError(f"{loaded.name} is predicted to need {gib(plan.total)}, {over}; it fits with: {' '.join(changes)} "
                        f"(add them to the command line, or set train.auto_fit: true); see `hf-vram plan {loaded.name} --fit`")
    print(f"[hf-vram] {loaded.name}: predicted {gib(plan.total)} does not fit {gpu.name}; auto_fit: {' '.join(changes)} "
          f"(predicted {gib(fitted.total)})", flush=True)
    import yaml

    update = {c.split("=", 1)[0].removeprefix("train."): yaml.safe_load(c.split("=", 1)[1]) for c in changes}
    train = loaded.recipe.train.model_copy(update=update)
    return dataclasses.replace(loaded, recipe=loaded.recipe.model_copy(update={"train": train}))


def current_gpu() -> GPU:
    """The CUDA device of this process as a planning target (its own memory; a known card's rate when named)."""
    import torch

    from hf_vram.vram.gpus import GPUS

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    known = next((g for g in GPUS.values() if g.name.split()[1] in props.name), None)
    return GPU(props.name, props.total_memory / GiB, known.bf16_tflops if known else 100.0,
               known.memory_gbps if known else 500.0)
