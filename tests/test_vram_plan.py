"""`hf-vram plan`: predictions that can be computed by hand, no weights loaded, --fit, and the recipe table."""

from __future__ import annotations

import resource
import time

import pytest
from transformers import LlamaConfig

from hf_vram.errors import UserError
from hf_vram.recipe.load import find_recipe, load_recipe, shipped_recipes
from hf_vram.recipe.schema import Recipe
from hf_vram.vram.counts import count_parameters
from hf_vram.vram.estimate import GiB, estimate
from hf_vram.vram.gpus import get_gpu
from hf_vram.vram.plan import fit_overrides, plan_recipe
from hf_vram.vram.table import table_rows

from .conftest import TINY_LLAMA, run_cli

GPU = get_gpu("rtx4070")
CONFIG = LlamaConfig(vocab_size=300, **TINY_LLAMA)  # hidden 64, intermediate 128, 2 layers, 2 heads


def recipe(**sections) -> Recipe:
    base = {"model": {"name_or_path": "/nowhere"}, "data": {"source": "builtin:arithmetic", "max_length": 64}}
    return Recipe.model_validate({**base, **sections})


def items(plan) -> dict[str, int]:
    return {i.name: i.bytes for i in plan.items}


def n_params(config) -> int:
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two norms
    return layers * per_layer + 2 * v * h + h  # embeddings, untied lm_head, final norm


def test_full_fine_tune_is_4_bytes_weights_4_gradients_8_adam():
    n = n_params(CONFIG)
    plan = estimate(CONFIG, recipe(train={"optimizer": "adamw_torch"}), GPU, compute_dtype="float32")
    got = items(plan)
    assert plan.params == n == count_parameters(CONFIG, recipe()).total
    assert (got["weights"], got["gradients"], got["optimizer states"]) == (4 * n, 4 * n, 8 * n)


def test_qlora_weights_adapter_and_8bit_states_by_hand():
    r = recipe(quant={"bits": 4, "double_quant": True}, adapter={"type": "lora", "r": 8}, train={"optimizer": "paged_adamw_8bit"})
    h, i, layers, v = 64, 128, 2, 300
    linear = layers * (4 * h * h + 3 * h * i)
    lora = layers * 8 * (4 * (h + h) + 2 * (h + i) + (i + h))  # q k v o, gate up, down
    got = items(estimate(CONFIG, r, GPU, compute_dtype="bfloat16"))
    other = 2 * v * h + (2 * layers + 1) * h  # embeddings, lm_head, norms: in the compute dtype (bf16) by default
    assert got["weights"] == int(linear * 0.5 + linear / 64 * (1 + 4 / 256) + other * 2)
    fp32 = r.model_copy(update={"quant": r.quant.model_copy(update={"unquantized_dtype": "float32"})})
    # quant.unquantized_dtype: float32 keeps peft's prepare_model_for_kbit_training cast.
    assert items(estimate(CONFIG, fp32, GPU))["weights"] == int(linear * 0.5 + linear / 64 * (1 + 4 / 256) + other * 4)
    assert got["adapter"] == got["gradients"] == lora * 2  # bf16, as trl keeps a quantized model's adapter
    # bitsandbytes keeps fp32 states for tensors under 4,096 values, which every LoRA matrix of this tiny model is.
    assert got["optimizer states"] == lora * 8
    big = items(estimate(LlamaConfig(vocab_size=300, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                                     num_attention_heads=8), r, GPU))
    assert big["optimizer states"] == int(8 * (4 * 2048 + 2 * 3072 + 3072) * (2 + 8 / 256))  # 8-bit states
    single = items(estimate(CONFIG, r.model_copy(update={"quant": r.quant.model_copy(update={"double_quant": False})}), GPU))
    assert single["weights"] == int(linear * 0.5 + linear / 64 * 4 + other * 2)  # fp32 absmax per 64 weights


def test_activations_follow_batch_sequence_and_checkpointing():
    def act(**train):
        return items(estimate(CONFIG, recipe(train=train, data={"source": "builtin:arithmetic", "max_length": 64}), GPU))["activations"]

    assert act(micro_batch_size=8) == pytest.approx(2 * act(micro_batch_size=4), rel=1e-9)
    assert act(micro_batch_size=4, gradient_checkpointing=True) < act(micro_batch_size=4)


def test_plan_of_a_7b_recipe_loads_no_weights_and_is_quick():
    loaded = load_recipe(str(find_recipe("llama7b-qlora-alpaca")))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.time()
    plan = plan_recipe(loaded, GPU)
    seconds = time.time() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert plan.params > 6.7e9 and grown < 0.5 * GiB  # a 7B model in bf16 would be 13.5 GB
    assert seconds < 5, seconds
    assert plan.fits and 5 * GiB < plan.total < 10 * GiB


def test_fit_makes_a_recipe_that_does_not_fit_fit():
    too_big = ["train.micro_batch_size=16", "train.grad_accum=1", "train.gradient_checkpointing=false", "train.optimizer=adamw_torch"]
    loaded = load_recipe(str(find_recipe("llama7b-qlora-alpaca")), too_big)
    assert not plan_recipe(loaded, GPU).fits
    changes, fitted = fit_overrides(loaded, GPU)
    assert fitted.fits and changes
    refit = plan_recipe(load_recipe(str(find_recipe("llama7b-qlora-alpaca")), [*too_big, *changes]), GPU)
    assert refit.fits and refit.total == fitted.total
    micro = int(next(c for c in changes if c.startswith("train.micro_batch_size=")).split("=")[1])
    accum = int(next(c for c in changes if c.startswith("train.grad_accum=")).split("=")[1])
    assert micro * accum == 16  # the global batch is kept


def test_the_table_has_every_shipped_recipe():
    rows = table_rows(GPU)
    assert [r["recipe"] for r in rows] == list(shipped_recipes())
    trained = [r for r in rows if r["kind"] != "assemble"]
    assert all(r["predicted_peak_gib"] > 0 and r["fits"] for r in trained)
    assert {r["recipe"]: r["longest_context"] for r in rows}["llama3-8b-qlora-longctx"] >= 32768
    # An assembly trains nothing: its row gives the assembled model's size, and its fine-tune has its own row.
    assert all(r["parameters"] > 0 and r["fits"] == "-" for r in rows if r["kind"] == "assemble")
    # Every shipped diffusion recipe is sized for the 12 GB card as it is (offline: the frozen parts' configs are known).
    diffusion = [r for r in rows if r["kind"].startswith("diffusion")]
    assert len(diffusion) >= 4 and all(r["fits"] == "yes" and r["predicted_hours"] is not None for r in diffusion)


def test_plan_cli_prints_the_breakdown_and_verdict():
    r = run_cli("plan", "llama7b-qlora-alpaca", "--gpu", "rtx3060")
    assert r.returncode == 0, r.stderr
    for line in ("weights", "adapter", "gradients", "optimizer states", "activations", "logits and loss", "CUDA context", "peak"):
        assert line in r.stdout
    assert "RTX 3060 12 GB" in r.stdout and "fits" in r.stdout and "time:" in r.stdout
    r = run_cli("plan", "llama7b-qlora-alpaca", "--gpu", "rtx407")
    assert r.returncode == 2 and "did you mean 'rtx4070'" in r.stderr


def test_unknown_gpu_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'h100'"):
        get_gpu("h10")


def test_training_refuses_a_recipe_predicted_not_to_fit_or_fits_it_with_auto_fit():
    from hf_vram.vram.preflight import preflight

    too_big = ["train.micro_batch_size=16", "train.grad_accum=1", "train.gradient_checkpointing=false", "train.optimizer=adamw_torch"]
    loaded = load_recipe(str(find_recipe("llama7b-qlora-alpaca")), too_big)
    with pytest.raises(UserError, match=r"predicted to need .* over the 12.00 GiB of RTX 4070 12 GB; it fits with: train\.micro_batch_size="):
        preflight(loaded, GPU)
    fitted = preflight(load_recipe(str(find_recipe("llama7b-qlora-alpaca")), [*too_big, "train.auto_fit=true"]), GPU)
    t = fitted.recipe.train
    assert t.micro_batch_size * t.grad_accum == 16 and plan_recipe(fitted, GPU).fits
    assert preflight(load_recipe(str(find_recipe("llama7b-qlora-alpaca"))), GPU).recipe.train.micro_batch_size == 4  # fits: unchanged


def test_gpu_vram_check_script_predicts_its_cases_without_a_gpu():
    import subprocess
    import sys

    from .conftest import ROOT

    r = subprocess.run([sys.executable, "bench/gpu_vram_check.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "llama-7b qlora" in r.stdout and "GiB" in r.stdout


def test_longest_context_is_the_longest_length_that_fits():
    """The binary search per stretch of the auto settings agrees with trying every multiple of 256."""
    from hf_vram.vram.plan import longest_context, with_setting

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8)
    card = get_gpu("rtx3060")
    for setting in ({}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True, "activation_offloading": True}):
        r = recipe(quant={"bits": 4}, adapter={"type": "lora"}, train={"micro_batch_size": 1, **setting})
        counts = count_parameters(config, r)
        got = longest_context(config, r, card, counts, limit=1 << 17)

        scanned = max((n for n in range(256, (1 << 17) + 1, 256)
                       if estimate(config, with_setting(r, "data.max_length", n), card, counts=counts).fits), default=0)
        assert got == scanned and got > 0, (setting, got, scanned)


def test_llama3_8b_trains_32k_tokens_on_a_12gb_card():
    """The issue's goal, as the plan sees it: Llama-3-8B QLoRA at 32,768 tokens on an RTX 4070."""
    r = run_cli("plan", "llama3-8b-qlora-chat", "--longest", "--gpu", "rtx4070")
    assert r.returncode == 0, r.stderr
    longest = int(r.stdout.split("at micro-batch 1: ")[1].split(" tokens")[0].replace(",", ""))
    assert longest >= 32768, r.stdout
    r = run_cli("plan", "llama3-8b-qlora-longctx", "--gpu", "rtx4070")
    assert r.returncode == 0 and "fits" in r.stdout, r.stdout + r.stderr
    for saving in ("unquantized weights in the compute dtype", "fused LM-head loss", "activation offloading", "tiled MLP"):
        assert "  saves " in r.stdout and saving in r.stdout, saving
    assert "host memory" in r.stdout and "in CPU memory" in r.stdout


def test_each_saving_lowers_the_peak_of_a_long_sequence():
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    on = recipe(quant={"bits": 4}, adapter={"type": "lora", "dropout": 0.0}, data={"source": "builtin:arithmetic", "max_length": 32768},
                train={"micro_batch_size": 1, "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"})
    from hf_vram.vram.plan import SAVINGS, with_setting

    counts = count_parameters(config, on)
    peak = estimate(config, on, GPU, counts=counts).total
    assert peak < 12 * GiB
    for key, off, _ in SAVINGS:
        assert estimate(config, with_setting(on, key, off), GPU, counts=counts).total > peak + 0.5 * GiB, key
    # Offloading moves the checkpoints to host memory: 32 layers x 32k tokens x 4,096 x 2 bytes.
    assert estimate(config, on, GPU, counts=counts).host_bytes == 32 * 32768 * 4096 * 2
