"""Pretraining shards (nanoGPT's train.bin / val.bin): real tokenizers, real files, real datasets streaming.

Generated text runs always; the public samples (C4 excerpt, tinyshakespeare) are skipped when absent.
"""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data_prep.shards import (
    SHARD_FORMAT_VERSION,
    ShardInfo,
    TokenBlocks,
    in_val,
    is_single_document,
    iter_documents,
    prepare_shards,
    shard_key,
    token_dtype,
)
from data_prep.tokenizer import SPECIALS, train_bpe, train_char
from hf_vram.errors import DataError, UserError

from .conftest import SAMPLE_DATA

C4 = SAMPLE_DATA / "c4_demo.jsonl"
SHAKESPEARE = SAMPLE_DATA / "tinyshakespeare.txt"
WORDS = "the a of tide ship sail wind harbour north stone river café naïve 42 3.14 (why?) — \"quoted\" don't".split()


def generated_documents(n: int = 120, seed: int = 0) -> list[str]:
    """Documents of varied length (one of them empty), with punctuation, digits, accents and line breaks."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        docs.append(f"doc {i}: " + "\n".join(lines))
    docs[7] = ""
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return generated_documents()


@pytest.fixture(scope="module")
def bpe(docs):
    return train_bpe(docs, vocab_size=320, model_max_length=64)


def split_on_eos(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    """Documents of a shard: the stream cut after every EOS (each document ends with one)."""
    assert len(stream) == 0 or stream[-1] == eos
    ends = np.flatnonzero(stream == eos)
    return np.split(np.asarray(stream), ends + 1)[:-1]


def decoded(tok, stream: np.ndarray) -> list[str]:
    return [tok.decode(d[:-1].tolist()) for d in split_on_eos(stream, tok.eos_token_id)]


def raising_after(documents, n: int):
    """The documents, then a crash in the middle of the stream (as a killed process or a dropped connection)."""
    for i, doc in enumerate(documents):
        if i == n:
            raise RuntimeError("simulated crash")
        yield doc


def never_read():
    raise AssertionError("cached shards must not read the source again")
    yield  # pragma: no cover


# --- character-level tokenizer ---------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_one_token_per_character(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All: Speak, speak!  ;-) 'tis?\t&$3"
    tok = train_char([text], model_max_length=128)
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.convert_ids_to_tokens(ids) == list(text)
    assert tok.decode(ids) == text
    # Specials first, in SPECIALS' order, then the characters sorted: ids do not depend on reading order.
    vocab = tok.get_vocab()
    assert [vocab[s] for s in SPECIALS.values()] == [0, 1, 2, 3]
    assert [vocab[c] for c in sorted(set(text))] == list(range(4, 4 + len(set(text))))
    assert len(tok) == 4 + len(set(text))
    assert tok("Z")["input_ids"] == [tok.unk_token_id]  # unseen character
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"

    tok.save_pretrained(tmp_path / "char")
    again = AutoTokenizer.from_pretrained(tmp_path / "char")
    assert again(text)["input_ids"] == ids
    assert again.decode(ids) == text
    assert again.eos_token_id == tok.eos_token_id and len(again) == len(tok)


def test_char_tokenizer_on_tinyshakespeare_has_nanogpt_vocabulary():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text()
    tok = train_char([text], model_max_length=256)
    assert len(set(text)) == 65  # nanoGPT's shakespeare_char: "vocab size: 65"
    assert len(tok) == 65 + len(SPECIALS)
    assert tok.convert_ids_to_tokens(list(range(4, 69))) == sorted(set(text))


# --- documents and keys ----------------------------------------------------------------------------------------


def test_iter_documents_reads_jsonl_records_and_txt_whole(tmp_path):
    if not C4.is_file():
        pytest.skip(f"{C4} not present")
    expected = [json.loads(line)["text"] for line in C4.read_text().splitlines()]
    assert list(iter_documents(str(C4))) == expected
    assert len(expected) == 300

    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"line one\r\nline two\n\nlast")
    assert is_single_document(str(txt)) and not is_single_document(str(C4))
    assert list(iter_documents(str(txt))) == ["line one\r\nline two\n\nlast"]  # one document, bytes as on disk


def test_shard_key_follows_content_not_name(tmp_path, bpe):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "hello"}\n')
    b.write_text('{"text": "hello"}\n')
    args = ("text", "train", None, bpe, 0.1, None)
    assert shard_key(str(a), *args) == shard_key(str(b), *args)  # a renamed copy reuses the cache
    key = shard_key(str(a), *args)
    a.write_text('{"text": "hello!"}\n')
    assert shard_key(str(a), *args) != key
    assert shard_key(str(b), "text", "train", None, bpe, 0.2, None) != shard_key(str(b), *args)
    assert shard_key(str(b), "text", "train", None, bpe, 0.1, 10) != shard_key(str(b), *args)
    assert shard_key("org/corpus", *args) != shard_key("org/corpus", "text", "train", "en", bpe, 0.1, None)
    char = train_char(["hello"], 64)
    assert shard_key(str(b), "text", "train", None, char, 0.1, None) != shard_key(str(b), *args)


def test_val_assignment_is_a_stable_hash_of_the_index():
    picks = [in_val(i, 0.1) for i in range(20_000)]
    assert picks == [in_val(i, 0.1) for i in range(20_000)]
    assert 0.09 < sum(picks) / len(picks) < 0.11
    assert not any(in_val(i, 0.0) for i in range(1000))


def test_token_dtype_is_the_narrowest_that_holds_every_id():
    assert token_dtype(69) == np.uint16
    assert token_dtype(50257) == np.uint16  # GPT-2
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535: the largest uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(100277) == np.uint32  # cl100k
    with pytest.raises(ValueError):
        token_dtype(0)


# --- preparation -----------------------------------------------------------------------------------------------


def test_shards_hold_every_document_once_in_order(tmp_path, docs, bpe):
    info = prepare_shards("generated:docs", bpe, tmp_path, val_fraction=0.2, chunk_documents=16, progress=False,
                          documents=docs)
    assert info.dtype == "uint16" and info.vocab_size == len(bpe) and len(info.key) == 16
    assert info.directory == tmp_path / info.key
    assert sorted(os.listdir(info.directory)) == [".lock", "meta.json", "train.bin", "val.bin"]  # progress.json gone

    held = [in_val(i, 0.2) for i in range(len(docs))]
    train = info.tokens("train")
    val = info.tokens("val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    assert decoded(bpe, train) == [d for d, v in zip(docs, held) if not v]
    assert decoded(bpe, val) == [d for d, v in zip(docs, held) if v]
    assert 0 < sum(held) < len(docs)
    assert info.documents == {"train": held.count(False), "val": held.count(True)}
    expected_tokens = {s: sum(len(bpe(d, add_special_tokens=False)["input_ids"]) + 1 for d, v in zip(docs, held)
                           if v == (s == "val")) for s in ("train", "val")}
    assert info.num_tokens == expected_tokens == {"train": len(train), "val": len(val)}

    meta = json.loads((info.directory / "meta.json").read_text())
    assert meta["format_version"] == SHARD_FORMAT_VERSION and meta["key"] == info.key
    assert meta["split_by"] == "document" and meta["documents_read"] == len(docs)
    assert ShardInfo.load(info.directory) == info


def test_c4_sample_shards_decode_to_the_records(tmp_path):
    if not C4.is_file():
        pytest.skip(f"{C4} not present")
    records = [json.loads(line)["text"] for line in C4.read_text().splitlines()]
    tok = train_bpe(records[:50], vocab_size=400, model_max_length=256)
    info = prepare_shards(str(C4), tok, tmp_path, val_fraction=0.1, progress=False)
    held = [in_val(i, 0.1) for i in range(len(records))]
    assert decoded(tok, info.tokens("train")) == [r for r, v in zip(records, held) if not v]
    assert decoded(tok, info.tokens("val")) == [r for r, v in zip(records, held) if v]
    assert info.documents["train"] + info.documents["val"] == 300

    few = prepare_shards(str(C4), tok, tmp_path, val_fraction=0.1, max_documents=40, progress=False)
    assert few.key != info.key and few.meta["documents_read"] == 40
    assert decoded(tok, few.tokens("train")) == [r for r, v in zip(records[:40], held) if not v]


def test_same_input_gives_same_key_and_bytes_and_is_served_from_cache(tmp_path, docs, bpe):
    first = prepare_shards("generated:docs", bpe, tmp_path / "a", val_fraction=0.1, progress=False, documents=docs)
    elsewhere = prepare_shards("generated:docs", bpe, tmp_path / "b", val_fraction=0.1, progress=False, documents=docs)
    assert first.key == elsewhere.key and first.sha256 == elsewhere.sha256 and first.num_tokens == elsewhere.num_tokens
    for split in ("train", "val"):
        assert (first.directory / f"{split}.bin").read_bytes() == (elsewhere.directory / f"{split}.bin").read_bytes()

    mtimes = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    cached = prepare_shards("generated:docs", bpe, tmp_path / "a", val_fraction=0.1, progress=False, documents=never_read())
    assert cached == first
    assert {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()} == mtimes


def test_interrupted_then_resumed_equals_uninterrupted_byte_for_byte(tmp_path, docs, bpe):
    whole = prepare_shards("generated:docs", bpe, tmp_path / "whole", val_fraction=0.2, chunk_documents=8,
                           progress=False, documents=docs)

    root = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_shards("generated:docs", bpe, root, val_fraction=0.2, chunk_documents=8, progress=False,
                       documents=raising_after(docs, 30))
    folder = root / whole.key
    assert not (folder / "meta.json").exists()
    state = json.loads((folder / "progress.json").read_text())
    assert state["documents_done"] == 24  # three whole chunks of 8; the fourth died while being read
    # A process killed inside a write leaves a torn chunk after what progress.json counts.
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\x07\x00" * 5 + b"\x01")
    assert (folder / "train.bin").stat().st_size > 2 * state["tokens"]["train"]

    resumed = prepare_shards("generated:docs", bpe, root, val_fraction=0.2, chunk_documents=8, progress=False,
                             documents=docs)
    assert resumed.key == whole.key and resumed.num_tokens == whole.num_tokens and resumed.sha256 == whole.sha256
    assert resumed.documents == whole.documents
    for split in ("train", "val"):
        assert (folder / f"{split}.bin").read_bytes() == (whole.directory / f"{split}.bin").read_bytes()
    assert not (folder / "progress.json").exists()


def test_text_file_is_split_by_position(tmp_path):
    text = "Line one.\r\nLine two, longer!\n\n" * 20
    path = tmp_path / "input.txt"
    path.write_bytes(text.encode())
    tok = train_char([text], model_max_length=64)
    info = prepare_shards(str(path), tok, tmp_path / "cache", val_fraction=0.25, progress=False)
    cut = int(len(text) * 0.75)
    assert info.meta["split_by"] == "position" and info.documents == {"train": 1, "val": 1}
    assert info.num_tokens == {"train": cut, "val": len(text) - cut + 1}
    assert tok.decode(info.tokens("train").tolist()) == text[:cut]
    val = info.tokens("val")
    assert tok.decode(val[:-1].tolist()) == text[cut:] and val[-1] == tok.eos_token_id

    # Nothing held out: the whole document and its EOS are train.
    none_held = prepare_shards(str(path), tok, tmp_path / "cache", val_fraction=0.0, progress=False)
    assert none_held.num_tokens == {"train": len(text) + 1, "val": 0}
    assert len(none_held.tokens("val")) == 0


def test_tinyshakespeare_char_split_matches_nanogpt(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text()
    tok = train_char([text], model_max_length=256)
    info = prepare_shards(str(SHAKESPEARE), tok, tmp_path, val_fraction=0.1, progress=False)
    # nanoGPT: "train has 1,003,854 tokens", "val has 111,540 tokens". The cut is on the document's own tokens,
    # so train is exactly nanoGPT's; val is nanoGPT's plus the EOS that ends the document.
    assert len(text) == 1_115_394
    assert info.num_tokens == {"train": 1_003_854, "val": 111_540 + 1}
    assert info.dtype == "uint16"
    train = info.tokens("train")
    assert tok.decode(train[:200].tolist()) == text[:200]
    assert tok.decode(train[-200:].tolist()) == text[1_003_854 - 200 : 1_003_854]
    assert tok.decode(info.tokens("val")[:-1].tolist()) == text[1_003_854:]


# --- blocks ----------------------------------------------------------------------------------------------------


def test_token_blocks_are_lazy_non_overlapping_windows(tmp_path, docs, bpe):
    info = prepare_shards("generated:docs", bpe, tmp_path, val_fraction=0.2, progress=False, documents=docs)
    stream = np.asarray(info.tokens("train"), dtype=np.int64)
    blocks = TokenBlocks(info, "train", block_size=32)
    assert len(blocks) == len(stream) // 32 > 10
    assert blocks._tokens is None  # nothing read until a block is asked for
    first, last = blocks[0], blocks[len(blocks) - 1]
    assert isinstance(blocks._tokens, np.memmap)
    assert first["input_ids"].dtype == torch.long and first["input_ids"].shape == (32,)
    assert torch.equal(first["input_ids"], torch.from_numpy(stream[:32]))
    assert torch.equal(first["labels"], first["input_ids"]) and first["labels"] is not first["input_ids"]
    assert torch.equal(last["input_ids"], torch.from_numpy(stream[(len(blocks) - 1) * 32 : len(blocks) * 32]))
    assert torch.equal(blocks[-1]["input_ids"], last["input_ids"])
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    joined = torch.cat([blocks[i]["input_ids"] for i in range(len(blocks))])
    assert torch.equal(joined, torch.from_numpy(stream[: len(blocks) * 32]))  # the tail is what is dropped

    # DataLoader workers receive a pickled copy: it carries the path, not the mapped tokens, and maps on use.
    copy = pickle.loads(pickle.dumps(blocks))
    assert copy._tokens is None and len(pickle.dumps(blocks)) < 2000
    assert torch.equal(copy[3]["input_ids"], blocks[3]["input_ids"])
    batch = next(iter(torch.utils.data.DataLoader(blocks, batch_size=4)))
    assert batch["input_ids"].shape == (4, 32)


# --- errors a user can fix -------------------------------------------------------------------------------------


def test_missing_file_is_a_data_error(tmp_path, bpe):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="nowhere.jsonl.*does not exist"):
        iter_documents(str(missing))
    with pytest.raises(DataError, match="nowhere.jsonl.*does not exist"):
        prepare_shards(str(missing), bpe, tmp_path, progress=False)
    assert issubclass(DataError, UserError)


def test_record_without_text_field_names_file_record_field_and_fix(tmp_path, bpe):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"content": "wrong field", "id": 3}\n')
    with pytest.raises(DataError) as err:
        list(iter_documents(str(path)))
    message = str(err.value)
    for part in ("mixed.jsonl", "record 2", "'text'", "content, id", "data.text_field"):
        assert part in message
    with pytest.raises(DataError, match="record 0.*'body'.*text"):
        prepare_shards(str(path), bpe, tmp_path / "cache", text_field="body", progress=False)


def test_split_other_than_train_of_a_local_file_is_a_data_error(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="corpus.jsonl.*split 'validation'.*data.split"):
        iter_documents(str(path), split="validation")


def test_unreachable_hub_dataset_is_a_data_error():
    with pytest.raises(DataError, match="no-such-org/no-such-corpus.*subset 'en'.*split 'train'"):
        list(iter_documents("no-such-org/no-such-corpus", subset="en"))


def test_empty_sources_are_data_errors(tmp_path, bpe):
    with pytest.raises(DataError, match="no documents"):
        prepare_shards("generated:none", bpe, tmp_path, progress=False, documents=[])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        prepare_shards(str(empty), bpe, tmp_path, progress=False)


def test_split_shorter_than_a_block_says_how_many_tokens_and_what_to_change(tmp_path, bpe):
    info = prepare_shards("generated:short", bpe, tmp_path, val_fraction=0.0, progress=False,
                          documents=["a short one", "and another"])
    assert info.num_tokens["val"] == 0
    n = info.num_tokens["train"]
    with pytest.raises(DataError, match=rf"train split has {n} tokens.*block of 512.*smaller data.max_length"):
        TokenBlocks(info, "train", block_size=512)
    with pytest.raises(DataError, match=r"val split has 0 tokens.*smaller data.max_length or a larger val_fraction"):
        TokenBlocks(info, "val", block_size=8)
    assert len(TokenBlocks(info, "train", block_size=n)) == 1


def test_text_file_that_is_not_utf8_is_a_data_error(tmp_path, bpe):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 3.*convert the file to UTF-8"):
        prepare_shards(str(path), bpe, tmp_path / "cache", progress=False)
