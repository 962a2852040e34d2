"""Where records come from: builtin generated data, local files, or the Hub (datasets.load_dataset)."""

from __future__ import annotations

from pathlib import Path

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.formats import to_training_rows
from hf_vram.errors import DataError

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def read_records(source: str, fmt: str, split: str = "train") -> list[dict]:
    """Raw records of a data source, as dicts."""
    if source.startswith("builtin:"):
        return BUILTIN_SOURCES[source.removeprefix("builtin:")].records(fmt, split)
    import datasets

    path = Path(source).expanduser()
    if path.suffix not in LOADERS:  # a Hub dataset id
        return list(datasets.load_dataset(source, split=split))
    if not path.exists():
        raise DataError(f"data.source: file '{source}' does not exist")
    try:
        records = list(datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train"))
    except Exception as e:  # datasets wraps parse errors in several types
        raise DataError(f"{source}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None
    if path.suffix == ".txt":
        # datasets' text loader yields one record per line; blank lines (paragraph breaks) carry no text.
        records = [r for r in records if r["text"].strip()]
    return records


def load_training_dataset(data):
    """The recipe's data section -> a datasets.Dataset with trl's columns (text, or prompt + completion)."""
    import datasets

    records = read_records(data.source, data.format, data.split)
    if data.max_samples:
        records = records[: data.max_samples]
    rows = to_training_rows(records, data.format, data.source, data.template, data.text_field)
    return datasets.Dataset.from_list(rows)
