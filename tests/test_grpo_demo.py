"""The offline GRPO demo: `hf-vram train demo-grpo` trains its chain on demand (demo-base from scratch, the short
QLoRA fine-tune of demo-sft-short, then GRPO from that adapter), and reinforcement learning from the exact-answer
reward alone raises the held-out exact match on the CPU. About two minutes on 2 cores."""

from __future__ import annotations

import json

from safetensors.torch import load_file
from transformers import pipeline

from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import train

# The rise the test asks for, out of the 20 held-out sums (never trained on, scored greedily). Chosen from runs of
# the shipped chain on 2 CPU cores: from 4 right (20%) the GRPO seeds 42, 2 and 3 reached 13, 13 and 17; with one
# thread per run (other floating-point sums, a base that starts at 6) seeds 1-3 reached 14, 16 and 17. The
# smallest rise seen was 7; the test asks for 4.
RISE = 4


def test_grpo_demo_raises_held_out_exact_match(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # every output of the chain goes under tmp_path/outputs
    summary = train(load_recipe("demo-grpo"))

    start = tmp_path / "outputs" / "demo-sft-short"
    sft = json.loads((start / "train_summary.json").read_text())
    assert (tmp_path / "outputs" / "demo-base" / "train_summary.json").is_file()  # trained first, on demand
    assert summary["init_adapter"] == "outputs/demo-sft-short"
    # GRPO starts where the fine-tune ended: the same adapter scores the same before GRPO as after the fine-tune.
    before, after = summary["score_before"]["correct"], summary["score_after"]["correct"]
    assert before == sft["score_after"]["correct"] < 20 - RISE, (sft["score_after"], summary["score_before"])
    assert after >= before + RISE, (summary["score_before"], summary["score_after"])
    # The sampled answers earn more reward by the end (the mean of the last logged steps against the first).
    assert summary["final_reward_exact_number"] > summary["first_reward_exact_number"] + 0.1, summary
    # Every adapter matrix moved away from the fine-tune's.
    out = tmp_path / "outputs" / "demo-grpo"
    init, tuned = load_file(str(start / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert init.keys() == tuned.keys() and all((init[k] - tuned[k]).abs().max() > 0 for k in init)
    card = (out / "README.md").read_text()
    assert "tuned by GRPO" in card and "starting from the adapter of `recipe:demo-sft-short`" in card
    assert "GRPO mean reward (exact_number)" in card
    assert f"Held-out exact match: {before / 20:.1%} before training, {after / 20:.1%} after" in card
    # A stock pipeline loads the adapter (with its base) and answers.
    pipe = pipeline("text-generation", model=str(out))
    text = pipe("### Instruction:\nWhat is 7 + 5?\n\n### Response:\n", max_new_tokens=4, do_sample=False,
                return_full_text=False)[0]["generated_text"]
    assert text.strip()[:1].isdigit(), text
