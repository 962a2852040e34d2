"""The interface every runner has: setup -> train -> save. setup builds everything and trains nothing (tests
inspect the model then); train trains (or resumes) to the end; save writes the output and, on the main process,
the model card, train_summary.json (last) and the push, through the same output layer (hf_vram/output/)."""

from __future__ import annotations

from hf_vram.output.publish import publish, push_finished
from hf_vram.recipe.load import LoadedRecipe
from hf_vram.recipe.references import References


class Runner:
    def __init__(self, loaded: LoadedRecipe, refs: References):
        self.loaded, self.refs = loaded, refs
        self.recipe, self.out = loaded.recipe, loaded.output_dir
        self.summary: dict = {"recipe": loaded.name, "task": loaded.recipe.task}

    @property
    def is_main(self) -> bool:
        return True

    def setup(self) -> None:
        raise NotImplementedError

    def train(self) -> None:
        raise NotImplementedError

    def save(self) -> dict:
        """The trained output, then (main process) card, summary and push; returns the summary."""
        self.save_output()
        if not self.is_main:
            return self.summary
        publish(self.out, self.card(), self.summary)
        self.report()
        if self.recipe.hub.repo_id:
            push_finished(self.out, self.recipe.hub.repo_id, self.recipe.hub.private)
        return self.summary

    def save_output(self) -> None:
        """Weights, tokenizer or pipeline, and whatever the summary still needs from the trained model."""
        raise NotImplementedError

    def card(self) -> str:
        """README.md of the output (hf_vram/output/cards/)."""
        raise NotImplementedError

    def report(self) -> None:
        """What the run prints once its output is complete."""
