"""Which lm-eval tasks a list of names means, loaded with their data.

hf-vram's own tasks (hf_vram/eval_tasks/) are looked up first and shadow lm-eval's names: `arithmetic` is hf-vram's
held-out arithmetic, not lm-eval's tag of GPT-3's ten arithmetic tasks, which stay reachable by their own names
(arithmetic_1dc, ..., or the pattern 'arithmetic_*'). lm-eval's index of its ~15,000 names takes seconds to build,
so it is built only when a name is not hf-vram's. A name neither knows is a UserError with a did-you-mean.

lm-eval's tasks read their data from the Hub, which datasets asks with retries: a Hub that gives no answer costs
13 s per task at best (huggingface_hub 2.4's 10 s timeout, then datasets' retry) and minutes where DNS hangs. The
Hub is asked once first, with one request under a short deadline (hf_vram/vram/configs.py's probe); with
HF_HUB_OFFLINE set only the cache is read, and a task not in it is a UserError, not a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from hf_vram.errors import UserError, did_you_mean
from hf_vram.eval_tasks import TASKS_DIR

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from hf_vram.recipe.schema import Recipe

# Any public Hub file: the probe only asks whether the Hub answers at all.
HUB_PROBE = ("openai-community/gpt2", "config.json")


# lm-eval 0.4.13's warnings about what hf-vram does on purpose: an HFLM on a model instance ("many other model
# arguments may be ignored ... do not launch via accelerate"), and a task with a custom_dataset hook (a hint on
# lm-eval's --metadata option, which hf-vram sets itself). Logger name -> the texts dropped.
_KNOWN_NOISE = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


def quiet_known_noise() -> None:
    import logging

    for name, texts in _KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, "hf_vram", False) for f in logger.filters):
            drop = logging.Filter()
            drop.filter = lambda record, texts=texts: not any(t in record.getMessage() for t in texts)
            drop.hf_vram = True
            logger.addFilter(drop)


@dataclass(frozen=True)
class PromptSettings:
    """What hf-vram's own tasks take from the output's recipe: the Alpaca template it was trained with, how many
    held-out questions its score asks (0: all), and how many tokens it generates per answer."""

    template: str = "alpaca"
    samples: int = 0
    max_new_tokens: int = 32

    @classmethod
    def of(cls, recipe: Recipe) -> PromptSettings:
        template = recipe.data.template if recipe.data is not None else cls.template
        return cls(template, recipe.eval.score_samples, recipe.eval.max_new_tokens)


def split_names(text: str) -> list[str]:
    """--tasks a,b,c -> [a, b, c], each once, in order."""
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


@cache
def project_task_names() -> tuple[str, ...]:
    names = tuple(project_manager().all_tasks)
    if not names:
        # Without its task files `arithmetic` would quietly mean lm-eval's tag of that name.
        raise UserError(f"hf-vram's lm-eval task files are missing from {TASKS_DIR} (package data not installed): "
                        "reinstall hf-vram")
    return names


def project_manager(settings: PromptSettings | None = None) -> TaskManager:
    """An index of hf-vram's task folder alone (instant); with settings, its tasks built for one output."""
    from lm_eval.tasks import TaskManager

    # The settings reach the tasks' custom_dataset hook as metadata (lm-eval passes them as keyword arguments).
    meta = {"template": settings.template, "samples": settings.samples} if settings else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=meta)


@cache
def lm_eval_manager() -> TaskManager:
    """lm-eval's own index (its task folder), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@dataclass(frozen=True)
class Selection:
    ours: tuple[str, ...]  # hf-vram's tasks (offline)
    theirs: tuple[str, ...]  # lm-eval's tasks, groups and tags (data from the Hub)


def select(names: list[str], where: str) -> Selection:
    """Sort the names into hf-vram's and lm-eval's (patterns like 'arithmetic_*' expand in lm-eval's index)."""
    if not names:
        raise UserError(f"{where}: name at least one task, e.g. arithmetic (hf-vram's held-out arithmetic)")
    ours = [n for n in names if n in project_task_names()]
    rest = [n for n in names if n not in ours]
    if not rest:
        return Selection(tuple(ours), ())
    manager = lm_eval_manager()
    theirs: list[str] = []
    for name in rest:
        if name in manager.all_tasks:
            found = [name]
        else:  # a pattern (lm-eval's CLI expands them the same way); a plain name matches only itself
            found = manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        if not found:
            known = [*project_task_names(), *manager.all_tasks]
            raise UserError(f"{where}: no lm-eval task, group or tag '{name}'{did_you_mean(name, known)}; hf-vram's "
                            f"own: {', '.join(project_task_names())}; `lm-eval ls tasks` lists lm-eval's")
        theirs += [f for f in found if f not in theirs]
    return Selection(tuple(ours), tuple(theirs))


def load_ours(names: tuple[str, ...], settings: PromptSettings, eos_token_id: int | None) -> list:
    """hf-vram's tasks built for one output: its template and held-out count (metadata), and its generation
    (the recipe's eval.max_new_tokens; generation stops at the tokenizer's EOS, as hf-vram's greedy_generate
    stops: the model's generation config may name more stops)."""
    quiet_known_noise()
    loaded = project_manager(settings).load(list(names))
    generation = {"max_gen_toks": settings.max_new_tokens}
    if eos_token_id is not None:
        generation["eos_token_id"] = eos_token_id
    for task in loaded["tasks"].values():
        task.set_config(key="generation_kwargs", value=generation, update=True)
    return list(loaded["tasks"].values())


def load_theirs(names: tuple[str, ...], where: str) -> dict:
    """lm-eval's tasks with their data (downloaded, or read from the cache)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if not constants.is_offline_mode():
        _check_hub_answers(names, where)
    try:
        return lm_eval_manager().load(list(names))
    except OfflineModeIsEnabled as e:
        raise UserError(f"{where}: {', '.join(names)}: lm-eval reads the data from the Hub, HF_HUB_OFFLINE is set and "
                        f"it is not in the cache ({e}); run once with the network to cache it") from None
    except Exception as e:  # datasets' and the Hub's failures (connection, missing or gated data): reported, not raised
        raise UserError(f"{where}: lm-eval could not load {', '.join(names)}: {type(e).__name__}: {e}") from None


def _check_hub_answers(names: tuple[str, ...], where: str) -> None:
    from hf_vram.vram.configs import hub_answers

    why = hub_answers(*HUB_PROBE)
    if why.startswith("the Hub did not answer"):
        raise UserError(f"{where}: {', '.join(names)}: lm-eval reads the data from the Hub, and {why}; connect, or "
                        "set HF_HUB_OFFLINE=1 to read data cached earlier")
