"""Dataset mixtures (data.sources): several datasets of different formats in one SFT run, each checked against its
own format, mixed by weight (seeded) or concatenated, and counted per source in `hf-vram prepare`, the training
summary and the model card; malformed mixtures are recipe errors naming the key."""

from __future__ import annotations

import json
import math

import pytest

from data_prep.prepare import cache_key, load_examples
from hf_vram.cli import main
from hf_vram.recipe.schema import DataSection

from .conftest import SAMPLE_DATA, run_cli, write_recipe

needs_data = pytest.mark.skipif(not SAMPLE_DATA.is_dir(), reason=f"no sample data at {SAMPLE_DATA}")


def _files(folder, n_alpaca: int, n_chat: int) -> tuple[str, str]:
    """A local Alpaca file and a local ShareGPT file."""
    alpaca, chat = folder / "alpaca.json", folder / "chat.jsonl"
    alpaca.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}
                                  for i in range(n_alpaca)]))
    chat.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {i}."},
                                                            {"from": "gpt", "value": f"{i}"}]}) for i in range(n_chat)))
    return str(alpaca), str(chat)


def _mixture(alpaca: str, chat: str, **weights) -> DataSection:
    return DataSection(sources=[{"source": alpaca, "format": "alpaca", "weight": weights.get("a")},
                                {"source": chat, "format": "sharegpt", "weight": weights.get("c")}], max_length=64)


def test_weights_give_their_proportions_and_the_seed_gives_the_order(tmp_path):
    alpaca, chat = _files(tmp_path, 2000, 2000)
    data = _mixture(alpaca, chat, a=3, c=1)
    first = load_examples(data, seed=7)
    # first_exhausted: the 3-weighted source runs out first, after about 2000 + 2000/3 samples.
    n = len(first.train)
    chats = sum(ex[0][0] == "user" and ex[0][1].startswith("Say") for ex in first.train)
    assert 2400 < n < 2900 and abs(chats / n - 0.25) < 0.03, (n, chats)
    assert [c["train"] for c in first.sources] == [n - chats, chats]
    assert first.sources[0] == {"source": alpaca, "format": "alpaca", "records": 2000, "train": n - chats, "eval": 0}
    again, other = load_examples(data, seed=7), load_examples(data, seed=8)
    assert again.train == first.train and again.train_index == first.train_index
    assert other.train != first.train
    # A chat source in the mixture: the Alpaca records become user/assistant turns for the one chat template.
    assert ["Add 0 and 1.", "1"] in [[t for _, t in ex] for ex in first.train]


def test_no_weights_concatenate_and_val_size_holds_out_each_source(tmp_path):
    alpaca, chat = _files(tmp_path, 40, 20)
    data = _mixture(alpaca, chat).model_copy(update={"val_size": 0.1})
    ex = load_examples(data, seed=0)
    assert [(c["train"], c["eval"]) for c in ex.sources] == [(36, 4), (18, 2)]
    assert len(ex.train) == 54 and len(ex.eval) == 6
    assert all(e[0][1].startswith("Add") for e in ex.train[:36]) and all(e[0][1].startswith("Say") for e in ex.train[36:])
    # The cache key covers every source: another source, or another weight, is another preparation.
    import types

    tok = types.SimpleNamespace(backend_tokenizer=types.SimpleNamespace(to_str=lambda: "t"), chat_template=None,
                                all_special_tokens=[], eos_token="</s>")
    keys = {cache_key(d, tok, ex) for d in (data, _mixture(alpaca, chat, a=1, c=1), _mixture(chat, alpaca))}
    assert len(keys) == 3


def test_without_a_chat_source_each_keeps_its_layout(tmp_path):
    alpaca, _ = _files(tmp_path, 5, 1)
    pc = tmp_path / "pc.jsonl"
    pc.write_text("\n".join(json.dumps({"prompt": f"p{i} =", "completion": f" {i}"}) for i in range(3)))
    data = DataSection(sources=[{"source": alpaca, "format": "alpaca", "template": "alpaca-short"},
                                {"source": str(pc), "format": "prompt_completion"}])
    ex = load_examples(data, seed=0)
    assert data.format == "alpaca" and len(ex.train) == 8
    assert ex.train[0][0] == ("prompt", "### Instruction:\nAdd 0 and 1.\n\n### Response:\n") and ex.train[5][0] == ("prompt", "p0 =")


@pytest.mark.parametrize(("data", "key"), [
    ({"source": "a.jsonl", "sources": [{"source": "b.jsonl"}]}, "data.sources"),
    ({"sources": [{"source": "a.jsonl", "weight": 0}, {"source": "b.jsonl", "weight": 1}]}, "data.sources.0.weight"),
    ({"sources": [{"source": "a.jsonl", "weight": -1}, {"source": "b.jsonl", "weight": 1}]}, "data.sources.0.weight"),
    ({"sources": [{"source": "a.jsonl", "weight": math.inf}, {"source": "b.jsonl", "weight": 1}]}, "data.sources.0.weight"),
    ({"sources": [{"source": "a.jsonl", "weight": 2}, {"source": "b.jsonl"}]}, "data.sources.1.weight"),
    ({"sources": [{"source": "a.jsonl", "formt": "alpaca"}]}, "data.sources.0.formt"),
    ({"sources": [{"source": "a.jsonl", "format": "preference"}]}, "data.sources.0.format"),
    ({"sources": [{"source": "a.jsonl"}], "split": "test"}, "data.split"),
    ({"sources": [{"source": "a.jsonl", "format": "alpaca"}], "format": "sharegpt"}, "data.format"),
    ({"sources": []}, "data.sources"),
])
def test_a_bad_mixture_is_a_recipe_error_naming_the_key(data, key, tmp_path, capsys):
    recipe = {"model": {"name_or_path": "some/model"}, "data": data}
    path = write_recipe(tmp_path, "bad", recipe)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err, err


def test_each_source_of_a_mixture_is_checked_like_data_source(tmp_path, capsys):
    """A missing file or an unknown builtin in an entry is found by validate, naming the entry's key and line; an
    unknown key in an entry lists the keys an entry takes."""
    recipe = {"model": {"name_or_path": "some/model"},
              "data": {"sources": [{"source": "missing.jsonl", "format": "alpaca"},
                                   {"source": "builtin:arithmetc", "format": "alpaca"}]}}
    assert main(["validate", str(write_recipe(tmp_path, "refs", recipe))]) == 2
    err = capsys.readouterr().err
    assert "data.sources.0.source: file 'missing.jsonl' does not exist" in err, err
    assert "data.sources.1.source: no builtin dataset 'arithmetc' (did you mean 'arithmetic'?)" in err, err
    recipe["data"]["sources"] = [{"source": "org/chats", "format": "messages", "splt": "train"}]
    assert main(["validate", str(write_recipe(tmp_path, "typo", recipe))]) == 2
    err = capsys.readouterr().err
    assert "(did you mean 'split'?)" in err and "valid keys here: source, format" in err, err


def test_a_good_mixture_validates_and_its_line_names_every_source(tmp_path, capsys):
    recipe = {"model": {"name_or_path": "some/model"},
              "data": {"sources": [{"source": "org/chats", "format": "messages", "weight": 1},
                                   {"source": "builtin:arithmetic", "format": "alpaca", "weight": 2.5}]}}
    path = write_recipe(tmp_path, "good", recipe)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data a mixture of org/chats as messages (weight 1), builtin:arithmetic as alpaca (weight 2.5)" in out
    # data.format is set from the sources, and the resolved recipe (saved with every output) loads back the same.
    from hf_vram.recipe.load import load_recipe

    loaded = load_recipe(str(path))
    assert loaded.recipe.data.format == "messages"
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(loaded.resolved_yaml())
    assert load_recipe(str(resolved)).recipe.data == loaded.recipe.data


def test_the_planner_counts_the_records_a_mixture_draws(tmp_path):
    from hf_vram.recipe.load import load_recipe
    from hf_vram.vram.plan import dataset_size

    alpaca, chat = _files(tmp_path, 30, 500)
    recipe = {"model": {"name_or_path": "some/model"},
              "data": {"sources": [{"source": alpaca, "format": "alpaca", "weight": 3},
                                   {"source": chat, "format": "sharegpt", "weight": 1}], "val_size": 0.1}}
    loaded = load_recipe(str(write_recipe(tmp_path, "plan", recipe)))
    # 27 Alpaca records left after the held-out 10% are 3/4 of the mixture when that source runs out: 36 samples.
    assert dataset_size(loaded) == 36
    loaded.recipe.data.sources[0].weight = loaded.recipe.data.sources[1].weight = None
    assert dataset_size(loaded) == 27 + 450


@needs_data
def test_a_mixture_of_alpaca_and_sharegpt_prepares_trains_and_is_counted_in_the_card(tiny_base, tmp_path):
    from hf_vram.recipe.load import load_recipe
    from hf_vram.runners.run import train

    alpaca, sharegpt = str(SAMPLE_DATA / "identity.json"), str(SAMPLE_DATA / "sharegpt_dummy_conversation.json")
    recipe = {
        "model": {"name_or_path": str(tiny_base)},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "data": {"sources": [{"source": alpaca, "format": "alpaca", "max_samples": 30, "weight": 1},
                             {"source": sharegpt, "format": "sharegpt", "max_samples": 30, "weight": 1}],
                 "max_length": 128, "val_size": 0.1, "placeholders": {"name": "Vram", "author": "us"}},
        "train": {"output_dir": str(tmp_path / "out"), "micro_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                  "save_steps": 100, "report_to": [], "seed": 3},
    }
    path = write_recipe(tmp_path, "mix", recipe)
    r = run_cli("prepare", str(path))
    assert r.returncode == 0, r.stderr
    assert f"source {alpaca} (alpaca): records 30, train " in r.stdout and f"source {sharegpt} (sharegpt): records 30" in r.stdout
    assert "eval 3" in r.stdout and "train: samples " in r.stdout

    summary = train(load_recipe(str(path)))
    counts = summary["data"]["sources"]
    assert [(c["format"], c["records"], c["eval"]) for c in counts] == [("alpaca", 30, 3), ("sharegpt", 30, 3)]
    assert summary["samples"] == summary["data"]["train"]["kept"] and sum(c["train"] for c in counts) == summary["data"]["train"]["samples"]
    card = (tmp_path / "out" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| data |"))
    assert "a mixture, interleaved by weight (first_exhausted)" in row
    assert f"`{alpaca}` (alpaca, weight 1, {counts[0]['train']} training / 3 held-out samples)" in row
    assert f"`{sharegpt}` (sharegpt, weight 1, {counts[1]['train']} training / 3 held-out samples)" in row
    # Both sources went through the chat template the output saves.
    assert "messages = [" in card


def test_the_card_lists_every_hub_dataset_of_a_mixture(tmp_path):
    from hf_vram.output.cards.lm import lm_card
    from hf_vram.recipe.load import load_recipe

    local, _ = _files(tmp_path, 2, 1)
    recipe = {"model": {"name_or_path": "org/base"}, "adapter": {"type": "lora"},
              "data": {"sources": [{"source": "org/chats", "format": "messages"}, {"source": local, "format": "alpaca"},
                                   {"source": "org/more", "format": "sharegpt"}]},
              "train": {"output_dir": str(tmp_path / "out")}}
    card = lm_card(load_recipe(str(write_recipe(tmp_path, "card", recipe))), {})
    assert "datasets:\n- org/chats\n- org/more\n" in card
    assert "a mixture, concatenated" in card and f"`{local}` (alpaca)" in card
