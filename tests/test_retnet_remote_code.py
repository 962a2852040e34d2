"""A RetNet output loads where hf-vram is not installed. save_pretrained, and so every training output and checkpoint,
writes `auto_map` into config.json and copies configuration_retnet.py and modeling_retnet.py beside the weights. A
subprocess that cannot import hf_vram then loads them with trust_remote_code=True and computes the same logits,
hidden states, greedy tokens and pipeline text as this process, where hf-vram's own registered classes load them.

Tolerance: 1e-6 absolute on logits and hidden states (fp32, one thread on both sides). The same code runs the same
kernels on the same weights, so the measured difference is 0.0; the tolerance only leaves room for a different BLAS
path, never for a different model.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import custom_object_save, get_imports, get_relative_imports

import hf_vram.models
from hf_vram.models import RetNetConfig, RetNetForCausalLM

from .conftest import run_cli

ATOL = 1e-6
CODE_FILES = ("configuration_retnet.py", "modeling_retnet.py")
AUTO_MAP = {
    "AutoConfig": "configuration_retnet.RetNetConfig",
    "AutoModel": "modeling_retnet.RetNetModel",
    "AutoModelForCausalLM": "modeling_retnet.RetNetForCausalLM",
}
# What the copied files may import besides each other: transformers' own dependencies and torch.
ALLOWED_IMPORTS = {"__future__", "torch", "transformers", "huggingface_hub"}
SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog sat together on the mat.",
    "the bird sang on the branch of the tree.",
]
PROMPT = "the cat"
NEW_TOKENS = 8


# The subprocess runs on one thread too: the same reduction order on both sides, so the outputs are identical.
pytestmark = pytest.mark.usefixtures("one_thread")


def measure(folder: str, ids: list[list[int]], prompt: str, new_tokens: int) -> dict:
    """Load `folder` through the stock loaders, as a user without hf-vram would, and record what it computes.
    Runs both here (hf-vram's registered classes win over the folder's code) and in the clean subprocess (the
    folder's code), from this same source."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    generator = pipeline("text-generation", model=folder, trust_remote_code=True, device="cpu")
    batch = torch.tensor(ids)
    prompt_ids = generator.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(batch).logits
        hidden = base(batch).last_hidden_state
        greedy = model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    text = generator(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {
        "modules": [type(m).__module__ for m in (model, base, generator.model, model.config)],
        "logits": logits.tolist(),
        "hidden": hidden.tolist(),
        "greedy": greedy[0].tolist(),
        "text": text[0]["generated_text"],
    }


# The clean process: a finder first on sys.meta_path refuses hf_vram and data_prep (-I alone does not: the
# editable install's finder in site-packages would still find them), -I drops PYTHONPATH and the current folder.
CLEAN_MAIN = '''
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hf_vram", "data_prep"):
            raise ModuleNotFoundError(f"No module named {name!r} (refused)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
blocked = []
for name in ("hf_vram", "data_prep"):
    try:
        __import__(name)
    except ImportError:
        blocked.append(name)

import torch
from transformers import AutoConfig

torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
refused = []
for folder in spec["folders"]:
    try:
        AutoConfig.from_pretrained(folder)  # no trust_remote_code: must be refused, not loaded some other way
    except ValueError as e:
        refused.append("trust_remote_code" in str(e))
results = [measure(folder, spec["ids"], spec["prompt"], spec["new_tokens"]) for folder in spec["folders"]]
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("hf_vram", "data_prep"))
with open(spec["result"], "w") as f:  # a file, not stdout: transformers' refusal prompt is printed there
    json.dump({"blocked": blocked, "refused": refused, "leaked": leaked, "results": results}, f)
'''


def load_without_hf_vram(folders: list[Path], ids: list[list[int]], workdir: Path) -> list[dict]:
    """measure() on each folder in a fresh interpreter where hf_vram cannot be imported."""
    script = "\n".join(["from __future__ import annotations", textwrap.dedent(inspect.getsource(measure)), CLEAN_MAIN])
    result = workdir / "clean.json"
    spec = {"folders": [str(f) for f in folders], "ids": ids, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
            "result": str(result)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # transformers copies the remote code into HF_MODULES_CACHE before importing it: keep that out of ~/.cache.
    env.update(HF_MODULES_CACHE=str(workdir / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script, json.dumps(spec)],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(result.read_text())
    assert out["blocked"] == ["hf_vram", "data_prep"], "the clean process could import hf-vram"
    assert out["leaked"] == [], out["leaked"]
    assert out["refused"] == [True] * len(folders), "loading without trust_remote_code was not refused"
    return out["results"]


def assert_loadable_without_hf_vram(folder: Path) -> None:
    """auto_map names the copied classes; the copies are hf-vram's sources, importing only torch, transformers
    (and its huggingface_hub) and each other."""
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    sources = Path(hf_vram.models.__file__).parent
    for name in CODE_FILES:
        copy = folder / name
        assert copy.read_bytes() == (sources / name).read_bytes(), name
        assert "hf_vram" not in copy.read_text(), name
        assert set(get_imports(copy)) <= ALLOWED_IMPORTS, (name, get_imports(copy))
    assert get_relative_imports(folder / "modeling_retnet.py") == ["configuration_retnet"]
    assert get_relative_imports(folder / "configuration_retnet.py") == []


def assert_same_outputs(clean: dict, here: dict) -> float:
    """The largest absolute difference of logits and hidden states, after checking tokens and text are equal."""
    assert all(m.startswith("transformers_modules.") for m in clean["modules"]), clean["modules"]
    assert all(m.startswith("hf_vram.models.") for m in here["modules"]), here["modules"]
    diff = max(
        (torch.tensor(clean[key]) - torch.tensor(here[key])).abs().max().item() for key in ("logits", "hidden")
    )
    assert diff <= ATOL, f"logits / hidden states differ by {diff}"
    assert clean["greedy"] == here["greedy"]
    assert clean["text"] == here["text"] and len(clean["text"]) > len(PROMPT), (clean["text"], here["text"])
    return diff


def trained_tiny_retnet(tokenizer) -> RetNetForCausalLM:
    """A tiny RetNet (tied embeddings, as the shipped recipe) after a few steps on the sentences, so that greedy
    continuations are text rather than the near-uniform picks of a random model."""
    torch.manual_seed(0)
    config = RetNetConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        chunk_size=4, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = RetNetForCausalLM(config)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_saved_retnet_loads_and_generates_without_hf_vram(tmp_path):
    from data_prep.tokenizer import train_bpe

    tokenizer = train_bpe(SENTENCES * 4, vocab_size=300, model_max_length=64)
    model = trained_tiny_retnet(tokenizer)
    folder = tmp_path / "retnet"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    assert_loadable_without_hf_vram(folder)

    ids = torch.randint(5, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1)).tolist()
    here = measure(str(folder), ids, PROMPT, NEW_TOKENS)
    with torch.no_grad():  # the in-process model before saving computes what its reload does, bit for bit
        assert torch.equal(model(torch.tensor(ids)).logits, torch.tensor(here["logits"]))
    [clean] = load_without_hf_vram([folder], ids, tmp_path)
    diff = assert_same_outputs(clean, here)
    print(f"max |logits, hidden| difference, hf-vram vs trust_remote_code: {diff}")


def test_transformers_still_maps_only_the_class_being_saved(tmp_path):
    """transformers 5.24's custom_object_save adds to auto_map only the saved object's own Auto class and copies its
    file plus the files it imports relatively. RetNetPreTrainedModel.save_pretrained adds AutoModel itself; this
    fails once transformers writes more (the override is then redundant) or copies something else."""
    model = RetNetForCausalLM(RetNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    config: dict = {}
    saved = custom_object_save(model, tmp_path, config=config)
    assert config == {"auto_map": {"AutoModelForCausalLM": "modeling_retnet.RetNetForCausalLM"}}
    assert sorted(Path(p).name for p in saved) == sorted(CODE_FILES)


def write_corpus(path: Path) -> Path:
    lines = [json.dumps({"text": " ".join(SENTENCES[i:] + SENTENCES[:i])}) for i in range(len(SENTENCES))] * 10
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trained_output_and_checkpoint_load_without_hf_vram(tmp_path):
    """`hf-vram train` on the shipped RetNet recipe, shrunk to 2 steps: the Trainer saves through save_pretrained,
    so the output folder and each checkpoint carry auto_map and the code."""
    out = tmp_path / "out"
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    overrides = {
        "model.config.hidden_size": 32, "model.config.num_hidden_layers": 2, "model.config.num_attention_heads": 2,
        "model.config.intermediate_size": 64, "model.config.chunk_size": 16,
        "tokenizer.name_or_path": "null", "tokenizer.train": "true", "tokenizer.kind": "bpe",
        "tokenizer.vocab_size": 300, "data.source": str(corpus), "data.subset": "null", "data.max_length": 32,
        "data.val_size": 0, "train.output_dir": str(out), "train.micro_batch_size": 4, "train.grad_accum": 1,
        "train.max_steps": 2, "train.save_steps": 1, "train.warmup": 0, "train.eval_steps": "null",
        "train.optimizer": "adamw_torch", "train.torch_compile": "false", "train.report_to": "[]",
        "train.auto_fit": "false", "eval.sample_during_training": "false", "eval.sample_prompts": "[]",
    }
    proc = run_cli("train", "retnet-130m-scratch", *(f"{k}={v}" for k, v in overrides.items()), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folders = [out, out / "checkpoint-2"]
    for folder in folders:
        assert_loadable_without_hf_vram(folder)

    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out))
    ids = torch.randint(5, vocab, (2, 9), generator=torch.Generator().manual_seed(1)).tolist()
    here = [measure(str(f), ids, PROMPT, NEW_TOKENS) for f in folders]
    clean = load_without_hf_vram(folders, ids, tmp_path)
    for c, h in zip(clean, here):
        diff = assert_same_outputs(c, h)
        print(f"max |logits, hidden| difference, hf-vram vs trust_remote_code: {diff}")
    # The final save is the last step's weights, as is checkpoint-2.
    assert clean[0]["logits"] == clean[1]["logits"]
    # The card's code, as a user without hf-vram would paste it, says trust_remote_code.
    card = (out / "README.md").read_text()
    assert 'pipeline("text-generation", model=model_id, tokenizer=model_id, trust_remote_code=True)' in card
    assert "has no GGUF form for a retnet model" in card
