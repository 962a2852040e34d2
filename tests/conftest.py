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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on the arithmetic text, saved by save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.builtin import BUILTIN_SOURCES
    from hf_vram.builders.tokenizer import train_bpe

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
    from hf_vram.train.lm import train

    folder = tmp_path_factory.mktemp("english-base")
    recipe = scratch_recipe(folder / "out", max_steps=200, micro_batch_size=16, lr=3e-3, logging_steps=50, save_steps=1000)
    recipe["tokenizer"]["vocab_size"] = 1000
    recipe["model"]["config"]["max_position_embeddings"] = 512
    recipe["data"] = {"source": str(SAMPLE_DATA / "c4_demo.jsonl"), "format": "text", "max_length": 128, "packing": True}
    train(load_recipe(str(write_recipe(folder, "english-base", recipe))))
    return folder / "out"
