"""Examples -> token ids and labels (-100 where the loss is masked), with counts of what was cut and dropped.

The text of a sample is tokenized once, whole, as the model will see it at inference; each token is then
trained or masked by the segment its first character falls in (the tokenizer's offset mapping). Tokenizing
the pieces separately would put different tokens at the seams than inference produces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from data_prep.chat import render_chat
from data_prep.formats import Pair

IGNORE = -100


@dataclass
class TokenCounts:
    samples: int = 0  # records read
    kept: int = 0  # samples left to train on
    truncated: int = 0  # samples cut at max_length
    dropped: int = 0  # samples left with no trained token (after truncation), not trained on
    tokens: int = 0  # tokens of the kept samples
    trained_tokens: int = 0  # tokens that carry loss

    def as_dict(self) -> dict:
        return asdict(self)


def segments_of(turns: list[tuple[str, str]], tokenizer, train_on_prompt: bool, where: str) -> list[tuple[str, bool]]:
    """Turns -> (text, trained) segments. Chats are rendered through the tokenizer's chat template."""
    roles = {r for r, _ in turns}
    if roles <= {"text"}:
        segments = [(t, True) for _, t in turns]
    elif roles <= {"prompt", "completion"}:
        segments = [(t, r == "completion") for r, t in turns]
    else:
        segments = render_chat(tokenizer, turns, where)
    if train_on_prompt:
        segments = [(t, True) for t, _ in segments]
    return segments


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer, max_length: int | None, chat: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). EOS is appended and trained after a trained end, unless the text already
    ends with it (templates that close each answer with EOS)."""
    text = "".join(t for t, _ in segments)
    spans, pos = [], 0
    for t, trained in segments:
        if trained:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    # A chat template writes BOS itself when it wants one; plain text gets the tokenizer's own specials.
    # Whole samples are tokenized and then cut at max_length (counted), so the length warning is noise here.
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    # A token that overlaps an answer is trained: a prompt ending in a space ("= ") puts that space in the
    # answer's first token (" 2"), which must still be learned.
    labels = [
        tok if end > start and any(start < b and end > a for a, b in spans) else IGNORE
        for tok, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    eos = tokenizer.eos_token_id
    ends_trained = next((trained for t, trained in reversed(segments) if t.strip()), False)
    if eos is not None and ends_trained:
        # Whitespace a template writes after its final end-of-turn marker is not part of the answer.
        while len(ids) > 1 and ids[-1] != eos and not tokenizer.decode(ids[-1:]).strip():
            ids.pop()
            labels.pop()
        if ids[-1] != eos:
            ids.append(eos)
            labels.append(eos)
    if max_length is None:
        return ids, labels, False
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def tokenize_examples(examples: list, tokenizer, data, source: str, indices: list[int] | None = None) -> tuple[list[dict], TokenCounts]:
    """Tokenized rows {input_ids, labels} of the examples that keep a trained token, and the counts. indices are
    the examples' record numbers in the source, for error messages."""
    counts, rows = TokenCounts(samples=len(examples)), []
    for i, turns in enumerate(examples):
        if isinstance(turns, Pair):
            raise TypeError("preference pairs are tokenized by the DPO trainer, not here")
        chat = not {r for r, _ in turns} <= {"text", "prompt", "completion"}
        record = indices[i] if indices is not None else i
        segments = segments_of(turns, tokenizer, data.train_on_prompt, f"{source}: record {record}")
        # Packed plain text is not cut here: the packer splits long documents across sequences, so no text is
        # lost. Instruction samples are cut, since a split would part an answer from its prompt.
        max_length = None if data.packing and data.format == "text" else data.max_length
        ids, labels, truncated = tokenize_segments(segments, tokenizer, max_length, chat)
        counts.truncated += truncated
        if all(label == IGNORE for label in labels):
            counts.dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
        counts.kept += 1
        counts.tokens += len(ids)
        counts.trained_tokens += sum(label != IGNORE for label in labels)
    return rows, counts
