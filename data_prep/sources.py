"""Where records come from: builtin generated data, local files, or the Hub (datasets.load_dataset)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.errors import DataError

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def read_records(source: str, fmt: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """Raw records of a data source, as dicts. A source that is not a file is given to datasets.load_dataset
    as it is: a Hub dataset id, or a local dataset folder (data files named by split, or a loading script)."""
    if source.startswith("builtin:"):
        return BUILTIN_SOURCES[source.removeprefix("builtin:")].records(fmt, split)
    import datasets

    path = Path(source).expanduser()
    if path.suffix not in LOADERS:
        try:
            return list(datasets.load_dataset(source, subset, split=split))
        except Exception as e:  # datasets raises many types: not found, unknown split, offline, missing config
            raise DataError(
                f"data.source: cannot load dataset '{source}'" + (f" (subset '{subset}')" if subset else "")
                + f" split '{split}': {type(e).__name__}: {e}"
            ) from None
    if not path.exists():
        raise DataError(f"data.source: file '{source}' does not exist")
    if split != "train":
        raise DataError(
            f"{source}: a local file has one split, so split '{split}' (data.split / data.eval_split) does not exist "
            "in it; hold out part of it with data.val_size, or use a folder with one file per split (train.jsonl, "
            "test.jsonl) as data.source"
        )
    records = _read_local(path, source)
    if path.suffix == ".txt":
        # datasets' text loader yields one record per line; blank lines (paragraph breaks) carry no text.
        records = [r for r in records if r["text"].strip()]
    if len(records) and fmt != "text" and not any(records[0].values()):
        raise DataError(f"{source}: the first record has no values; is data.format '{fmt}' the file's layout?")
    return records


def _read_local(path: Path, source: str) -> list[dict]:
    import datasets

    if path.stat().st_size == 0:
        # datasets fails on an empty file with an error that does not say so (or a bare StopIteration).
        raise DataError(f"{source}: the file is empty, so it has no records; put the records in it, or point "
                        "data.source at the file that has them")
    try:
        with quiet_json_errors():
            return list(datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train"))
    except Exception as e:  # datasets wraps parse errors in several types
        # datasets says neither where a JSON file is broken nor that it holds no records: the file is read here
        # to say so (only once datasets has failed, so a good file is parsed once).
        problem = json_problem(path, source) if path.suffix in (".json", ".jsonl") else None
        cause = f"; {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ is not None else ""
        raise DataError(problem or f"{source}: cannot be read as {path.suffix} ({type(e).__name__}: {e}{cause})") from None


# datasets' JSON loader logs a parse error itself before raising it, naming a row of the block it was reading
# rather than the file's line; the DataError raised instead names the line, so that log would only contradict it.
_JSON_LOADER_LOGGER = "datasets.packaged_modules.json.json"


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextmanager
def quiet_json_errors() -> Iterator[None]:
    """Within: datasets' JSON loader logs no errors (every one is raised too, and reported as a DataError)."""
    logger, drop = logging.getLogger(_JSON_LOADER_LOGGER), _DropErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}
# A broken JSON Lines file names at most this many of its bad lines (and counts them all).
_BAD_LINES_SHOWN = 3


def _json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def json_problem(path: Path, source: str) -> str | None:
    """What keeps a .json / .jsonl file from giving records, as a message naming the line and the fix; None when
    nothing is found. A .json file is one JSON value (a list of records), unless it is JSON Lines under that
    suffix (datasets reads both); a .jsonl file holds one JSON object per line."""
    try:
        if path.suffix == ".json":
            with open(path, encoding="utf-8-sig") as f:
                try:
                    return _json_value_problem(json.load(f), source)
                except json.JSONDecodeError as e:
                    if not e.doc.strip():
                        return f"{source}: the file holds only blank space, so it has no records; put the records in it"
                    if e.msg != "Extra data":  # "Extra data": a second value after the first, i.e. JSON Lines
                        return (f"{source}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file "
                                "there (a .json file holds one list of records: [{...}, {...}])")
        return _json_lines_problem(path, source)
    except UnicodeDecodeError as e:
        return f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8"


def _json_value_problem(value, source: str) -> str | None:
    if isinstance(value, list):
        if not value:
            return f"{source}: the file holds an empty list, so it has no records; put the records in the list"
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                return (f"{source}: record {i} is a JSON {_json_type(item)}, not an object; every record of the list "
                        "must be an object of fields ({\"instruction\": ..., \"output\": ...})")
        return None
    if not isinstance(value, dict):
        return (f"{source}: the file holds a JSON {_json_type(value)}, not records; give a list of objects "
                "([{...}, {...}]) or JSON Lines (one object per line)")
    return None


def _json_lines_problem(path: Path, source: str) -> str | None:
    """Every line of a JSON Lines file checked, streamed (the file is never held whole): the bad lines named."""
    bad: list[str] = []
    good = 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))  # the column of an error counted on the line itself
            except json.JSONDecodeError as e:
                bad.append(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if isinstance(value, dict):
                good += 1
            else:
                bad.append(f"line {lineno}: a JSON {_json_type(value)}, not an object of fields")
    if not bad:
        return None if good else f"{source}: the file has only blank lines, so it has no records; put the records in it"
    shown = "; ".join(bad[:_BAD_LINES_SHOWN]) + (f"; and {len(bad) - _BAD_LINES_SHOWN} more" if len(bad) > _BAD_LINES_SHOWN else "")
    rest = {0: "no line of it is a record", 1: "the other line is fine"}.get(good, f"the other {good} lines are fine")
    return (f"{source}: {shown}. {len(bad)} bad line{'s' if len(bad) > 1 else ''}, {rest}; fix or delete "
            f"{'those lines' if len(bad) > 1 else 'that line'} (JSON Lines holds one JSON object per line)")
