"""The one table of the kinds of training: for each recipe `task`, the runner that trains it (setup -> train ->
save, hf_vram/runners/) and the planner that predicts its memory (hf_vram/vram/), or none where nothing trains on
the GPU. The CLI, the planner's table and preflight, and the dispatcher all read it; adding a kind of training is
one row here and one runner class.

Entries name their classes as "module:Class" and load them on first use, so that reading the table imports
nothing heavy (and nothing that imports this module back)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Task:
    name: str
    runner: str  # "module:Class" of its Runner
    planner: str | None  # "module:Class" of its Planner; None: nothing trains on the GPU
    describe: str  # "module:function": the one line `hf-vram validate` prints for a recipe of this task
    summary: str  # one line: what the task trains, for listings
    language_model: bool = False  # a causal LM is trained (its config bounds the adapter rank and the length)

    def runner_class(self):
        return _load(self.runner)

    def make_planner(self):
        return _load(self.planner)() if self.planner else None

    def description(self, loaded) -> str:
        return _load(self.describe)(loaded)


_LM_PLANNER = "hf_vram.vram.plan:LMPlanner"
_LM_DESCRIBE = "hf_vram.recipe.describe:describe_language_model"

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sft", "hf_vram.runners.lm:SFTRunner", _LM_PLANNER, _LM_DESCRIBE,
         "supervised fine-tuning on instructions, chats or text (trl SFTTrainer)", language_model=True),
    Task("dpo", "hf_vram.runners.lm:DPORunner", _LM_PLANNER, _LM_DESCRIBE,
         "preference tuning on chosen/rejected pairs (trl DPOTrainer)", language_model=True),
    Task("orpo", "hf_vram.runners.preference:ORPORunner", _LM_PLANNER, _LM_DESCRIBE,
         "preference tuning on chosen/rejected pairs, no reference model (trl ORPOTrainer)", language_model=True),
    Task("simpo", "hf_vram.runners.preference:SimPORunner", _LM_PLANNER, _LM_DESCRIBE,
         "preference tuning on chosen/rejected pairs, no reference model (trl CPOTrainer, SimPO loss)",
         language_model=True),
    Task("kto", "hf_vram.runners.preference:KTORunner", _LM_PLANNER, _LM_DESCRIBE,
         "preference tuning on answers judged desirable or undesirable (trl KTOTrainer)", language_model=True),
    Task("grpo", "hf_vram.runners.grpo:GRPORunner", _LM_PLANNER, _LM_DESCRIBE,
         "reinforcement learning from verifiable rewards on prompts with answers (trl GRPOTrainer)",
         language_model=True),
    Task("pretrain", "hf_vram.runners.lm:PretrainRunner", _LM_PLANNER, _LM_DESCRIBE,
         "a language model from scratch on token shards (transformers Trainer)", language_model=True),
    Task("assemble", "hf_vram.runners.assemble:AssembleRunner", None, "hf_vram.recipe.describe:describe_assemble",
         "a mixture of experts assembled from dense checkpoints on the CPU (no training)"),
    Task("diffusion", "hf_vram.runners.diffusion:DiffusionRunner", "hf_vram.vram.diffusion_plan:DiffusionPlanner",
         "hf_vram.recipe.describe:describe_diffusion",
         "an image diffusion model from scratch (an Accelerate loop on diffusers' models)"),
)}


def task_of(recipe) -> Task:
    """The table row of a recipe (the schema only admits the tasks of this table)."""
    return TASKS[recipe.task]
