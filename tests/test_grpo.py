"""Task grpo: the reward functions on known completions, the user reward's loading and its errors, the prompts and
answers read from each layout, the recipe checks, the plan's generation term, and the shipped GSM8K recipe as a
tiny variant (the tiny arithmetic base, 4-bit as shipped, on a question/answer file of the generated sums) that
trains on the CPU with its rewards logged, changes the adapter, and whose output loads and generates."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.errors import DataError
from data_prep.formats import to_examples
from data_prep.grpo import grpo_rows, mapped_record
from hf_vram.errors import RecipeError, UserError
from hf_vram.recipe.load import find_recipe, load_recipe
from hf_vram.train.rewards import (
    answer_format,
    answer_number,
    exact_number,
    last_number,
    length_penalty,
    load_user_reward,
    reward_functions,
)

from .conftest import write_recipe

GSM8K = "qwen2.5-7b-qlora-grpo-gsm8k"


def test_exact_number_reads_the_last_number_and_gsm8k_answers():
    answers = ["Natalia sold 48/2 = 24 clips.\n#### 72", "72", "1,000", "3.50", "-4"]
    completions = ["So she sold 72 clips.", "I think 70... no, 72", "The answer is 1000.", "$3.5", "x = -4"]
    assert exact_number(None, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert exact_number(None, ["72 or 73", "no number", "72"], answer=["#### 72", "5", "seventy-two"]) == [0.0, 0.0, 0.0]
    # Conversational completions: the content of their messages.
    assert exact_number(None, [[{"role": "assistant", "content": "it is 9"}]], answer=["9"]) == [1.0]
    assert answer_number("work 3 + 4 = 7\n#### 1,234") == Fraction(1234)
    assert last_number("a 1.5 b 2") == 2 and last_number("none") is None


def test_answer_format_wants_a_last_line_that_is_just_the_answer():
    completions = ["7", "Reasoning...\n#### 72", "so\nThe answer is 12.", "Answer: -3", "7 apples", "", "72\nmore"]
    assert answer_format(None, completions) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_length_penalty_grows_with_the_completion():
    length = length_penalty(10)
    assert length.__name__ == "length"  # trl logs each reward under its function's name
    assert length(None, ["a", "b", "c"], completion_ids=[[], [1] * 5, [1] * 30]) == [0.0, -0.5, -1.0]
    assert length(None, ["one two"]) == [-0.2]  # without token ids: words


def _grpo_recipe(folder, rewards) -> str:
    data = {
        "task": "grpo", "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}, "adapter": {"type": "lora"},
        "data": {"source": "builtin:arithmetic", "format": "alpaca"},
        "train": {"micro_batch_size": 8}, "grpo": {"rewards": rewards},
    }
    return str(write_recipe(folder, "g", data))


def test_user_reward_is_read_relative_to_the_recipe_and_called_as_trl_calls_it(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text(
        "def score(prompts, completions, answer, **kwargs):\n    return [float(len(c) == len(a)) for c, a in zip(completions, answer)]\n")
    loaded = load_recipe(_grpo_recipe(tmp_path, [{"builtin": "exact_number"}, {"function": "rewards/mine.py:score",
                                                                                 "weight": 0.5}]))
    funcs = reward_functions(loaded.recipe.grpo, loaded.path.parent)
    assert funcs[0] is exact_number and funcs[1].__name__ == "score"
    assert funcs[1](["p", "p"], ["12", "1"], answer=["34", "34"]) == [1.0, 0.0]


def test_user_reward_errors_name_the_key(tmp_path):
    (tmp_path / "mine.py").write_text("def other(prompts, completions, **kw):\n    return [0.0]\n")
    with pytest.raises(RecipeError, match=r"grpo\.rewards\.0\.function: file 'missing.py' does not exist"):
        load_recipe(_grpo_recipe(tmp_path, [{"function": "missing.py:score"}]))
    with pytest.raises(RecipeError, match=r"grpo\.rewards\.1\.function: 'mine.py' defines no function 'score'"):
        load_recipe(_grpo_recipe(tmp_path, [{"builtin": "length"}, {"function": "mine.py:score"}]))
    with pytest.raises(UserError, match=r"grpo\.rewards\.0\.function: 'mine.py' defines no function 'score' \(it defines: other\)"):
        load_user_reward("mine.py:score", tmp_path, "grpo.rewards.0.function")
    with pytest.raises(RecipeError, match="expected path/to/file.py:function_name"):
        load_recipe(_grpo_recipe(tmp_path, [{"function": "mine.py"}]))
    with pytest.raises(RecipeError, match="set exactly one of builtin"):
        load_recipe(_grpo_recipe(tmp_path, [{"builtin": "length", "function": "mine.py:other"}]))


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.micro_batch_size=6"], "must be a multiple of grpo.num_generations"),
    (["data.format=text"], "task grpo reads prompts with answers"),
    (["grpo.prompt_field=question", "data.format=messages"], "set it together with grpo.answer_field"),
    (["data.val_size=0.1"], "task grpo trains on prompts only"),
    (["grpo.num_generations=1"], "greater than or equal to 2"),
    (["train.fused_loss=false"], "GRPOTrainer always scores"),
])
def test_recipe_checks(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_grpo_recipe(tmp_path, [{"builtin": "exact_number"}]), overrides)


def test_prompts_and_answers_from_each_layout():
    alpaca = to_examples([{"instruction": "What is 3 + 4?", "input": "", "output": "7"}], "alpaca", "s", "alpaca-short")
    assert grpo_rows(alpaca, "alpaca", "s") == [{"prompt": "### Instruction:\nWhat is 3 + 4?\n\n### Response:\n",
                                                 "answer": "7"}]
    pc = to_examples([{"prompt": "2+2=", "completion": "4"}], "prompt_completion", "s")
    assert grpo_rows(pc, "prompt_completion", "s") == [{"prompt": "2+2=", "answer": "4"}]
    chat = to_examples([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                                      {"role": "assistant", "content": "2"}]}], "messages", "s")
    assert grpo_rows(chat, "messages", "s") == [{"prompt": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "1+1?"}], "answer": "2"}]
    gsm = mapped_record({"question": "q?", "answer": "w\n#### 3"}, "question", "answer", "messages")
    assert grpo_rows(to_examples([gsm], "messages", "s"), "messages", "s") == [
        {"prompt": [{"role": "user", "content": "q?"}], "answer": "w\n#### 3"}]
    with pytest.raises(DataError, match="record 0: task grpo needs a prompt and an assistant turn"):
        grpo_rows([[("assistant", "an answer with no prompt")]], "messages", "s")


def test_plan_counts_the_generation_and_the_gsm8k_recipe_fits_a_12_gb_card():
    from hf_vram.vram.gpus import get_gpu
    from hf_vram.vram.plan import plan_recipe

    loaded = load_recipe(GSM8K)
    plan = plan_recipe(loaded, get_gpu("rtx4070"))
    items = {i.name: i.bytes for i in plan.items}
    assert plan.fits and items["generation"] > 0
    assert plan.settings["max_length"] == loaded.recipe.data.max_length + loaded.recipe.grpo.max_completion_length
    more = plan_recipe(load_recipe(GSM8K, ["grpo.max_completion_length=1024"]), get_gpu("rtx4070"))
    assert {i.name: i.bytes for i in more.items}["generation"] > items["generation"] and more.peak > plan.peak


def test_plan_time_counts_the_sampling_bound_by_memory_bandwidth():
    from dataclasses import replace

    from hf_vram.vram.gpus import get_gpu
    from hf_vram.vram.plan import format_plan, plan_recipe

    card = get_gpu("rtx4070")
    plan = plan_recipe(load_recipe(GSM8K), card)
    # The 7B's 5.2 GiB of 4-bit weights read once per decoded token at 60% of 504 GB/s, and about a hundred kernel
    # launches per block: 384 tokens take 10 s; the prefill of 16 prompts of 256 tokens 4 s more.
    assert 13 < plan.sampling_seconds < 17, plan.sampling_seconds
    training = plan.steps * plan.tokens_per_step * plan.flops_per_token / (card.bf16_tflops * 1e12 * plan.mfu)
    assert plan.seconds == pytest.approx(training + plan.steps * plan.sampling_seconds)
    # Decoding is bound by bandwidth: twice the bandwidth, at the same FLOPs, samples faster; twice the completion
    # length, nearly twice the decoding.
    faster = plan_recipe(load_recipe(GSM8K), replace(card, memory_gbps=2 * card.memory_gbps))
    assert faster.sampling_seconds < 0.8 * plan.sampling_seconds
    longer = plan_recipe(load_recipe(GSM8K, ["grpo.max_completion_length=768"]), card)
    assert 1.5 * plan.sampling_seconds < longer.sampling_seconds < 2 * plan.sampling_seconds
    assert f"sampling included: {plan.sampling_seconds:.1f} s a step" in format_plan(load_recipe(GSM8K), plan)
    assert plan_recipe(load_recipe("demo"), card).sampling_seconds == 0  # no sampling outside task grpo


@pytest.fixture(scope="module")
def gsm8k_like_file(tmp_path_factory) -> str:
    """The generated training sums as GSM8K's records: a question and a worked answer ending in `#### N`."""
    path = tmp_path_factory.mktemp("grpo-data") / "sums.jsonl"
    records = BUILTIN_SOURCES["arithmetic"].records("alpaca", "train")[:32]
    path.write_text("".join(json.dumps({"question": r["instruction"], "answer": f"add them\n#### {r['output']}"}) + "\n"
                            for r in records))
    return str(path)


def test_gsm8k_recipe_trains_as_a_tiny_variant(tiny_base, gsm8k_like_file, tmp_path):
    """A random base never gets a sum right, so beside the shipped rewards (all 0 here, and no gradient) a user
    reward that differs between completions (their digits) gives the groups something to compare."""
    import torch
    from peft import AutoPeftModelForCausalLM

    from hf_vram.generate import pipeline_generate
    from hf_vram.runners.run import finish, setup

    overrides = {
        "model.name_or_path": str(tiny_base), "data.source": gsm8k_like_file, "data.subset": None,
        "data.max_length": 64, "grpo.max_completion_length": 8, "grpo.num_generations": 4,
        "train.output_dir": str(tmp_path / "out"), "train.micro_batch_size": 4, "train.grad_accum": 2,
        "train.max_steps": 4, "train.lr": 1e-2, "train.warmup": 0, "train.logging_steps": 1, "train.save_steps": 100,
        "train.report_to": [], "train.gradient_checkpointing": False,
        "grpo.rewards": [{"builtin": "exact_number", "weight": 1.0}, {"builtin": "answer_format", "weight": 0.2},
                         {"function": str(tmp_path / "digits.py") + ":digits", "weight": 1.0}],
    }
    (tmp_path / "digits.py").write_text("def digits(prompts, completions, **kw):\n"
                                        "    texts = [c[0]['content'] for c in completions]  # conversational: messages\n"
                                        "    return [float(sum(ch.isdigit() for ch in t)) for t in texts]\n")
    args = [f"{k}={json.dumps(v) if v is None or isinstance(v, list) else v}" for k, v in overrides.items()]
    loaded = load_recipe(str(find_recipe(GSM8K)), args)
    shipped = load_recipe(GSM8K).recipe
    assert (loaded.recipe.quant, loaded.recipe.adapter, loaded.recipe.grpo.rewards[:2]) == (
        shipped.quant, shipped.adapter, shipped.grpo.rewards)
    run = setup(loaded)
    assert run.trainer.train_dataset[0]["prompt"] == [{"role": "user", "content": "What is 0 + 0?"}]
    before = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    summary = finish(run)
    after = dict(run.trainer.model.named_parameters())
    assert any((after[n] - before[n]).abs().max() > 1e-6 for n in before), "training changed no adapter weight"
    logged = [e for e in run.trainer.state.log_history if "reward" in e]
    assert len(logged) == 4 and all("rewards/exact_number/mean" in e and "rewards/answer_format/mean" in e
                                    and "rewards/digits/mean" in e for e in logged)
    assert summary["final_reward"] == logged[-1]["reward"] and "first_reward_exact_number" in summary
    out = loaded.output_dir
    assert "- grpo" in (out / "README.md").read_text()
    (text,) = pipeline_generate(out, ["What is 3 + 4?"], max_new_tokens=4)
    assert isinstance(text, str)
    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None
    # grpo.init_adapter: a second run starts from this output's adapter weights.
    again = load_recipe(str(find_recipe(GSM8K)), [*args, f"grpo.init_adapter={out}",
                                                  f"train.output_dir={tmp_path / 'again'}"])
    second = setup(again)
    start = dict(second.trainer.model.named_parameters())
    assert all(torch.allclose(start[n].float(), after[n].float()) for n in before)
    assert second.summary["init_adapter"] == str(out)


def test_init_adapter_must_be_a_finished_adapter(tmp_path):
    from hf_vram.runners.grpo import init_adapter_path

    loaded = load_recipe(GSM8K, [f"grpo.init_adapter={tmp_path}"])
    with pytest.raises(UserError, match="holds no adapter"):
        init_adapter_path(loaded)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert init_adapter_path(loaded) == tmp_path
    with pytest.raises(RecipeError, match="continues a LoRA adapter"):
        load_recipe(GSM8K, [f"grpo.init_adapter={tmp_path}", "adapter.type=none", "quant.bits=null"])


def test_init_adapter_recipe_is_a_dependency_and_a_missing_one_is_named(tmp_path):
    from hf_vram.recipe.references import dependencies

    names = [d.name for d in dependencies(load_recipe("demo-grpo"))]
    assert names == ["demo-base", "demo-sft-short"]  # both trained first when missing, in that order
    with pytest.raises(RecipeError, match=r"grpo.init_adapter: no recipe 'demo-sft-shrt' to train first \(did you "
                                          r"mean 'demo-sft-short'\?\)"):
        load_recipe("demo-grpo", ["grpo.init_adapter=recipe:demo-sft-shrt"])
    recipe = write_recipe(tmp_path, "mine", {"extends": str(find_recipe("demo-grpo")),
                                             "grpo": {"init_adapter": "runs/sft"}})
    with pytest.raises(RecipeError, match=r"grpo.init_adapter: directory 'runs/sft' does not exist \(read relative to "):
        load_recipe(str(recipe))
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    assert load_recipe(str(recipe)).recipe.grpo.init_adapter == "runs/sft"
