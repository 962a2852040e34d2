"""Shared fixtures: tiny models built from configs and saved locally, recipes written to temp folders.

Nothing here touches the network: every model is random and tiny (2 layers, width 64), loaded by path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
# Real public sample data (Alpaca, ShareGPT, preference pairs, C4, ...) kept beside the project, not in it.
SAMPLE_DATA = Path(os.environ.get("HF_VRAM_SAMPLE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A tiny Llama: wide enough for bitsandbytes' 64-value quantization blocks, small enough for CPU steps in ms.
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def write_recipe(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scratch_recipe(output_dir: Path, **train) -> dict:
    """A tiny Llama from scratch on the generated arithmetic text."""
    return {
        "description": "tiny from-scratch test",
        "model": {"arch": "llama", "config": dict(TINY_LLAMA)},
        "tokenizer": {"train": True, "vocab_size": 300},
        "data": {"source": "builtin:arithmetic", "format": "text", "max_length": 64, "packing": True, "max_samples": 400},
        "train": {
            "output_dir": str(output_dir),
            "micro_batch_size": 8,
            "max_steps": 20,
            "lr": 3e-3,
            "warmup": 0,
            "logging_steps": 1,
            "save_steps": 10,
            "report_to": [],
            **train,
        },
    }


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_vram", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def one_thread():
    """Torch on one thread: tiny matrices gain nothing from a second one (it only fights other jobs for the shared
    cores), and one thread gives the same reduction order on both sides of a comparison."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on the arithmetic text, saved by save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.builtin import BUILTIN_SOURCES
    from data_prep.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tiny-base")
    texts = [r["text"] for r in BUILTIN_SOURCES["arithmetic"].records("text")[:500]]
    tok = train_bpe(texts, vocab_size=300, model_max_length=128)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **TINY_LLAMA,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_english_base(tmp_path_factory) -> Path:
    """A tiny Llama pretrained by hf-vram for a few hundred steps on real English (the C4 sample), with its own
    BPE vocabulary: a base whose representations an adapter can build on, unlike a random one."""
    from hf_vram.recipe.load import load_recipe
    from hf_vram.runners.run import train

    folder = tmp_path_factory.mktemp("english-base")
    recipe = scratch_recipe(folder / "out", max_steps=200, micro_batch_size=16, lr=3e-3, logging_steps=50, save_steps=1000)
    recipe["tokenizer"]["vocab_size"] = 1000
    recipe["model"]["config"]["max_position_embeddings"] = 512
    recipe["data"] = {"source": str(SAMPLE_DATA / "c4_demo.jsonl"), "format": "text", "max_length": 128, "packing": True}
    train(load_recipe(str(write_recipe(folder, "english-base", recipe))))
    return folder / "out"


# `make test-fast` (pytest -m unit): the pure unit tests, under a minute on two CPU cores. Marked here rather than in
# the test files: whole modules (module -> the tests left out of it), and the quick tests of slower modules by name,
# among them the guards of library behaviour that hf-vram works around.
UNIT_MODULES: dict[str, set[str]] = {
    "test_bitnet.py": set(),
    "test_data_prep.py": set(),
    "test_data_prep_standalone.py": set(),
    "test_formats_and_masks.py": {"test_prepare_cli_inspects_masks_and_refuses_a_wrong_format"},
    "test_images.py": set(),
    "test_layout.py": set(),
    "test_library_workarounds.py": set(),
    "test_merge.py": set(),
    "test_moe_assemble.py": set(),
    "test_pretrain_shards.py": set(),
    "test_recipe_errors.py": set(),
    "test_recipes_validate.py": set(),
    "test_retnet.py": set(),
    "test_tool_calls_and_parts.py": set(),
    "test_translation.py": set(),
    "test_ui_parts.py": set(),
    "test_vram_measure.py": set(),
}
UNIT_TESTS: dict[str, set[str]] = {
    "test_diffusion.py": {"test_recipe_errors_for_diffusion"},
    "test_diffusion_recipes.py": {"test_every_shipped_diffusion_recipe_is_covered"},
    "test_eval_harness.py": {
        "test_arithmetic_task_asks_the_held_out_questions_as_the_score_does",
        "test_arithmetic_shadows_lm_evals_tag_whose_tasks_keep_their_names",
        "test_card_lists_every_metric_of_lm_evals_tasks_with_filters",
        "test_eval_tasks_are_refused_where_no_language_model_trains",
    },
    "test_gguf_export.py": {
        "test_each_family_reads_back_in_transformers",
        "test_each_written_type_reads_back_within_its_tolerance",
        "test_llama3_rope_factors_are_transformers_frequency_scaling",
        "test_modelfile_template_renders_what_the_chat_template_renders",
        "test_modelfile_without_a_template_and_with_a_long_context",
        "test_a_sentencepiece_vocabulary_reads_back_with_its_scores",
        "test_the_older_sentencepiece_layout_is_read_as_sentencepiece",
    },
    "test_hub_push.py": {"test_model_card_names_hub_base_and_dataset"},
    "test_plan_plot.py": {"test_one_stacked_bar_per_card_with_its_capacity_and_the_peak",
                          "test_plan_cli_draws_three_bars_and_refuses_a_missing_folder"},
    "test_loss_plot.py": {"test_curves_are_read_from_a_trainer_log_and_drawn", "test_smoothing_is_debiased"},
    "test_long_context.py": {
        "test_cpu_fused_head_equals_trls_kernel",
        "test_liger_kernels_refused_where_they_cannot_run",
        "test_peft_still_casts_unquantized_weights_to_fp32",
        "test_tiled_mlp_backward_replays_forwards_dropout",
        "test_tiled_mlp_recompute_is_not_offloaded",
        "test_trl_still_looks_up_its_fused_kernel_at_call_time",
    },
    "test_retnet_remote_code.py": {"test_transformers_still_maps_only_the_class_being_saved"},
    "test_plan_speed.py": {
        "test_a_dense_config_reads_as_transformers_config_does",
        "test_a_plan_from_a_dense_config_is_the_plan_from_transformers_config",
        "test_dense_counts_by_hand_equal_the_meta_device_model",
        "test_every_dense_config_family_is_counted_by_hand",
        "test_huggingface_hub_still_retries_an_unreachable_hub",
    },
    "test_vram_compare.py": {"test_lora_on_mixture_of_experts_counts_peft_expert_adapters_and_merged_copies"},
    "test_vram_plan.py": {
        "test_activations_follow_batch_sequence_and_checkpointing",
        "test_each_saving_lowers_the_peak_of_a_long_sequence",
        "test_fit_makes_a_recipe_that_does_not_fit_fit",
        "test_full_fine_tune_is_4_bytes_weights_4_gradients_8_adam",
        "test_llama3_8b_trains_32k_tokens_on_a_12gb_card",
        "test_longest_context_is_the_longest_length_that_fits",
        "test_plan_of_a_7b_recipe_loads_no_weights_and_is_quick",
        "test_qlora_weights_adapter_and_8bit_states_by_hand",
        "test_training_refuses_a_recipe_predicted_not_to_fit_or_fits_it_with_auto_fit",
        "test_unknown_gpu_is_a_user_error",
    },
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    collected: dict[str, set[str]] = {}
    for item in items:
        module, name = item.path.name, getattr(item, "originalname", item.name)
        collected.setdefault(module, set()).add(name)
        left_out = UNIT_MODULES.get(module)
        if (left_out is not None and name not in left_out) or name in UNIT_TESTS.get(module, ()):
            item.add_marker(pytest.mark.unit)
    # A renamed test must not drop out of the fast suite unnoticed: under -m unit, a name above that its collected
    # module lacks is an error.
    if "unit" in (config.getoption("markexpr") or ""):
        stale = [f"{module}::{name}" for listed in (UNIT_MODULES, UNIT_TESTS) for module, names in listed.items()
                 if module in collected for name in sorted(names - collected[module])]
        if stale:
            raise pytest.UsageError(f"tests/conftest.py names tests that do not exist (renamed?): {', '.join(stale)}")


class StopAt(TrainerCallback):
    """Ends training after `step` as a kill would, but cleanly: checkpoints up to there are on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control
