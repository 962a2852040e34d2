"""lm-evaluation-harness through hf-vram: the shipped offline task `arithmetic` (the held-out sums the run scores),
`hf-vram eval OUTPUT_DIR --tasks ...` on a saved output, a recipe's eval.tasks into train_summary.json and the
model card's model-index, and the errors: an unknown task, a folder that is no output, a Hub offline or silent.

The chain trained here is a smaller demo (a tiny Llama pretrained on the arithmetic text, then QLoRA on a 4-bit
base), so that the held-out exact match is neither 0 nor 1 and its equality with hf-vram's score means something."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard

from data_prep.builtin import BUILTIN_SOURCES
from hf_vram.benchmarks.harness import Benchmarks, scores
from hf_vram.benchmarks.output_model import load_output
from hf_vram.benchmarks.tasks import PromptSettings, lm_eval_manager, load_ours, select
from hf_vram.cli import main
from hf_vram.eval_tasks import TASKS_DIR
from hf_vram.eval_tasks.arithmetic import process_results
from hf_vram.evaluate import prompt_of, score
from hf_vram.generate import greedy_generate
from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import train

from .conftest import ROOT, scratch_recipe, write_recipe

HELD_OUT = BUILTIN_SOURCES["arithmetic"].records("alpaca", "test")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(adapter output, its summary): a tiny Llama pretrained on the arithmetic text, then a QLoRA adapter on its
    4-bit base with eval.tasks [arithmetic] measured before and after training."""
    folder = tmp_path_factory.mktemp("eval-chain")
    base = scratch_recipe(folder / "base", max_steps=150, micro_batch_size=16, lr=3e-3, logging_steps=50,
                          save_steps=1000)
    del base["data"]["max_samples"]
    train(load_recipe(write_recipe(folder, "eval-base", base)))
    qlora = {
        "description": "tiny QLoRA evaluated by lm-eval",
        "model": {"name_or_path": str(folder / "base")},
        "quant": {"bits": 4, "type": "nf4", "compute_dtype": "float32"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"source": "builtin:arithmetic", "format": "alpaca", "template": "alpaca-short", "max_length": 64},
        "train": {"output_dir": str(folder / "qlora"), "micro_batch_size": 16, "max_steps": 15, "lr": 2e-3,
                  "warmup": 0, "logging_steps": 5, "save_steps": 1000, "report_to": [],
                  "optimizer": "paged_adamw_8bit"},
        "eval": {"score_samples": 20, "max_new_tokens": 8, "tasks": ["arithmetic"], "tasks_before": True},
    }
    summary = train(load_recipe(write_recipe(folder, "eval-qlora", qlora)))
    return folder / "qlora", summary


def test_arithmetic_task_asks_the_held_out_questions_as_the_score_does():
    tasks = load_ours(("arithmetic",), PromptSettings("alpaca-short", 5, 8), eos_token_id=2)
    [task] = tasks
    task.set_config(key="num_fewshot", value=0)  # as simple_evaluate sets it
    task.build_all_requests(limit=None)
    # The first score_samples held-out records (the split the fine-tune never sees), asked in the recipe's template.
    assert [i.doc["instruction"] for i in task.instances] == [r["instruction"] for r in HELD_OUT[:5]]
    assert [i.args[0] for i in task.instances] == [prompt_of("alpaca-short")(r) for r in HELD_OUT[:5]]
    assert task.instances[0].args[0] == "### Instruction:\nWhat is 0 + 6?\n\n### Response:\n"
    generation = task.instances[0].args[1]
    assert generation["until"] == [] and generation["do_sample"] is False
    assert generation["max_gen_toks"] == 8 and generation["eos_token_id"] == 2
    train_questions = {r["instruction"] for r in BUILTIN_SOURCES["arithmetic"].records("alpaca", "train")}
    assert not train_questions & {r["instruction"] for r in HELD_OUT}
    # samples 0: every held-out question; the default template is Alpaca's own (with its preamble).
    [task] = load_ours(("arithmetic",), PromptSettings(), eos_token_id=None)
    assert len(task.eval_docs) == len(HELD_OUT) == 20 and task.eval_docs[0]["prompt"].startswith("Below is")

    # Exact match reads an answer as data_prep's ArithmeticTask.score reads it.
    doc, right = HELD_OUT[0], HELD_OUT[0]["output"]
    for answer in (right, f" {right}\n", f"\n{right}\nWhat", f"{right}{right}", f"{right} ", "", f"### {right}", "x"):
        theirs = BUILTIN_SOURCES["arithmetic"].score(lambda prompts, a=answer: [a], prompt_of("alpaca"), 1)
        assert process_results(doc, [answer])["exact_match"] == theirs["accuracy"], answer


def test_arithmetic_shadows_lm_evals_tag_whose_tasks_keep_their_names():
    """lm-eval 0.4.13 ships `arithmetic` as a tag of GPT-3's ten tasks; hf-vram's own task takes the name. If lm-eval
    drops or renames the tag, or ships a task of that name, this fails and the help text must change."""
    index = lm_eval_manager().task_index
    assert index["arithmetic"].kind.name == "TAG" and "arithmetic_1dc" in index["arithmetic"].tags
    selection = select(["arithmetic", "arithmetic_2d*"], "--tasks")
    assert selection.ours == ("arithmetic",) and selection.theirs == ("arithmetic_2da", "arithmetic_2dm", "arithmetic_2ds")
    # lm-eval's own CLI with --include_path: the include path wins over lm-eval's tag as well.
    from lm_eval.tasks import TaskManager

    assert TaskManager(include_path=str(TASKS_DIR)).task_index["arithmetic"].yaml_path == TASKS_DIR / "arithmetic.yaml"


def test_recipe_eval_tasks_fill_the_summary_and_the_cards_model_index(chain):
    out, summary = chain
    before, after = summary["lm_eval_before"]["arithmetic"], summary["lm_eval_after"]["arithmetic"]
    # The in-memory model of the run, scored by lm-eval and by hf-vram alike, before and after training.
    assert before["exact_match"] == summary["score_before"]["accuracy"]
    assert after["exact_match"] == summary["score_after"]["accuracy"]
    assert 0 < after["exact_match"] < 1 and after["exact_match"] > before["exact_match"], summary
    assert after["samples"] == 20 and after["dataset"] == "builtin:arithmetic" and after["split"] == "test"
    assert json.loads((out / "train_summary.json").read_text())["lm_eval_after"] == summary["lm_eval_after"]
    assert json.loads((out / "lm_eval_before.json").read_text()) == summary["lm_eval_before"]

    card = ModelCard.load(out / "README.md")
    [result] = card.data.eval_results
    assert (result.task_name, result.dataset_type, result.dataset_split) == ("arithmetic", "builtin:arithmetic", "test")
    assert (result.metric_type, result.metric_value) == ("exact_match", after["exact_match"])
    assert result.source_url == "https://github.com/EleutherAI/lm-evaluation-harness"
    assert card.data.model_name == "eval-qlora"
    row = (f"| arithmetic | exact_match | {before['exact_match']:.4g} ± {before['exact_match_stderr']:.4g} (20 samples) "
           f"| {after['exact_match']:.4g} ± {after['exact_match_stderr']:.4g} (20 samples) |")
    assert "## Evaluation" in card.text and row in card.text, card.text


def test_hf_vram_eval_on_the_saved_output_gives_the_runs_score(chain, capsys):
    out, summary = chain
    correct, total = summary["score_after"]["correct"], summary["score_after"]["total"]
    assert main(["eval", str(out), "--tasks", "arithmetic"]) == 0
    printed = capsys.readouterr().out
    assert f"arithmetic: {correct / total:.1%} exact match ({correct}/{total} held-out)" in printed, printed
    assert "|arithmetic|" in printed  # lm-eval's own table

    # The same answers, text for text, as hf-vram's greedy generation from the loaded adapter (a 4-bit base).
    loaded, model, tokenizer = load_output(out)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    settings = PromptSettings.of(loaded.recipe)
    # As in a run, where the model trains next: lm-eval seeds torch and puts the model in eval mode; both come back.
    model.train()
    rng = torch.random.get_rng_state()
    [result] = Benchmarks(["arithmetic"], settings, "test").run(model, tokenizer, limit=7, log_samples=True)
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    model.eval()
    answers = [s["resps"][0][0] for s in result["samples"]["arithmetic"]]
    expected = greedy_generate(model, tokenizer, [prompt_of("alpaca-short")(r) for r in HELD_OUT[:7]], 8)
    assert answers == expected
    assert scores([result])["arithmetic"]["samples"] == 7
    assert score(loaded.recipe, model, tokenizer) == summary["score_after"]


def test_unknown_task_and_folders_that_are_no_output_are_clear_errors(chain, tmp_path, capsys):
    out, _ = chain
    assert main(["eval", str(out), "--tasks", "arithmetic,arithmatic"]) == 2
    err = capsys.readouterr().err
    assert "--tasks: no lm-eval task, group or tag 'arithmatic' (did you mean 'arithmetic'?)" in err
    assert "Traceback" not in err
    assert main(["eval", str(tmp_path), "--tasks", "arithmetic"]) == 2
    assert "is not an hf-vram output (no recipe.yaml)" in capsys.readouterr().err
    # The run's data cache is a folder of the output, not an output.
    assert main(["eval", str(out / "prepared"), "--tasks", "arithmetic"]) == 2
    with pytest.raises(Exception, match="eval.tasks: .* names a task twice"):
        load_recipe("demo", ["eval.tasks=[arithmetic,arithmetic]"])


def test_hub_tasks_offline_or_with_a_silent_hub_fail_at_once(chain):
    """Two fresh processes side by side (the Hub settings are read at import): HF_HUB_OFFLINE=1 with lm-eval's data
    not in the cache, and a Hub that accepts connections and never answers (a stalled network)."""
    out, _ = chain
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    command = [sys.executable, "-m", "hf_vram", "eval", str(out), "--tasks", "arithmetic,arithmetic_1dc"]
    envs = {"offline": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
            "silent": {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                       "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}}
    start = time.monotonic()
    try:
        procs = {k: subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for k, env in envs.items()}
        done = {k: p.communicate(timeout=120) for k, p in procs.items()}
    finally:
        silent.close()
    assert time.monotonic() - start < 60  # datasets' own retries against a silent Hub take 13 s per task or more
    for kind, (_, err) in done.items():
        assert procs[kind].returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "--tasks: arithmetic_1dc: lm-eval reads the data from the Hub, HF_HUB_OFFLINE is set and it is not in the " \
        "cache" in done["offline"][1]
    assert "--tasks: arithmetic_1dc: lm-eval reads the data from the Hub, and the Hub did not answer in 1.5 s; " \
        "connect, or set HF_HUB_OFFLINE=1" in done["silent"][1]


def test_card_lists_every_metric_of_lm_evals_tasks_with_filters(tmp_path):
    """Scores as lm-eval gives them for a Hub task read through filters (gsm8k's strict and flexible answers): each
    metric is a model-index result on the task's Hub dataset, and a row of the card's table."""
    from hf_vram.output.cards.lm import lm_card

    recipe = {"model": {"name_or_path": "openai-community/gpt2"}, "data": {"source": "builtin:arithmetic",
                                                                         "format": "alpaca"}}
    gsm8k = {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.012,
             "exact_match,flexible-extract": 0.5, "samples": 1319, "dataset": "openai/gsm8k", "split": "test"}
    summary = {"recipe": "gsm", "lm_eval_after": {"gsm8k": gsm8k}}
    card = ModelCard(lm_card(load_recipe(write_recipe(tmp_path, "gsm", recipe)), summary))
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"exact_match (strict-match)", "exact_match (flexible-extract)"}
    strict = results["exact_match (strict-match)"]
    assert (strict.dataset_type, strict.metric_type, strict.metric_value) == ("openai/gsm8k", "exact_match", 0.25)
    assert "| gsm8k | exact_match,strict-match | 0.25 ± 0.012 (1319 samples) |" in card.text
    assert "| gsm8k | exact_match,flexible-extract | 0.5 (1319 samples) |" in card.text


@pytest.mark.parametrize("recipe", ["dit-s2-cifar10", "moe-assemble-4x-tiny"])
def test_eval_tasks_are_refused_where_no_language_model_trains(recipe, capsys):
    assert main(["validate", recipe, "eval.tasks=[arithmetic]"]) == 2
    assert "eval.tasks" in capsys.readouterr().err
