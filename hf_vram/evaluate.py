"""Scores for builtin tasks that can be checked (the demo's held-out arithmetic)."""

from __future__ import annotations

from collections.abc import Callable

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.formats import alpaca_prompt
from hf_vram.generate import greedy_generate
from hf_vram.recipe.schema import Recipe


def scorable(recipe: Recipe) -> bool:
    src = recipe.data.source
    return (
        recipe.eval.score_samples > 0
        and src.startswith("builtin:")
        and recipe.data.format == "alpaca"
        and hasattr(BUILTIN_SOURCES.get(src.removeprefix("builtin:")), "score")
    )


def prompt_of(template: str) -> Callable[[dict], str]:
    """The prompt of an alpaca record as the model was trained on it (data.template). Shared with the lm-eval task
    `arithmetic` (hf_vram/eval_tasks/), so that both ask the very same text."""
    return lambda r: alpaca_prompt(r["instruction"], r["input"], template)


def score(recipe: Recipe, model, tokenizer) -> dict:
    task = BUILTIN_SOURCES[recipe.data.source.removeprefix("builtin:")]
    return task.score(
        lambda prompts: greedy_generate(model, tokenizer, prompts, recipe.eval.max_new_tokens),
        prompt_of(recipe.data.template),
        recipe.eval.score_samples,
    )
