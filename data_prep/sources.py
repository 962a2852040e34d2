"""Where records come from: builtin generated data, local files, or the Hub (datasets.load_dataset)."""

from __future__ import annotations

from pathlib import Path

from data_prep.builtin import BUILTIN_SOURCES
from hf_vram.errors import DataError

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
    try:
        records = list(datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train"))
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"{source}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None
    if path.suffix == ".txt":
        # datasets' text loader yields one record per line; blank lines (paragraph breaks) carry no text.
        records = [r for r in records if r["text"].strip()]
    if len(records) and fmt != "text" and not any(records[0].values()):
        raise DataError(f"{source}: the first record has no values; is data.format '{fmt}' the file's layout?")
    return records
