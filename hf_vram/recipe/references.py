"""Recipe dependencies: a model, tokenizer, expert or GRPO starting adapter named `recipe:NAME` is that recipe's
output directory. NAME is a shipped recipe or a path, read relative to the recipe that names it. This module only
finds them; training the ones not trained yet is the dispatcher's job (hf_vram/runners/run.py), before the
recipe's own runner starts."""

from __future__ import annotations

from dataclasses import dataclass

from hf_vram.recipe.load import LoadedRecipe, find_recipe, load_recipe

PREFIX = "recipe:"


def dependency(loaded: LoadedRecipe, ref: str | None) -> LoadedRecipe | None:
    """The recipe a reference names, or None for a Hub id or a path."""
    if not ref or not ref.startswith(PREFIX):
        return None
    return load_recipe(find_recipe(ref.removeprefix(PREFIX), relative_to=loaded.path.parent))


def resolve_reference(loaded: LoadedRecipe, ref: str | None) -> str | None:
    """A model or tokenizer reference with `recipe:NAME` replaced by that recipe's output directory."""
    dep = dependency(loaded, ref)
    return str(dep.output_dir.resolve()) if dep is not None else ref


def _references(loaded: LoadedRecipe) -> list[str | None]:
    r = loaded.recipe
    experts = [e.source_model for e in r.moe.experts] if r.task == "assemble" else []
    init_adapter = [r.grpo.init_adapter] if r.task == "grpo" else []
    return [r.model.name_or_path, r.tokenizer.name_or_path, *experts, *init_adapter]


def dependencies(loaded: LoadedRecipe) -> list[LoadedRecipe]:
    """Every recipe this one names (model, tokenizer, experts, the adapter GRPO starts from), each once, in the
    order named."""
    found: dict[str, LoadedRecipe] = {}
    for ref in _references(loaded):
        dep = dependency(loaded, ref)
        if dep is not None:
            found.setdefault(str(dep.output_dir.resolve()), dep)
    return list(found.values())


@dataclass(frozen=True)
class References:
    """What a runner loads, every `recipe:NAME` replaced by its output directory."""

    model: str | None
    tokenizer: str | None  # the model's own when the recipe names no tokenizer
    experts: tuple[str | None, ...] = ()

    @classmethod
    def of(cls, loaded: LoadedRecipe) -> References:
        r = loaded.recipe
        model = resolve_reference(loaded, r.model.name_or_path)
        experts = tuple(resolve_reference(loaded, e.source_model) for e in r.moe.experts) if r.task == "assemble" else ()
        return cls(model, resolve_reference(loaded, r.tokenizer.name_or_path) or model, experts)
