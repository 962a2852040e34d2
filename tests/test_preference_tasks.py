"""Tasks orpo, simpo and kto: each shipped recipe as its tiny variant (the tiny arithmetic base, 4-bit as shipped,
on preference and unpaired files built from the generated sums: the right sum chosen / desirable, a wrong one
rejected / undesirable) trains on the CPU with the preference moving the right way, changes the adapter, and its
output loads and generates. Then the reading of format unpaired and the recipe checks of the three tasks."""

from __future__ import annotations

import json

import pytest

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.errors import DataError
from data_prep.unpaired import unpaired_examples
from hf_vram.generate import pipeline_generate
from hf_vram.recipe.load import find_recipe, load_recipe
from hf_vram.runners.run import finish, setup

from .conftest import write_recipe

ORPO, SIMPO, KTO = "mistral7b-qlora-orpo", "mistral7b-qlora-simpo", "qwen2.5-7b-qlora-kto"


def _sums(n: int = 64) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer) of the generated arithmetic's training sums."""
    records = BUILTIN_SOURCES["arithmetic"].records("alpaca", "train")[:n]
    return [(r["instruction"], r["output"], str(int(r["output"]) + 1 + i % 3)) for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("preference-data")
    pairs = [{"prompt": q, "chosen": right, "rejected": wrong} for q, right, wrong in _sums()]
    # Unpaired: every question once, its right answer desirable on even rows and its wrong one undesirable on odd
    # rows, so that each micro-batch holds both kinds (KTO's margin is logged on such batches).
    unpaired = [{"prompt": [{"role": "user", "content": q}],
                 "completion": [{"role": "assistant", "content": right if i % 2 == 0 else wrong}],
                 "label": i % 2 == 0} for i, (q, right, wrong) in enumerate(_sums())]
    files = {"preference": folder / "pairs.jsonl", "unpaired": folder / "unpaired.jsonl"}
    for key, rows in (("preference", pairs), ("unpaired", unpaired)):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def tiny_head_base(tiny_base, tmp_path_factory):
    """The tiny base with its output layer scaled up 20 times. Its random head (std 0.02) behind a frozen final norm
    bounds every logit near +-1.3, so no adapter can make one answer much likelier than another (measured: ORPO's
    NLL 5.8 -> 5.4 in 48 steps even at lr 0.1); scaled, the adapter moves the answers' probabilities as a trained
    model's would (7.3 -> 0.4 at lr 0.01)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-head-base")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(path)
    return path


def _tiny_variant(name: str, base, source: str, out, **extra):
    overrides = {
        "model.name_or_path": str(base), "data.source": source, "data.split": "train", "data.eval_split": None,
        "data.val_size": 0.125, "data.max_length": 64, "train.output_dir": str(out), "train.micro_batch_size": 8,
        "train.grad_accum": 1, "train.max_steps": 48, "train.lr": 1e-2, "train.warmup": 0, "train.logging_steps": 1,
        "train.save_steps": 100, "train.eval_steps": None, "train.report_to": [], **extra,
    }
    args = [f"{k}={json.dumps(v) if v is None or isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]
    return load_recipe(str(find_recipe(name)), args)


def _trainable(run) -> dict:
    return {n: p.detach().clone() for n, p in run.trainer.model.named_parameters() if p.requires_grad}


def _logged(run, key: str) -> list[float]:
    return [e[key] for e in run.trainer.state.log_history if key in e]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _train_and_check_output(loaded, task: str):
    """Set up, train and save; the adapter changed, the output loads (pipeline and peft) and generates."""
    from peft import AutoPeftModelForCausalLM

    shipped = load_recipe(str(find_recipe(loaded.name))).recipe
    assert (loaded.recipe.task, loaded.recipe.quant, loaded.recipe.adapter) == (task, shipped.quant, shipped.adapter)
    run = setup(loaded)
    before = _trainable(run)
    summary = finish(run)
    after = _trainable(run)
    moved = [n for n in before if (after[n] - before[n]).abs().max() > 1e-6]
    assert moved and any("lora_B" in n for n in moved), "training changed no adapter weight"
    out = loaded.output_dir
    assert (out / "adapter_config.json").is_file() and not (out / "ref").exists()
    card = (out / "README.md").read_text()
    assert f"- {task}" in card and "reward margin" in card
    (text,) = pipeline_generate(out, ["What is 3 + 4?"], max_new_tokens=4)
    assert isinstance(text, str)
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.generate(**run.tokenizer("What is 3 + 4?", return_tensors="pt"), max_new_tokens=2).shape[1] > 0
    # The model card's usage snippet runs as written.
    exec(compile(card.split("```python\n")[1].split("```")[0], "README.md", "exec"), {})
    return run, summary


def test_orpo_recipe_lowers_the_loss_and_widens_the_margin(tiny_head_base, data_files, tmp_path):
    loaded = _tiny_variant(ORPO, tiny_head_base, data_files["preference"], tmp_path / "out")
    run, summary = _train_and_check_output(loaded, "orpo")
    losses, margins = _logged(run, "loss"), _logged(run, "rewards/margins")
    print("orpo loss", _mean(losses[:4]), "->", _mean(losses[-4:]), "margin", _mean(margins[:4]), "->", _mean(margins[-4:]))
    # The loss is the chosen answers' NLL plus beta x the odds-ratio term: both fall as the right sums gain.
    assert _mean(losses[-4:]) < 0.5 * _mean(losses[:4]), losses
    assert _mean(margins[-4:]) > _mean(margins[:4]) + 0.02, margins
    assert summary["final_reward_margin"] == margins[-1] and summary["final_nll_loss"] < summary["first_nll_loss"]
    assert "eval_rewards/margins" in summary


def test_simpo_recipe_widens_the_margin(tiny_head_base, data_files, tmp_path):
    loaded = _tiny_variant(SIMPO, tiny_head_base, data_files["preference"], tmp_path / "out")
    run, summary = _train_and_check_output(loaded, "simpo")
    args = run.trainer.args
    assert (args.loss_type, args.cpo_alpha, args.simpo_gamma, args.beta) == ("simpo", 0.0, 1.6, 2.0)
    losses, margins = _logged(run, "loss"), _logged(run, "rewards/margins")
    print("simpo loss", _mean(losses[:4]), "->", _mean(losses[-4:]), "margin", _mean(margins[:4]), "->", _mean(margins[-4:]))
    # SimPO's reward is beta x the mean log-probability of an answer: no reference, so it starts away from 0.
    assert _mean(margins[-4:]) > _mean(margins[:4]) + 0.3, margins
    assert _mean(losses[-4:]) < _mean(losses[:4]), losses
    assert summary["final_reward_margin"] == margins[-1]


def test_kto_recipe_raises_desirable_over_undesirable_rewards(tiny_head_base, data_files, tmp_path):
    loaded = _tiny_variant(KTO, tiny_head_base, data_files["unpaired"], tmp_path / "out")
    run, summary = _train_and_check_output(loaded, "kto")
    losses, margins, kl = _logged(run, "loss"), _logged(run, "rewards/margins"), _logged(run, "kl")
    print("kto loss", _mean(losses[:4]), "->", _mean(losses[-4:]), "margin", _mean(margins[:4]), "->",
          _mean(margins[-4:]), "kl", kl[0], "->", kl[-1])
    # The policy starts as its reference (the base with the adapter off): rewards 0, margin 0 at the first step.
    assert abs(margins[0]) < 1e-6, margins
    assert _mean(margins[-4:]) > 0.1 and _mean(losses[-4:]) < _mean(losses[:4]), (losses, margins)
    assert len(kl) == len(losses) and summary["final_kl"] == kl[-1]
    assert summary["data"]["train"]["desirable"] and summary["data"]["train"]["undesirable"]


def _read(tmp_path, rows) -> list:
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from data_prep.sources import read_records

    return unpaired_examples(read_records(str(path), "unpaired"), str(path))


def test_unpaired_records_read_in_both_layouts(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"}]
    (a,) = _read(tmp_path, [{"messages": chat, "kto_tag": True}])
    assert (a.prompt, a.completion, a.label) == ([("system", "Be brief."), ("user", "What is 2 + 2?")], "4", True)
    (b,) = _read(tmp_path, [{"prompt": "What is 2 + 2?", "completion": "5", "label": False}])
    assert (b.prompt, b.completion, b.label) == ([("user", "What is 2 + 2?")], "5", False)
    assert list(b) == [("user", "What is 2 + 2?"), ("assistant", "5")]


def test_unpaired_refuses_a_non_boolean_label_naming_the_record(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "completion": "4", "label": "yes"}] * 2
    with pytest.raises(DataError, match=r"u\.jsonl: record 0: field 'label' must be true or false.*'yes'"):
        _read(tmp_path, rows)
    with pytest.raises(DataError, match=r"record 0: missing field 'label' \(or 'kto_tag'\)"):
        _read(tmp_path, [{"prompt": "What is 2 + 2?", "completion": "4"}])


def test_kto_needs_desirable_and_undesirable_answers(tmp_path):
    from data_prep.prepare import load_examples

    path = tmp_path / "only-good.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": right, "label": True}) + "\n"
                            for q, right, _ in _sums(6)))
    data = load_recipe(str(write_recipe(tmp_path, "kto-good", {
        "task": "kto", "model": {"name_or_path": "x"}, "data": {"source": str(path), "format": "unpaired"}}))).recipe.data
    with pytest.raises(DataError, match=r"only-good\.jsonl: 6 desirable and 0 undesirable examples"):
        load_examples(data, 0)


@pytest.mark.parametrize("recipe, message", [
    ({"task": "orpo", "data": {"source": "x.jsonl", "format": "unpaired"}}, "task orpo cannot train on format unpaired"),
    ({"task": "kto", "data": {"source": "x.jsonl", "format": "preference"}}, "task kto cannot train on format preference"),
    ({"task": "sft", "data": {"source": "x.jsonl", "format": "unpaired"}}, "format unpaired needs task: kto"),
    ({"task": "kto", "data": {"source": "x.jsonl", "format": "unpaired"}, "train": {"micro_batch_size": 1}},
     "task kto needs at least 2"),
    ({"task": "simpo", "data": {"source": "x.jsonl", "format": "preference"}, "train": {"fused_loss": True}},
     "CPOTrainer scores the full logits"),
    ({"task": "kto", "data": {"source": "x.jsonl", "format": "unpaired"}, "train": {"fused_loss": False}},
     "KTOTrainer always scores"),
])
def test_recipe_checks_of_the_preference_tasks(recipe, message):
    from pydantic import ValidationError

    from hf_vram.recipe.schema import Recipe

    with pytest.raises(ValidationError, match=message):
        Recipe.model_validate({"model": {"name_or_path": "x"}, **recipe})


def test_the_recipes_translate_to_trls_configs(tmp_path):
    """Each section reaches its trl config under trl's own names (simpo.gamma is simpo_gamma, and so on)."""
    from trl import KTOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    from hf_vram.builders.training_args import training_args

    def args_of(name):
        r = load_recipe(str(find_recipe(name))).recipe
        return r, training_args(r, str(tmp_path / name), has_eval=True)

    r, a = args_of(ORPO)
    assert type(a) is ORPOConfig and (a.beta, a.max_length) == (r.orpo.beta, r.data.max_length)
    r, a = args_of(SIMPO)
    assert type(a) is CPOConfig and (a.loss_type, a.beta, a.simpo_gamma, a.cpo_alpha) == (
        "simpo", r.simpo.beta, r.simpo.gamma, r.simpo.cpo_alpha)
    r, a = args_of(KTO)
    assert type(a) is KTOConfig and (a.beta, a.desirable_weight, a.undesirable_weight, a.max_length) == (
        r.kto.beta, r.kto.desirable_weight, r.kto.undesirable_weight, r.data.max_length)
    # KTO's KL estimate pairs each answer with its neighbour in a fixed-order micro-batch: trl's default sampler.
    assert a.train_sampling_strategy == "sequential" and a.per_device_train_batch_size >= 2
    for name in (ORPO, SIMPO, KTO):
        r, a = args_of(name)
        assert (a.learning_rate, a.gradient_accumulation_steps, a.eval_strategy) == (r.train.lr, r.train.grad_accum, "steps")
