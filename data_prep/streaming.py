"""A recipe's records as a stream (data.streaming): read, checked and tokenized as training draws them.

For SFT corpora larger than memory: datasets' streaming (`load_dataset(..., streaming=True)`) reads a local file
or a Hub dataset piece by piece, and each record goes through the same path as the cached preparation
(formats.to_examples -> tokenize.tokenize_examples), so a streamed sample is token for token the cached one, and
a bad record fails with the same message (source, record index, field) when the stream reaches it. Nothing is
cached: every pass over the stream tokenizes again.

Packing is left to trl's SFTTrainer: trl 1.16 packs an IterableDataset with the same batched map as a Dataset
(trl.data_utils.pack_dataset, one map batch of 1,000 samples at a time), given the stream's columns are known,
which the features below declare.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.errors import DataError
from data_prep.formats import to_examples
from data_prep.sources import LOADERS, json_problem, quiet_json_errors
from data_prep.tokenize import tokenize_examples

log = logging.getLogger(__name__)
_FORMATS_LOGGER = "data_prep.formats"


def stream_records(source: str, fmt: str, split: str = "train", subset: str | None = None) -> Iterable[dict]:
    """Raw records of a source, read lazily: a local file or a Hub dataset through datasets' streaming; a builtin
    source (generated, small) as its list."""
    if source.startswith("builtin:"):
        return BUILTIN_SOURCES[source.removeprefix("builtin:")].records(fmt, split)
    import datasets

    path = Path(source).expanduser()
    if path.suffix not in LOADERS:
        try:
            return datasets.load_dataset(source, subset, split=split, streaming=True)
        except Exception as e:  # datasets raises many types: not found, unknown split, offline, missing config
            raise DataError(f"data.source: cannot stream dataset '{source}'" + (f" (subset '{subset}')" if subset else "")
                            + f" split '{split}': {type(e).__name__}: {e}") from None
    if not path.exists():
        raise DataError(f"data.source: file '{source}' does not exist")
    if split != "train":
        raise DataError(f"{source}: a local file has one split, so split '{split}' (data.split / data.eval_split) does "
                        "not exist in it; use a folder with one file per split (train.jsonl, test.jsonl) as data.source")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty, so it has no records; put the records in it")
    return datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train", streaming=True)


def _records(data, split: str) -> Iterator[dict]:
    """The records in order, blank lines of a .txt file skipped (as the cached path does), cut at max_samples; a
    file that datasets cannot parse fails with the cached path's message (the line that is broken)."""
    records = stream_records(data.source, data.format, split, data.subset)
    path = Path(data.source).expanduser()
    txt = path.suffix == ".txt"
    kept = (r for r in records if not txt or r["text"].strip())
    it = islice(kept, data.max_samples) if data.max_samples else kept
    try:
        with quiet_json_errors():
            yield from it
    except DataError:
        raise
    except Exception as e:  # datasets wraps parse errors in several types
        problem = json_problem(path, data.source) if path.suffix in (".json", ".jsonl") else None
        raise DataError(problem or f"{data.source}: cannot be read as {path.suffix} ({type(e).__name__}: {e})") from None


class _OnceScoreWarning(logging.Filter):
    """formats.to_examples warns about an unread 'score' field once per call; called once per record here, it
    would warn on every record, so only the first gets through."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "'score' field is not read" not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


def example_of(raw: dict, index: int, data) -> list:
    """One record checked against data.format: its turns. to_examples numbers the records it is given from 0; the
    message of a bad record is given the record's number in the stream."""
    try:
        return to_examples([raw], data.format, data.source, data.template, data.text_field, data.placeholders)[0]
    except DataError as e:
        prefix = f"{data.source}: record 0: "
        message = str(e)
        if message.startswith(prefix):
            raise DataError(f"{data.source}: record {index}: {message.removeprefix(prefix)}") from None
        raise


def tokenized_rows(data, tokenizer, split: str = "train") -> Iterator[dict]:
    """{input_ids, labels} of each record that keeps a trained token, in the source's order."""
    warn_once = _OnceScoreWarning()
    logging.getLogger(_FORMATS_LOGGER).addFilter(warn_once)
    read = kept = 0
    try:
        for index, raw in enumerate(_records(data, split)):
            if index == 0 and data.format != "text" and isinstance(raw, dict) and not any(raw.values()):
                raise DataError(f"{data.source}: the first record has no values; is data.format '{data.format}' "
                                "the file's layout?")
            rows, _ = tokenize_examples([example_of(raw, index, data)], tokenizer, data, data.source, [index])
            read += 1
            kept += len(rows)
            yield from rows
    finally:
        logging.getLogger(_FORMATS_LOGGER).removeFilter(warn_once)
    if not read:
        raise DataError(f"{data.source}: no records")
    if not kept:
        raise DataError(f"{data.source}: no sample keeps a trained token (all {read} dropped); check data.max_length "
                        "and data.train_on_prompt")


def tokenized_stream(data, tokenizer, seed: int, split: str = "train", shuffle: bool = True):
    """A datasets.IterableDataset of {input_ids, labels}, tokenized as it is read; drawn through a shuffle buffer
    of data.shuffle_buffer samples (seeded by `seed`; datasets reseeds it each pass by the epoch) when shuffle."""
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                                  "labels": datasets.List(datasets.Value("int64"))})
    stream = datasets.IterableDataset.from_generator(
        tokenized_rows, features=features, gen_kwargs={"data": data, "tokenizer": tokenizer, "split": split})
    if shuffle and data.shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=data.shuffle_buffer)
    return stream
