"""A mixture of datasets (data.sources): each source read and checked against its own format, part of each held
out, then the training parts mixed by weight or concatenated.

With weights, the order comes from datasets.interleave_datasets (probabilities = the normalized weights, seed =
train.seed): the same seed gives the same samples in the same order. first_exhausted stops when a source runs
out, so no sample repeats and the proportions hold to the end; all_exhausted goes on, repeating the sources that
ran out, until every sample has been drawn once. The held-out parts are not mixed: each source's part is kept
whole, so the evaluation covers every source and never holds a copy of a training sample.

When any source is a chat format (sharegpt, messages), instruction records (alpaca, prompt_completion) become a
user turn and an assistant turn, so that every conversation-like sample goes through the one chat template the
model is used with; text samples stay whole texts (every token trained) in any mixture.

`data` is read by attribute only (a validated recipe's data section, or any object of that shape): data.sources
(each with source, format, subset, split, max_samples, weight, text_field, template), data.val_size,
data.placeholders, data.mix_stopping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_prep.formats import CHAT_FORMATS, to_examples
from data_prep.sources import read_records


def hold_out(examples: list, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held) record numbers: val_size of the examples (at least one) held out by a seeded shuffle."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(examples) * val_size))])
    return [i for i in range(len(examples)) if i not in held], sorted(held)


@dataclass
class Mixed:
    """A mixture's examples (prepare.load_examples makes them its Examples)."""

    train: list
    eval: list
    train_index: list[int]  # each sample's record number in its own source
    eval_index: list[int]
    sources: list[dict]  # per source: {source, format, records, train, eval}


def _as_chat(turns: list[tuple[str, str]], record: dict, fmt: str, placeholders: dict) -> list[tuple[str, str]]:
    """An instruction sample as a user turn and an assistant turn (text samples are left as they are)."""
    if fmt == "alpaca":
        # LLaMA-Factory's alpaca converter: the instruction, then the input, as the user's message.
        prompt = "\n\n".join(t for t in (record["instruction"], record.get("input") or "") if t.strip())
        for key, value in placeholders.items():  # as the record's other fields were filled (formats.py)
            prompt = prompt.replace("{{" + key + "}}", value)
        return [("user", prompt), ("assistant", turns[1][1])]
    if fmt == "prompt_completion":
        return [("user", turns[0][1]), ("assistant", turns[1][1])]
    return turns


def _read_source(entry, placeholders: dict, chat: bool) -> list:
    """One source's examples, checked against its format (errors name that source and record)."""
    records = read_records(entry.source, entry.format, entry.split, entry.subset)
    if entry.max_samples:
        records = records[: entry.max_samples]
    examples = to_examples(records, entry.format, entry.source, entry.template, entry.text_field, placeholders)
    if chat and entry.format not in CHAT_FORMATS:
        examples = [_as_chat(ex, rec, entry.format, placeholders) for ex, rec in zip(examples, records)]
    return examples


def mix_order(sizes: list[int], weights: list[float] | None, seed: int, stopping: str) -> list[tuple[int, int]]:
    """(source, sample) pairs in training order: concatenated without weights, else interleaved at random in the
    weights' proportions (datasets.interleave_datasets with the seed and stopping strategy)."""
    if not weights:
        return [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    import datasets

    parts = [datasets.Dataset.from_dict({"source": [s] * n, "sample": list(range(n))}) for s, n in enumerate(sizes)]
    total = sum(weights)
    mixed = datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                                         stopping_strategy=stopping)
    return list(zip(mixed["source"], mixed["sample"]))


def mixture_examples(data, seed: int) -> Mixed:
    """The examples of every source of data.sources, mixed, with per-source counts."""
    entries = data.sources
    chat = any(e.format in CHAT_FORMATS for e in entries)
    train, held, counts = [], [], []
    for entry in entries:
        examples = _read_source(entry, data.placeholders, chat)
        kept, out = hold_out(examples, data.val_size, seed) if data.val_size else (list(range(len(examples))), [])
        train.append([(i, examples[i]) for i in kept])
        held += [(i, examples[i]) for i in out]
        counts.append({"source": entry.source, "format": entry.format, "records": len(examples), "train": 0,
                       "eval": len(out)})
    weights = [e.weight for e in entries] if entries[0].weight is not None else None
    order = mix_order([len(t) for t in train], weights, seed, data.mix_stopping)
    for s, _ in order:
        counts[s]["train"] += 1
    return Mixed([train[s][i][1] for s, i in order], [ex for _, ex in held],
                 [train[s][i][0] for s, i in order], [i for i, _ in held], counts)
