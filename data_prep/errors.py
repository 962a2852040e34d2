"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2.

They live in data_prep, which imports nothing of the hf-vram application, so that it stands alone; the
application's errors module re-exports these same classes, so an `except UserError` there catches a DataError
raised here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a recipe, an override, a data file. The message says where and how to fix it."""

    exit_code = 2


class DataError(UserError):
    """A data file or record that does not fit the declared format."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
