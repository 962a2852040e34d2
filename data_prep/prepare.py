"""A recipe's data, end to end: records -> checked examples -> held-out split -> tokens and masks, cached.

`hf-vram prepare RECIPE` runs this once; training finds the cache under OUTPUT_DIR/prepared/ and skips the
work. The cache key covers the data section, the examples read, the tokenizer (vocabulary, specials,
chat template) and the code's format version, so any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_write_json
from data_prep.errors import DataError
from data_prep.formats import Pair, to_examples
from data_prep.mixture import hold_out, mixture_examples
from data_prep.sources import read_records
from data_prep.tokenize import IGNORE, tokenize_examples
from data_prep.unpaired import check_both_labels, label_counts, unpaired_examples, unpaired_rows

# Bump when tokenization or masking changes: old caches are then ignored.
FORMAT_VERSION = 1


@dataclass
class Examples:
    train: list
    eval: list
    # Record numbers of the examples in their source (messages name the record a user can find in the file).
    train_index: list[int] = field(default_factory=list)
    eval_index: list[int] = field(default_factory=list)
    # A mixture (data.sources): per source {source, format, records, train, eval}, the samples it gave each split.
    sources: list[dict] = field(default_factory=list)


def load_examples(data, seed: int) -> Examples:
    """Records of the recipe's source, checked against data.format, with the held-out part split off; for a
    mixture (data.sources), every source's, mixed (data_prep/mixture.py)."""
    if getattr(data, "sources", None):
        m = mixture_examples(data, seed)
        return Examples(m.train, m.eval, m.train_index, m.eval_index, m.sources)

    def read(split):
        records = read_records(data.source, data.format, split, data.subset)
        if data.format == "unpaired":
            examples = unpaired_examples(records, data.source, data.placeholders)
        else:
            examples = to_examples(records, data.format, data.source, data.template, data.text_field, data.placeholders)
        return examples[: data.max_samples] if data.max_samples else examples

    train = read(data.split)
    if data.format == "unpaired":
        check_both_labels(train, data.source)
    if data.eval_split:
        held = read(data.eval_split)
        return Examples(train, held, list(range(len(train))), list(range(len(held))))
    if data.val_size:
        kept, held = hold_out(train, data.val_size, seed)
        return Examples([train[i] for i in kept], [train[i] for i in held], kept, held)
    return Examples(train, [], list(range(len(train))), [])


def example_texts(examples: list):
    """Raw text of examples (tokenizer training)."""
    for ex in examples:
        turns = ex.prompt + [("assistant", ex.chosen), ("assistant", ex.rejected)] if isinstance(ex, Pair) else ex
        yield "\n".join(t for _, t in turns)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
             str(tokenizer.chat_template), str(tokenizer.all_special_tokens), str(tokenizer.eos_token)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(data, tokenizer, examples: Examples) -> str:
    """The examples themselves are hashed (they are in memory already): an edited file, a dataset folder or a new
    Hub revision changes the key, where a name or a modification time could miss it."""
    content = hashlib.sha256(repr((examples.train, examples.eval)).encode()).hexdigest()
    blob = json.dumps(
        {"data": data.model_dump(), "examples": content, "tokenizer": _tokenizer_fingerprint(tokenizer), "version": FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def preference_rows(pairs: list[Pair]) -> list[dict]:
    """Pairs -> trl's conversational preference columns: the DPO trainer renders them with the tokenizer's chat
    template (the recipe's, installed on the tokenizer), so prompt and answers meet as they do at inference."""
    def messages(turns):
        return [{"role": r, "content": c} for r, c in turns]

    return [
        {"prompt": messages(p.prompt), "chosen": messages([("assistant", p.chosen)]), "rejected": messages([("assistant", p.rejected)])}
        for p in pairs
    ]


@dataclass
class Prepared:
    train: object  # datasets.Dataset
    eval: object | None
    counts: dict  # split -> TokenCounts as a dict
    cache_dir: Path | None


def prepare_dataset(examples: Examples, tokenizer, data, cache_root: Path | None) -> Prepared:
    """Tokenized train/eval datasets ({input_ids, labels}; for preference data {prompt, chosen, rejected}),
    from the cache when it holds this exact preparation."""
    import datasets

    key = cache_key(data, tokenizer, examples)
    cache = cache_root / key if cache_root else None
    if cache and (cache / "counts.json").is_file():
        counts = json.loads((cache / "counts.json").read_text())
        ev = datasets.load_from_disk(str(cache / "eval")) if (cache / "eval").is_dir() else None
        return Prepared(datasets.load_from_disk(str(cache / "train")), ev, counts, cache)

    counts, built = {}, {}
    for split, exs, index in (("train", examples.train, examples.train_index), ("eval", examples.eval, examples.eval_index)):
        if not exs:
            continue
        if data.format == "preference":
            rows = preference_rows(exs)
            # Pairs are tokenized (and cut) by the DPO trainer; only their number is known here.
            counts[split] = {"pairs": len(rows)}
        elif data.format == "unpaired":
            # Tokenized by the KTO trainer too; the numbers of desirable and undesirable answers are known here.
            rows, counts[split] = unpaired_rows(exs), label_counts(exs)
        else:
            rows, c = tokenize_examples(exs, tokenizer, data, _source_label(data), index)
            counts[split] = c.as_dict()
        if rows:
            built[split] = datasets.Dataset.from_list(rows)
    if "train" not in built:
        raise DataError(f"{_source_label(data)}: no sample keeps a trained token (all {counts['train']['dropped']} dropped); "
                        "check data.max_length and data.train_on_prompt")
    if cache:
        # Written beside the final name, then renamed: a killed preparation leaves no cache that looks complete.
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for split, ds in built.items():
            ds.save_to_disk(str(tmp / split))
        atomic_write_json(tmp / "counts.json", counts)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return Prepared(built["train"], built.get("eval"), counts, cache)


def format_sample(row: dict, tokenizer, color: bool) -> str:
    """A tokenized sample as text, trained stretches told apart: green on a terminal, else between [[ ]]."""
    out, run, state = [], [], None

    def flush():
        if run:
            text = tokenizer.decode(run)
            if state and color:
                out.append(f"\033[32m{text}\033[0m")
            elif state:
                out.append(f"[[{text}]]")
            else:
                out.append(text)

    for tok, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE
        if trained != state:
            flush()
            run, state = [], trained
        run.append(tok)
    flush()
    return "".join(out)


def _source_label(data) -> str:
    """What an error names as the data: the source, or a mixture's sources."""
    sources = getattr(data, "sources", None)
    return ", ".join(s.source for s in sources) if sources else data.source
