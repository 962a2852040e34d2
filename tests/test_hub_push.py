"""`hf-vram push` and the push at the end of training, against a loopback Hub (tests/hub_stub.py).

Real outputs are pushed: a tiny model trained from scratch through the CLI (its recipe names a repository, so
the run pushes when it ends) and a tiny QLoRA adapter on a local base. huggingface_hub reads HF_ENDPOINT when
it is imported, so every push runs in a subprocess pointed at the stub, with a throwaway HF_HOME and token.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_vram.output.cards.lm import lm_card
from hf_vram.recipe.load import load_recipe

from .conftest import run_cli, scratch_recipe, write_recipe
from .hub_stub import HubStub

TOKEN = "hf_test_secret_" + secrets.token_hex(12)
SCRATCH_REPO = "hf-vram-tests/tiny-scratch"
ADAPTER_REPO = "hf-vram-tests/tiny-qlora"


def expected_files(out: Path) -> dict[str, bytes]:
    """What a Hub repository of this output should hold: everything but what only serves training."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        top = rel.split("/")[0]
        if not p.is_file() or top.startswith("checkpoint-") or top in ("tokenizer-trained", "prepared"):
            continue
        if rel in ("score_before.json", "progress.json", "STOP", "ui-run.json", "ui-run.log"):  # training's only
            continue
        files[rel] = p.read_bytes()
    return files


def pushed_card(hub: HubStub, repo: str) -> ModelCard:
    return ModelCard(hub.files[repo]["README.md"].decode())


def assert_token_kept_secret(hub: HubStub, *results) -> None:
    assert f"Bearer {TOKEN}" in hub.authorization, "the token was sent to the Hub"
    for r in results:
        assert TOKEN not in r.stdout and TOKEN not in r.stderr


@pytest.fixture(scope="module")
def hub():
    with HubStub() as stub:
        yield stub


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-home"))


def push(hub: HubStub, hf_home: str, *args: str, token: str | None = TOKEN):
    return run_cli("push", *args, env=hub.env(token, hf_home), timeout=120)


@pytest.fixture(scope="module")
def scratch(hub, hf_home, tmp_path_factory):
    """A tiny Llama trained from scratch through the CLI, checkpoints and TensorBoard logs included."""
    folder = tmp_path_factory.mktemp("scratch")
    out = folder / "out"
    data = scratch_recipe(out, max_steps=5, save_steps=2, report_to=["tensorboard"])
    data["hub"] = {"repo_id": SCRATCH_REPO}
    result = run_cli("train", str(write_recipe(folder, "tiny-scratch", data)), env=hub.env(TOKEN, hf_home))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    """A tiny QLoRA adapter on a local base, scored before and after (so score_before.json exists); its recipe
    names no repository. Trained in this process: without hub.repo_id the run does not touch the Hub."""
    from hf_vram.runners.run import train

    folder = tmp_path_factory.mktemp("qlora")
    out = folder / "out"
    data = {
        "description": "tiny QLoRA push test",
        "model": {"name_or_path": str(tiny_base)},
        "quant": {"bits": 4, "type": "nf4", "compute_dtype": "float32"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"source": "builtin:arithmetic", "format": "alpaca", "template": "alpaca-short", "max_length": 64},
        "train": {
            "output_dir": str(out), "micro_batch_size": 4, "max_steps": 3, "save_steps": 2, "lr": 5e-3,
            "warmup": 0, "logging_steps": 1, "report_to": [],
        },
        "eval": {"score_samples": 4, "max_new_tokens": 4},
    }
    train(load_recipe(write_recipe(folder, "tiny-qlora", data)))
    return out


def test_training_with_hub_repo_id_pushes_the_output_when_it_ends(hub, scratch):
    out, result = scratch
    assert {"repo_id": SCRATCH_REPO, "private": True, "type": "model"} in hub.created, "private by default"
    assert f"pushed to {hub.url}/{SCRATCH_REPO}" in result.stdout
    # Every file of the output arrived byte-identical, except what only serves training.
    assert [p.name for p in out.glob("checkpoint-*")] and (out / "tokenizer-trained").is_dir()
    arrived = hub.files[SCRATCH_REPO]
    assert arrived == expected_files(out)
    assert not [p for p in arrived if p.startswith(("checkpoint-", "tokenizer-trained/", "prepared/"))]
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "README.md", "train_summary.json"} <= arrived.keys()
    assert [p for p in arrived if p.startswith("runs/") and "tfevents" in p], "TensorBoard logs are pushed"
    data = pushed_card(hub, SCRATCH_REPO).data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"hf-vram", "tiny-scratch"} <= set(data["tags"])
    assert "base_model" not in data and "datasets" not in data  # from scratch, on builtin data
    assert f'model_id = "{SCRATCH_REPO}"' in arrived["README.md"].decode()
    assert_token_kept_secret(hub, result)


def test_push_command_uses_the_recipe_repo_and_reuses_an_existing_one(hub, hf_home, scratch):
    out, _ = scratch
    commits = len(hub.commits)
    result = push(hub, hf_home, str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/{SCRATCH_REPO}"
    assert [c["repo_id"] for c in hub.created].count(SCRATCH_REPO) == 1, "the existing repository is reused"
    assert hub.commits[commits:] and all(c["repo_id"] == SCRATCH_REPO for c in hub.commits[commits:])
    assert hub.files[SCRATCH_REPO] == expected_files(out)
    assert_token_kept_secret(hub, result)


def test_push_public_to_another_repo_names_it_in_the_card(hub, hf_home, scratch, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(scratch[0], copy)
    result = push(hub, hf_home, str(copy), "--repo", "someone-else/renamed", "--public")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/someone-else/renamed"
    assert {"repo_id": "someone-else/renamed", "private": False, "type": "model"} in hub.created
    arrived = hub.files["someone-else/renamed"]
    readme = arrived["README.md"].decode()
    assert 'model_id = "someone-else/renamed"' in readme and SCRATCH_REPO not in readme
    assert arrived == expected_files(copy)  # the local card now names where the output lives, too
    assert_token_kept_secret(hub, result)


def test_push_adapter_on_a_local_base(hub, hf_home, adapter):
    assert (adapter / "score_before.json").is_file() and list(adapter.glob("checkpoint-*"))
    result = push(hub, hf_home, str(adapter), "--repo", ADAPTER_REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert {"repo_id": ADAPTER_REPO, "private": True, "type": "model"} in hub.created
    arrived = hub.files[ADAPTER_REPO]
    assert arrived == expected_files(adapter)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= arrived.keys()
    assert "score_before.json" not in arrived and "model.safetensors" not in arrived
    card = pushed_card(hub, ADAPTER_REPO)
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert {"hf-vram", "tiny-qlora", "peft", "lora", "qlora", "4-bit"} <= set(data["tags"])
    assert "base_model" not in data, "a local path is not a Hub id"
    assert "not a Hub model" in card.text and "Held-out exact match" in card.text
    assert_token_kept_secret(hub, result)


def test_push_refuses_what_it_cannot_push(hub, hf_home, adapter, tmp_path):
    commits, created = len(hub.commits), len(hub.created)
    r = push(hub, hf_home, str(adapter))  # its recipe names no repository
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--repo owner/name" in r.stderr and "hub.repo_id" in r.stderr
    r = push(hub, hf_home, str(adapter), "--repo", "no-owner")
    assert r.returncode == 2 and "owner/name" in r.stderr and "Traceback" not in r.stderr
    not_output = tmp_path / "notes"
    not_output.mkdir()
    (not_output / "notes.txt").write_text("not a model")
    for path in (not_output, tmp_path / "missing"):
        r = push(hub, hf_home, str(path), "--repo", "me/model")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert str(path) in r.stderr and "hf-vram train" in r.stderr
    r = run_cli("push", str(adapter), "--repo", "me/model", env={**hub.env(TOKEN, hf_home), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    assert (len(hub.commits), len(hub.created)) == (commits, created)


def test_push_without_a_token_says_how_to_log_in(hub, hf_home, adapter):
    created = len(hub.created)
    r = push(hub, hf_home, str(adapter), "--repo", "hf-vram-tests/no-token", token=None)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hf auth login" in r.stderr and "HF_TOKEN" in r.stderr
    assert len(hub.created) == created and "hf-vram-tests/no-token" not in hub.files


def _card(tmp_path, recipe: dict, summary: dict) -> ModelCard:
    loaded = load_recipe(write_recipe(tmp_path, "hub-card", recipe))
    return ModelCard(lm_card(loaded, summary))


def test_model_card_names_hub_base_and_dataset(tmp_path):
    recipe = {
        "description": "DPO of a DoRA adapter on a 4-bit Hub base",
        "task": "dpo",
        "model": {"name_or_path": "NousResearch/Llama-2-7b-hf"},
        "quant": {"bits": 4},
        "adapter": {"type": "dora"},
        "data": {"source": "trl-lib/ultrafeedback_binarized", "format": "preference"},
        "hub": {"repo_id": "me/llama-dpo"},
    }
    summary = {
        "recipe": "hub-card", "global_step": 12, "first_loss": 0.69, "final_loss": 0.41, "eval_loss": 0.5,
        "eval_perplexity": 1.65, "train_seconds": 125.4, "world_size": 1, "trainable_params": 1000,
        "total_params": 100000, "cuda_max_allocated_bytes": 5 * 2**30, "cuda_max_reserved_bytes": 6 * 2**30,
    }
    card = _card(tmp_path, recipe, summary)
    data = ModelCard(str(card)).data.to_dict()  # what a push sends, read back as the Hub reads it
    assert data["base_model"] == "NousResearch/Llama-2-7b-hf" and data["base_model_relation"] == "adapter"
    assert data["datasets"] == ["trl-lib/ultrafeedback_binarized"] and data["library_name"] == "peft"
    assert {"hf-vram", "hub-card", "lora", "dora", "qlora", "4-bit", "dpo"} <= set(data["tags"])
    text = card.text
    assert 'model_id = "me/llama-dpo"' in text
    for row in ("| optimizer steps | 12 |", "| final training loss | 0.41 |", "| held-out loss | 0.5 |",
                "| held-out perplexity | 1.65 |", "5.00 GiB of GPU memory allocated", "| training time | 2 min 05 s"):
        assert row in text, row

    # A full fine-tune of a Hub model, with a summary that holds less: nothing is made up.
    recipe.update(task="sft", quant={}, adapter={"type": "none"}, data={"source": "tatsu-lab/alpaca", "format": "alpaca"})
    card = _card(tmp_path, recipe, {"recipe": "hub-card", "global_step": 3, "final_loss": 1.5})
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["base_model_relation"] == "finetune"
    assert {"sft"} <= set(data["tags"]) and not {"lora", "qlora", "dpo"} & set(data["tags"])
    assert "None" not in card.text and "held-out" not in card.text and "peak memory" not in card.text


DIFFUSION_REPO = "hf-vram-tests/tiny-ddpm"
CLASS_DIFFUSION_REPO = "hf-vram-tests/tiny-class-digits"
PIPELINE_FILES = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "scheduler/scheduler_config.json", "README.md", "recipe.yaml", "train_summary.json"}


@pytest.fixture(scope="module")
def diffusion_outputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny variants of two shipped diffusion recipes, trained in this process (their recipes name no repository):
    unconditional (a stock DDPMPipeline) and class-conditional (hf-vram's ClassConditionalPipeline, its code beside
    model_index.json), each with a checkpoint, sample grids and TensorBoard logs."""
    pytest.importorskip("sklearn")
    from hf_vram.runners.run import train

    from .test_diffusion_recipes import tiny_diffusion

    folder = tmp_path_factory.mktemp("diffusion")
    outs = {}
    for name in ("unet-ddpm-64", "unet-class-digits"):
        outs[name] = folder / name
        train(tiny_diffusion(name, outs[name], max_steps=4, **{"train.report_to": ["tensorboard"]}))
    return outs


def pushed_diffusion(hub: HubStub, hf_home: str, out: Path, repo: str) -> dict[str, bytes]:
    assert list(out.glob("checkpoint-*")) and list((out / "logs").rglob("*tfevents*"))
    # What a kill during a checkpoint save leaves behind (a resumed run removes it; a push must not upload it).
    leftover = out / ".checkpoint-4.tmp"
    leftover.mkdir(exist_ok=True)
    (leftover / "optimizer.bin").write_bytes(b"\0" * 64)
    result = push(hub, hf_home, str(out), "--repo", repo)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/{repo}"
    assert_token_kept_secret(hub, result)
    arrived = hub.files[repo]
    assert arrived == {k: v for k, v in expected_files(out).items() if not k.startswith(".checkpoint-")}
    assert PIPELINE_FILES <= arrived.keys()
    assert not [p for p in arrived if p.startswith(("checkpoint-", ".checkpoint-"))]
    # Kept, as a language model's runs/: small, and the Hub shows TensorBoard traces as the training metrics; the
    # sample grids show what the model draws.
    assert [p for p in arrived if p.startswith("logs/") and "tfevents" in p]
    assert "samples/step-000004.png" in arrived
    data = pushed_card(hub, repo).data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "unconditional-image-generation"
    assert {"hf-vram", "diffusers", "unet2d"} <= set(data["tags"])
    return arrived


def test_push_diffusion_output(hub, hf_home, diffusion_outputs):
    arrived = pushed_diffusion(hub, hf_home, diffusion_outputs["unet-ddpm-64"], DIFFUSION_REPO)
    assert {"repo_id": DIFFUSION_REPO, "private": True, "type": "model"} in hub.created
    assert json.loads(arrived["model_index.json"])["_class_name"] == "DDPMPipeline"
    assert "pixel_pipelines.py" not in arrived


def test_push_class_conditional_diffusion_output_carries_its_pipeline_code(hub, hf_home, diffusion_outputs):
    """trust_remote_code loading from the Hub imports the pipeline from the repository: its code must travel."""
    from hf_vram.pipelines import pixel_pipelines

    arrived = pushed_diffusion(hub, hf_home, diffusion_outputs["unet-class-digits"], CLASS_DIFFUSION_REPO)
    assert json.loads(arrived["model_index.json"])["_class_name"] == ["pixel_pipelines", "ClassConditionalPipeline"]
    assert arrived["pixel_pipelines.py"] == Path(pixel_pipelines.__file__).read_bytes()
    assert "trust_remote_code=True" in arrived["README.md"].decode()


def test_pushed_diffusion_card_loads_from_the_repository(hub, hf_home, diffusion_outputs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(diffusion_outputs["unet-ddpm-64"], copy)
    result = push(hub, hf_home, str(copy), "--repo", "hf-vram-tests/tiny-ddpm-card")
    assert result.returncode == 0, result.stderr[-4000:]
    readme = hub.files["hf-vram-tests/tiny-ddpm-card"]["README.md"].decode()
    assert 'model_id = "hf-vram-tests/tiny-ddpm-card"\npipe = DiffusionPipeline.from_pretrained(model_id)' in readme
    assert str(copy) not in readme
