"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2.

UserError, DataError and did_you_mean are defined in data_prep (which imports nothing from hf_vram) and are the
same objects here, so `except UserError` catches data_prep's errors too."""

from __future__ import annotations

from data_prep.errors import DataError, UserError, did_you_mean

__all__ = ["DataError", "RecipeError", "TrainingStopped", "UserError", "did_you_mean"]


class RecipeError(UserError):
    """One or more problems in a recipe, each naming the file, the key path and the fix."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid recipe {source}:\n{lines}")


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and what to change."""
