"""task pretrain: a recipe's data section -> tokenizer, token shards and the blocks the trainer reads.

The source may be a local file, an http(s) URL (nanoGPT's shakespeare input.txt), or a Hub dataset id read
as a stream. A trained tokenizer learns from the first tokenizer.train_documents documents; then every
document is tokenized once into memory-mapped shards (data_prep/shards.py) under OUTPUT_DIR/prepared/, which a
resumed or repeated run reuses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.errors import DataError
from data_prep.shards import ShardInfo, TokenBlocks, iter_documents, prepare_shards


@dataclass
class Corpus:
    tokenizer: object
    shards: ShardInfo
    train: TokenBlocks
    eval: TokenBlocks | None
    counts: dict


def local_source(source: str) -> str:
    """A URL is downloaded once into the datasets cache (datasets' DownloadManager: resumable, cached by URL);
    anything else is returned as it is."""
    if not source.startswith(("http://", "https://")):
        return source
    import datasets

    try:
        return datasets.DownloadManager().download(source)
    except Exception as e:  # connection, HTTP and file errors come in many types
        raise DataError(f"data.source: cannot download {source} ({type(e).__name__}: {e}); download it yourself "
                        "and give its local path as data.source") from None


def prepare_corpus(recipe: Any, output_dir: Path, tokenizer_path: str | None,
                   first: Callable[[str], AbstractContextManager] = lambda desc: nullcontext()) -> Corpus:
    """Tokenizer (trained on the corpus when the recipe asks) and token shards, each made once: under a launcher
    `first` lets the main process make them while the other ranks wait, then they all read the same files.

    `recipe` is read by attribute only (a validated recipe, or any object of that shape): recipe.data.source,
    .text_field, .split, .subset, .max_samples, .val_size, .max_length, .block_stride, and recipe.tokenizer.train,
    .train_documents (plus what load_tokenizer reads: .kind, .vocab_size)."""
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer  # imports transformers: only when a corpus is prepared

    d, t = recipe.data, recipe.tokenizer
    source = local_source(d.source)
    tokenizer_dir = output_dir / "tokenizer-trained"
    with first("tokenizer"):
        if t.train and (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            texts = None
            if t.train:
                documents = iter_documents(source, d.text_field, d.split, d.subset)
                texts = itertools.islice(documents, min(t.train_documents, d.max_samples or t.train_documents))
            tokenizer = load_tokenizer(recipe, tokenizer_path, texts)
            if t.train:
                tokenizer.save_pretrained(tokenizer_dir)
    with first("token shards"):
        shards = prepare_shards(source, tokenizer, output_dir / "prepared", text_field=d.text_field, split=d.split,
                                subset=d.subset, val_fraction=d.val_size, max_documents=d.max_samples)
    train = TokenBlocks(shards, "train", d.max_length, d.block_stride)
    held_out = None
    if d.val_size:
        held_out = TokenBlocks(shards, "val", d.max_length)
    counts = {"documents": shards.documents, "tokens": shards.num_tokens, "dtype": str(shards.dtype),
              "vocab_size": shards.vocab_size, "blocks": {"train": len(train), "val": len(held_out) if held_out else 0},
              "shards": str(shards.directory)}
    return Corpus(tokenizer, shards, train, held_out, counts)
