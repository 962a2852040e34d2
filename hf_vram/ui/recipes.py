"""The UI's recipes: the shipped ones and the user's own files (ROOT/recipes/*.yaml), read as text, validated by
the same loader and messages as the CLI, saved as a new file, and planned (with the page's settings as overrides)
by the task's planner."""

from __future__ import annotations

import os
from pathlib import Path

from hf_vram.errors import UserError
from hf_vram.recipe.load import LoadedRecipe, load_recipe, shipped_recipes

# The plan view's controls, as recipe keys.
CONTROLS = ("train.micro_batch_size", "data.max_length", "train.gradient_checkpointing", "train.activation_offloading")


def user_folder(root: Path) -> Path:
    return Path(root) / "recipes"


def recipe_choices(root: Path) -> dict[str, Path]:
    """Label -> file: the user's recipes first (by file name), then the shipped ones."""
    mine = {f"{p.stem} (yours)": p for p in sorted(user_folder(root).glob("*.yaml")) if not p.name.startswith(".")}
    return {**mine, **shipped_recipes()}


def recipe_text(root: Path, label: str) -> str:
    choices = recipe_choices(root)
    if label not in choices:
        raise UserError(f"no recipe '{label}'")
    return choices[label].read_text()


def check_text(root: Path, name: str, text: str, overrides: list[str] = ()) -> LoadedRecipe:
    """The text as a recipe, validated as `hf-vram validate` does (RecipeError names the key and the fix). It is
    read from a hidden file in the user's folder, so that `extends` and `recipe:NAME` resolve as they would there."""
    folder = user_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{safe_name(name)}.checking-{os.getpid()}.yaml"
    path.write_text(text)
    try:
        loaded = load_recipe(str(path), list(overrides))
    finally:
        path.unlink(missing_ok=True)
    loaded.name = safe_name(name)  # the output directory is named after the recipe, not the hidden file
    return loaded


def safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.strip()).strip(".-")
    if not cleaned:
        raise UserError("give the recipe a name (letters, digits, - and _)")
    return cleaned.removesuffix(".yaml")


def save_text(root: Path, name: str, text: str) -> Path:
    """Validate, then write ROOT/recipes/NAME.yaml (a shipped recipe is never overwritten: this is a new file)."""
    check_text(root, name, text)
    path = user_folder(root) / f"{safe_name(name)}.yaml"
    path.write_text(text)
    return path


def plan_of(loaded: LoadedRecipe, gpu_name: str, picture: Path):
    """(plan text, picture path, longest context line, planner) of a recipe on a card."""
    from hf_vram.tasks import task_of
    from hf_vram.vram.gpus import get_gpu
    from hf_vram.vram.plan_plot import write_plan_png

    planner = task_of(loaded.recipe).make_planner()
    if planner is None:
        raise UserError(f"task {loaded.recipe.task} trains nothing on the GPU: plan the recipe that trains its output")
    gpu = get_gpu(gpu_name)
    plan = planner.plan(loaded, gpu)
    picture.parent.mkdir(parents=True, exist_ok=True)
    write_plan_png(picture, [(gpu.name, plan)], f"{loaded.name}: predicted peak memory")
    longest = planner.longest(loaded, gpu) if loaded.recipe.task != "diffusion" else ""
    return planner.format(loaded, plan), picture, longest, planner


def control_values(loaded: LoadedRecipe) -> tuple:
    """The recipe's own values of CONTROLS (None where its task has no such key)."""
    r = loaded.recipe
    length = getattr(r.data, "max_length", None) if r.data is not None else None
    offload = r.train.activation_offloading
    return (r.train.micro_batch_size, length, r.train.gradient_checkpointing,
            offload if offload == "auto" else ("on" if offload else "off"))


def control_overrides(micro_batch: float | None, max_length: float | None, checkpointing: bool | None,
                      offloading: str | None) -> list[str]:
    """The plan view's controls as key=value overrides (an empty control leaves the recipe's value)."""
    offload = {"on": True, "off": False}.get(offloading, offloading)  # "auto" stays "auto"
    values = (None if micro_batch is None else int(micro_batch), None if max_length is None else int(max_length),
              checkpointing, offload)
    return [f"{key}={str(v).lower() if isinstance(v, bool) else v}" for key, v in zip(CONTROLS, values) if v is not None]
