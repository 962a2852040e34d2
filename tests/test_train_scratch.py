"""A tiny Llama trained from scratch (tokenizer trained offline) really learns, and a stock pipeline loads it."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, pipeline

from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import finish, setup

from .conftest import scratch_recipe, write_recipe


def test_scratch_run_learns_and_loads_with_pipeline(tmp_path):
    out = tmp_path / "out"
    loaded = load_recipe(str(write_recipe(tmp_path, "scratch", scratch_recipe(out, max_steps=30, report_to=["tensorboard"]))))
    run = setup(loaded)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    assert run.summary["trainable_params"] == run.summary["total_params"] > 0

    summary = finish(run)

    assert summary["final_loss"] < 0.6 * summary["first_loss"], summary
    changed = [n for n, p in run.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before)
    # The output directory: weights (safetensors), tokenizer, resolved recipe, card, logs, summary.
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "README.md", "train_summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 30
    assert "library_name: transformers" in (out / "README.md").read_text()
    assert list(out.glob("runs/**/events.out.tfevents.*")), "TensorBoard logs are written by default"
    # Memory per optimizer step (resident memory on CPU; allocated and reserved, now and peak, on CUDA).
    memory = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    assert [m["step"] for m in memory] == list(range(1, 31)) and all(m["cpu_rss_bytes"] > 0 for m in memory)
    # A stock pipeline loads the output and continues text in the style it learned.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    pipe = pipeline("text-generation", model=str(out))
    text = pipe("3 + 4 =", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("3 + 4 =") and len(text) > len("3 + 4 =")
