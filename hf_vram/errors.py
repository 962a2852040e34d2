"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a recipe, an override, a data file. The message says where and how to fix it."""

    exit_code = 2


class RecipeError(UserError):
    """One or more problems in a recipe, each naming the file, the key path and the fix."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid recipe {source}:\n{lines}")


class DataError(UserError):
    """A data file or record that does not fit the declared format."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and what to change."""
