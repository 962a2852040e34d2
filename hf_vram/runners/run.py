"""Training a recipe: a finished output is left as it is; its recipe dependencies (`recipe:NAME`) are trained
first; on a GPU the plan is checked (and fitted when train.auto_fit) before anything loads; then its runner sets up,
trains and saves."""

from __future__ import annotations

from hf_vram.output.publish import log
from hf_vram.output.summary import is_finished, read_summary
from hf_vram.recipe.load import LoadedRecipe
from hf_vram.recipe.references import References, dependencies
from hf_vram.tasks import task_of


def train(loaded: LoadedRecipe) -> dict:
    """Run (or resume) one recipe to completion; returns its summary."""
    if is_finished(loaded.output_dir):
        log(f"{loaded.name} is already trained in {loaded.output_dir}; remove that directory or set "
            "train.output_dir=... to train again")
        return read_summary(loaded.output_dir)
    # Planned first (a dependency not trained yet is planned from its own recipe), so that a recipe that cannot fit
    # is refused before its dependencies train.
    return finish(setup(_preflight(loaded)))


def train_dependencies(loaded: LoadedRecipe) -> None:
    for dep in dependencies(loaded):
        if not is_finished(dep.output_dir):
            log(f"{loaded.name} needs {dep.name}: training it first into {dep.output_dir}")
            train(dep)


def setup(loaded: LoadedRecipe):
    """The recipe's runner, set up (its dependencies trained), nothing of its own trained yet."""
    train_dependencies(loaded)
    runner = task_of(loaded.recipe).runner_class()(loaded, References.of(loaded))
    runner.setup()
    return runner


def finish(runner) -> dict:
    """Train a set-up runner to the end and save its output; returns the summary."""
    runner.train()
    return runner.save()


def _preflight(loaded: LoadedRecipe) -> LoadedRecipe:
    import torch

    if not torch.cuda.is_available() or task_of(loaded.recipe).planner is None:
        return loaded
    from hf_vram.vram.configs import ConfigUnavailable
    from hf_vram.vram.preflight import current_gpu, preflight

    try:
        return preflight(loaded, current_gpu())
    except ConfigUnavailable as e:
        # Loading the model will say what is wrong with its name; the plan alone must not stop the run.
        log(f"not planned: {e}")
        return loaded
