"""Pretraining data as nanoGPT's prepare.py lays it out: every document tokenized, followed by EOS, and
concatenated into one flat stream of token ids per split (`train.bin`, `val.bin`), read back memory-mapped.

Unlike nanoGPT's scripts, the source is streamed (a corpus larger than RAM never sits in memory), the result is
cached under a key of everything that changes it, the train/val assignment of a document depends only on its
index (the same on every machine and every run), and a killed preparation resumes where it stopped and ends
with the same bytes an uninterrupted run writes.

Layout of `cache_root/<key>/`:
  train.bin, val.bin  token ids, native uint16 or uint32 (meta.json names which), no header
  progress.json       while running: documents done and tokens written per split, after the last whole chunk
  meta.json           written last, atomically: its presence marks the shards complete
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.atomic import atomic_write_json
from data_prep.errors import DataError
from data_prep.sources import LOADERS, json_problem, quiet_json_errors

# Bump when the layout or the tokenization of the shards changes: every old cache key then misses.
SHARD_FORMAT_VERSION = 1
SPLITS = ("train", "val")
_HASH_BLOCK = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id of the vocabulary (0 .. vocab_size - 1): uint16 halves the disk
    and page-cache footprint of GPT-2-sized vocabularies (50257 entries), as nanoGPT does."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    if vocab_size - 1 <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if vocab_size - 1 <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _local_path(source: str) -> Path | None:
    """The file a source names, when it names a local data file (by its suffix); None for a Hub id or folder."""
    path = Path(source).expanduser()
    if path.suffix not in LOADERS:
        return None
    if not path.is_file():
        raise DataError(f"data.source: file '{source}' does not exist; give the path of a local "
                        f"{'/'.join(sorted(LOADERS))} file, or a Hub dataset id")
    return path


def is_single_document(source: str) -> bool:
    """True when the source is a local .txt file: it is read whole as ONE document (nanoGPT's input.txt), so its
    train/val split is by position in the token stream rather than by document. Being one document, it is read
    and tokenized in memory whole; a corpus larger than RAM belongs in a .jsonl / .parquet file, one record each."""
    path = Path(source).expanduser()
    return path.suffix == ".txt" and path.is_file()


def iter_documents(source: str, text_field: str = "text", split: str = "train", subset: str | None = None) -> Iterator[str]:
    """The documents of a source, one string each, streamed.

    - a local .txt file: the whole file is one document;
    - a local .jsonl / .json / .parquet / .csv file: `record[text_field]` of each record;
    - anything else: a Hub dataset id or a local dataset folder, through datasets.load_dataset(streaming=True).

    Bad input (a missing file, a split a local file does not have) raises here, at the call; a record without
    the text field raises when it is reached."""
    path = _local_path(source)
    if path is not None and split != "train":
        raise DataError(
            f"{source}: a local file has one split, so split '{split}' (data.split) does not exist in it; "
            "set data.split to 'train' (the held-out part comes from the val fraction), or use a dataset folder "
            "or Hub id that has that split"
        )
    if path is not None and path.suffix == ".txt":
        return _whole_file(path)
    if path is not None and path.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty, so it has no documents; put the training text in it, or point "
                        "data.source at the file that has it")
    import datasets

    where = source if path is not None else (
        f"dataset '{source}'" + (f" (subset '{subset}')" if subset else "") + f" split '{split}'"
    )
    try:
        if path is not None:
            stream = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train", streaming=True)
        else:
            stream = datasets.load_dataset(source, subset, split=split, streaming=True)
    except Exception as e:  # datasets raises many types: not found, offline, unknown split or config
        raise DataError(f"data.source: cannot load {where}: {type(e).__name__}: {e}; check data.source, "
                        "data.subset and data.split") from None
    return _texts(stream, where, text_field, path)


def _whole_file(path: Path) -> Iterator[str]:
    # newline="" keeps "\r\n" as it is in the file, as nanoGPT's open().read() does on Linux; the token
    # stream then matches the bytes on disk on every platform.
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert the file to UTF-8") from None
    yield text


def _texts(stream, where: str, text_field: str, path: Path | None = None) -> Iterator[str]:
    records = iter(stream)
    for index in itertools.count():
        # Only the read is guarded: a streamed file is parsed as it is read, so its errors arrive here.
        try:
            with quiet_json_errors():
                record = next(records)
        except StopIteration:
            return
        except Exception as e:
            # Arrow reads a file in blocks and names the row within one: the file's own lines say which is bad.
            problem = json_problem(path, where) if path is not None and path.suffix in (".json", ".jsonl") else None
            raise DataError(problem or f"{where}: cannot read record {index}: {type(e).__name__}: {e}") from None
        text = record.get(text_field)
        if text is None:
            # Arrow gives every record the columns of the whole file, so a field absent from one record reads
            # as None: the fields named are the ones this record fills.
            present = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "no fields"
            raise DataError(f"{where}: record {index}: no text field '{text_field}' (the record has: {present}); "
                            "set data.text_field to the field that holds the text")
        if not isinstance(text, str):
            raise DataError(f"{where}: record {index}: field '{text_field}' is {type(text).__name__}, not text; "
                            "set data.text_field to the field that holds the text")
        yield text


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _source_fingerprint(source: str) -> dict:
    """The content of a local source (a renamed file keeps its cache, an edited one does not); a Hub id is only
    its name, so a new revision of a Hub dataset needs a new name, subset or split to re-tokenize."""
    path = _local_path(source)
    if path is not None:
        return {"loader": LOADERS[path.suffix], "sha256": _sha256_file(path)}
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        return {"folder": {str(p.relative_to(folder)): _sha256_file(p) for p in files}}
    return {"hub": source}


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
             str(tokenizer.eos_token), str(tokenizer.eos_token_id), str(len(tokenizer))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def shard_key(source: str, text_field: str, split: str, subset: str | None, tokenizer, val_fraction: float,
              max_documents: int | None) -> str:
    """A short hex digest of everything that changes the shards."""
    blob = json.dumps(
        {
            "source": _source_fingerprint(source),
            "split": split,
            "subset": subset,
            "text_field": text_field,
            "tokenizer": _tokenizer_fingerprint(tokenizer),
            "val_fraction": float(val_fraction),
            "max_documents": max_documents,
            "version": SHARD_FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def in_val(index: int, val_fraction: float) -> bool:
    """Whether document `index` is held out: a hash of the index alone, uniform in [0, 1), against the fraction.
    Python's hash() is salted per process and a seeded RNG depends on the order of draws; this depends on
    nothing but the index, so a resumed run or another machine assigns every document the same way."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, person=b"hf-vram-val").digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


@dataclass(frozen=True)
class ShardInfo:
    directory: Path
    key: str
    dtype: str  # numpy dtype name of the ids: "uint16" or "uint32"
    vocab_size: int
    num_tokens: dict[str, int]
    sha256: dict[str, str]
    documents: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> ShardInfo:
        """From a shard directory or its meta.json."""
        path = Path(path)
        meta_path = path / "meta.json" if path.is_dir() else path
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise DataError(f"{meta_path}: no such file; the shards there are not prepared (or not finished): "
                            "run the preparation again") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: not valid JSON ({e}); delete the folder and prepare again") from None
        try:
            return cls(meta_path.parent, meta["key"], meta["dtype"], meta["vocab_size"], dict(meta["tokens"]),
                       dict(meta["sha256"]), dict(meta.get("documents", {})), meta)
        except KeyError as e:
            raise DataError(f"{meta_path}: no entry {e}; delete the folder and prepare again") from None

    def path(self, split: str) -> Path:
        if split not in SPLITS:
            raise DataError(f"{self.directory}: no split '{split}'; the shards have {', '.join(SPLITS)}")
        return self.directory / f"{split}.bin"

    def tokens(self, split: str) -> np.ndarray:
        """The split's ids, memory-mapped read-only (pages load as they are touched). numpy cannot map an empty
        file, so an empty split is an empty in-memory array."""
        path = self.path(split)
        n = self.num_tokens[split]
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))


class TokenBlocks(torch.utils.data.Dataset):
    """Windows of `block_size` tokens of one split, starting every `stride` tokens (default: the block size, so
    non-overlapping and the tail shorter than a block dropped), read from the memory map when asked for: the
    split never sits in RAM whole. A small corpus trained for many passes (shakespeare) does better on windows at
    every offset, as nanoGPT's get_batch draws them: stride 1; a large one is read once, block after block."""

    def __init__(self, info: ShardInfo, split: str, block_size: int, stride: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        info.path(split)  # an unknown split name fails here, with the names there are
        n = info.num_tokens[split]
        if n < block_size:
            more = "a larger val_fraction (more documents held out)" if split == "val" else "more training text"
            raise DataError(
                f"{info.path(split)}: the {split} split has {n} tokens, fewer than one block of {block_size} "
                f"(data.max_length); use a smaller data.max_length or {more}"
            )
        self.info = info
        self.split = split
        self.block_size = block_size
        self.stride = stride or block_size
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self._blocks = (n - block_size) // self.stride + 1
        self._tokens = None  # opened on first use, in the process that reads (DataLoader workers re-open it)

    def __len__(self) -> int:
        return self._blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._blocks
        if not 0 <= index < self._blocks:
            raise IndexError(f"block {index} out of range ({self._blocks} blocks)")
        if self._tokens is None:
            self._tokens = self.info.tokens(self.split)
        start = index * self.stride
        ids = torch.from_numpy(self._tokens[start : start + self.block_size].astype(np.int64))
        # Causal LMs shift labels themselves; labels are a copy so a collator masking them leaves inputs alone.
        return {"input_ids": ids, "labels": ids.clone()}

    def __getstate__(self) -> dict:
        # A memmap pickles as a full in-memory copy; workers get the path and map the file themselves.
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state


@contextlib.contextmanager
def _locked(directory: Path):
    """One preparer per cache folder: ranks started together (torchrun) wait for the first, then read its cache."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, concurrent preparers must be avoided by the caller
        yield
        return
    with open(directory / ".lock", "a") as lock:  # "a": opening neither truncates nor touches it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _complete(directory: Path, key: str) -> ShardInfo | None:
    """The finished shards in the folder, if meta.json is there, of this key and format, and the .bin files have
    the sizes it records (a sha256 check of every load would read the whole corpus)."""
    meta = _read_json(directory / "meta.json")
    if not meta or meta.get("key") != key or meta.get("format_version") != SHARD_FORMAT_VERSION:
        return None
    try:
        info = ShardInfo.load(directory)
    except DataError:  # a meta.json without some entry: prepared again
        return None
    itemsize = np.dtype(info.dtype).itemsize
    for split in SPLITS:
        path = info.path(split)
        if not path.is_file() or path.stat().st_size != info.num_tokens.get(split, -1) * itemsize:
            return None
    return info


def _resumable(state: dict | None, key: str, paths: dict[str, Path], dtype: np.dtype) -> bool:
    """Whether a progress record belongs to these shards and the files hold at least what it counts (less means
    the files were changed from outside: start over)."""
    try:
        return state["key"] == key and state["format_version"] == SHARD_FORMAT_VERSION and all(
            paths[s].is_file() and paths[s].stat().st_size >= int(state["tokens"][s]) * dtype.itemsize for s in SPLITS
        ) and all(k in state for k in ("documents_done", "documents"))
    except (TypeError, KeyError, ValueError):
        return False


def _fsync_append(f, array: np.ndarray) -> None:
    f.write(array.tobytes())
    f.flush()
    os.fsync(f.fileno())


def prepare_shards(
    source: str,
    tokenizer,
    cache_root: Path,
    *,
    text_field: str = "text",
    split: str = "train",
    subset: str | None = None,
    val_fraction: float = 0.0005,
    max_documents: int | None = None,
    chunk_documents: int = 256,
    progress: bool = True,
    documents: Iterable[str] | None = None,
) -> ShardInfo:
    """Tokenize a source into `cache_root/<key>/{train,val}.bin` once; later calls return the cached shards, and a
    call after a crash resumes from the last whole chunk.

    Each document is followed by the tokenizer's EOS (when it has one), as GPT-2's <|endoftext|> separates
    documents in nanoGPT's OpenWebText. A document goes to val when `in_val(index, val_fraction)`; a single-
    document source (a local .txt file) is cut by position instead: its first (1 - val_fraction) of tokens to
    train, the rest (and the EOS) to val, as nanoGPT's shakespeare_char.

    `documents` replaces reading `source` (generated text, tests); the cache key still comes from the arguments,
    so the caller must give the documents `source` holds. For a single-document source it must hold exactly one.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction is {val_fraction}; it must be at least 0 and below 1 (0.0005 holds out "
                        "1 document in 2000)")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents is {max_documents}; it must be at least 1, or unset for the whole source")
    if chunk_documents < 1:
        raise ValueError(f"chunk_documents must be at least 1, got {chunk_documents}")
    key = shard_key(source, text_field, split, subset, tokenizer, val_fraction, max_documents)
    directory = Path(cache_root) / key
    directory.mkdir(parents=True, exist_ok=True)
    # meta.json appears whole or not at all (renamed into place), so finished shards need no lock to be read.
    info = _complete(directory, key)
    if info is not None:
        return info
    with _locked(directory):
        info = _complete(directory, key)
        if info is not None:
            return info
        single = is_single_document(source)
        if documents is None:
            documents = iter_documents(source, text_field, split, subset)
        return _write_shards(directory, key, source, tokenizer, documents, single, val_fraction, max_documents,
                             chunk_documents, progress)


@dataclass(frozen=True)
class _Run:
    """One preparation of shards: where they go and how documents are split and stored."""

    directory: Path
    key: str
    source: str
    single: bool
    val_fraction: float
    max_documents: int | None
    vocab_size: int
    dtype: np.dtype
    eos: int | None

    @property
    def paths(self) -> dict[str, Path]:
        return {s: self.directory / f"{s}.bin" for s in SPLITS}

    @property
    def progress_path(self) -> Path:
        return self.directory / "progress.json"


def _write_shards(directory: Path, key: str, source: str, tokenizer, documents: Iterable[str], single: bool,
                  val_fraction: float, max_documents: int | None, chunk_documents: int, show: bool) -> ShardInfo:
    vocab_size = len(tokenizer)
    run = _Run(directory, key, source, single, val_fraction, max_documents, vocab_size, token_dtype(vocab_size),
               tokenizer.eos_token_id)
    (directory / "meta.json").unlink(missing_ok=True)  # stale: another format version, or files that do not match
    state = _start_state(run)
    done = state["documents_done"]
    stream = iter(documents)
    if max_documents is not None:
        stream = itertools.islice(stream, max_documents)
    # A stream cannot seek: the documents already written are read again and passed over.
    stream = itertools.islice(stream, done, None)
    _tokenize_stream(run, tokenizer, stream, state, chunk_documents, show)
    return _finish(run, state)


def _start_state(run: _Run) -> dict:
    """The progress record to continue from, the files cut back to what it counts; or a fresh one, files emptied."""
    paths = run.paths
    state = _read_json(run.progress_path)
    if _resumable(state, run.key, paths, run.dtype):
        # A crash may have left part of a chunk after the last progress record: cut back to what it counts.
        for s in SPLITS:
            os.truncate(paths[s], state["tokens"][s] * run.dtype.itemsize)
        return state
    state = {"key": run.key, "format_version": SHARD_FORMAT_VERSION, "documents_done": 0,
             "tokens": dict.fromkeys(SPLITS, 0), "documents": dict.fromkeys(SPLITS, 0)}
    for s in SPLITS:
        paths[s].write_bytes(b"")
    return state


def _tokenize_stream(run: _Run, tokenizer, stream: Iterator[str], state: dict, chunk_documents: int,
                     show: bool) -> None:
    """Tokenize and append the stream chunk by chunk, recording progress after each whole chunk."""
    from tqdm.auto import tqdm

    files = {s: open(path, "ab") for s, path in run.paths.items()}
    bar = tqdm(total=run.max_documents, initial=state["documents_done"], unit="doc", desc="tokenizing",
               disable=not show)
    try:
        index = state["documents_done"]
        while chunk := list(itertools.islice(stream, chunk_documents)):
            if run.single and index + len(chunk) > 1:
                raise ValueError(f"{run.source} is read as one document, but the documents given hold {index + len(chunk)}")
            if run.single and not chunk[0]:
                raise DataError(f"{run.source}: the file is empty; give a file with the training text in it")
            encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            _append(run, files, _by_split(run, encoded, index), state)
            index += len(encoded)
            state["documents_done"] = index
            atomic_write_json(run.progress_path, state)
            bar.update(len(chunk))
    finally:
        bar.close()
        for f in files.values():
            f.close()


def _by_split(run: _Run, encoded: list[list[int]], first: int) -> dict[str, list[list[int]]]:
    """The token ids of documents first, first + 1, ... each followed by EOS, sorted into the splits."""
    out: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    tail = [run.eos] if run.eos is not None else []
    for index, ids in enumerate(encoded, start=first):
        if run.single:
            # Cut on the document's own tokens: train then holds exactly nanoGPT's int(n * 0.9) first
            # tokens; val gets the rest and the EOS (nothing, when the rest is empty).
            cut = int(len(ids) * (1 - run.val_fraction))
            if cut < len(ids):
                out["train"].append(ids[:cut])
                out["val"].append(ids[cut:] + tail)
            else:
                out["train"].append(ids + tail)
        else:
            out["val" if in_val(index, run.val_fraction) else "train"].append(ids + tail)
    return out


def _append(run: _Run, files: dict, out: dict[str, list[list[int]]], state: dict) -> None:
    for s in SPLITS:
        flat = np.fromiter(itertools.chain.from_iterable(out[s]), dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= run.vocab_size):
            raise ValueError(f"the tokenizer gave id {int(flat.max())} outside its {run.vocab_size} entries")
        _fsync_append(files[s], flat.astype(run.dtype))
        state["tokens"][s] += int(flat.size)
        state["documents"][s] += len(out[s])


def _finish(run: _Run, state: dict) -> ShardInfo:
    """Check the files against the progress record, then write meta.json: the shards are complete."""
    paths = run.paths
    if state["documents_done"] == 0:
        raise DataError(f"{run.source}: no documents; check data.source, data.subset and data.split")
    for s in SPLITS:  # what the progress record counts is what the files hold, or the run is not done
        if paths[s].stat().st_size != state["tokens"][s] * run.dtype.itemsize:
            raise RuntimeError(f"{paths[s]}: size does not match the {state['tokens'][s]} tokens written")
    meta = {
        "format_version": SHARD_FORMAT_VERSION,
        "key": run.key,
        "source": run.source,
        "split_by": "position" if run.single else "document",
        "val_fraction": run.val_fraction,
        "max_documents": run.max_documents,
        "dtype": run.dtype.name,
        "vocab_size": run.vocab_size,
        "eos_token_id": run.eos,
        "tokens": state["tokens"],
        "documents": state["documents"],
        "documents_read": state["documents_done"],
        "sha256": {s: _sha256_file(paths[s]) for s in SPLITS},
    }
    atomic_write_json(run.directory / "meta.json", meta)
    run.progress_path.unlink(missing_ok=True)
    return ShardInfo.load(run.directory)
