"""`hf-vram plan` without waiting: parameter counts written down for the dense families equal a meta-device
model's, a DenseConfig reads as transformers' config does, and a Hub that does not answer leaves the known config
within seconds (huggingface_hub's own retries take 23 s or more)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hf_vram.recipe.load import find_recipe, load_recipe
from hf_vram.recipe.schema import Recipe
from hf_vram.vram import counts
from hf_vram.vram.configs import DENSE_DEFAULTS, DenseConfig, _from_fields, resolve_config
from hf_vram.vram.estimate import estimate
from hf_vram.vram.gpus import get_gpu
from hf_vram.vram.known_configs import KNOWN_CONFIGS

from .conftest import ROOT, TINY_LLAMA, run_cli

TINY = dict(TINY_LLAMA, vocab_size=300)
CONFIGS = {
    **KNOWN_CONFIGS,
    "tiny llama, tied embeddings": dict(TINY, model_type="llama", tie_word_embeddings=True),
    "tiny llama, grouped-query attention": dict(TINY, model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "tiny llama, biases and its own head_dim": dict(TINY, model_type="llama", attention_bias=True, mlp_bias=True,
                                                    head_dim=48),
    "tiny qwen2 (q, k, v biases), tied": dict(TINY, model_type="qwen2", num_attention_heads=4, num_key_value_heads=1,
                                              tie_word_embeddings=True),
    "tiny mistral, kv heads left to the default": dict(TINY, model_type="mistral", num_attention_heads=8),
    "large vocabulary, narrow": dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=4096,
                                     num_hidden_layers=1, num_attention_heads=1),
}
ADAPTERS = {
    "lora all-linear": {"type": "lora", "r": 8},
    "lora on a list": {"type": "lora", "r": 16, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]},
    "dora": {"type": "dora", "r": 4},
    "rslora": {"type": "rslora", "r": 64},
    "llama-adapter": {"type": "llama-adapter", "prompt_length": 10, "prompt_layers": 30},
    "llama-adapter, few layers": {"type": "llama-adapter", "prompt_length": 2, "prompt_layers": 1},
    "none": {"type": "none"},
}
# Fields the planner reads (estimate.py, plan.py), those a dense config lacks among them.
PLANNER_FIELDS = ("model_type", "head_dim", "num_local_experts", "num_experts_per_tok", "output_router_logits",
                  "attn_pdrop", "resid_pdrop", "state_size")
HUB_ENV = {"HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def recipe(adapter: dict) -> Recipe:
    return Recipe.model_validate({"model": {"name_or_path": "/nowhere"}, "data": {"source": "builtin:arithmetic"},
                                  "adapter": adapter})


@pytest.mark.parametrize("name", CONFIGS)
def test_dense_counts_by_hand_equal_the_meta_device_model(name, monkeypatch):
    fields = CONFIGS[name]
    config = _from_fields(fields, light=False)
    expected = {a: counts.meta_counts(config, recipe(ADAPTERS[a])) for a in ADAPTERS}

    def no_meta(*_):
        raise AssertionError("a dense family was built on the meta device")

    monkeypatch.setattr(counts, "meta_counts", no_meta)
    for kind in (config, DenseConfig(fields)):
        for a, want in expected.items():
            got = counts.count_parameters(kind, recipe(ADAPTERS[a]))
            assert dataclasses.asdict(got) == dataclasses.asdict(want), (name, type(kind).__name__, a)


@pytest.mark.parametrize("fields", [
    *CONFIGS.values(),
    {"model_type": "llama"}, {"model_type": "mistral"}, {"model_type": "qwen2"},
    {"model_type": "qwen2", "num_attention_heads": 8, "use_sliding_window": True},
    {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": None, "head_dim": None},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_a_dense_config_reads_as_transformers_config_does(fields):
    real, light = _from_fields(fields, light=False), DenseConfig(fields)
    missing = object()
    for key in (*DENSE_DEFAULTS[fields["model_type"]], *PLANNER_FIELDS):
        assert getattr(light, key, missing) == getattr(real, key, missing), key


def test_every_dense_config_family_is_counted_by_hand():
    # A DenseConfig cannot be built on the meta device: each of its families needs the count by hand.
    assert set(DENSE_DEFAULTS) == set(counts.DENSE_FAMILIES)


def test_a_plan_from_a_dense_config_is_the_plan_from_transformers_config():
    for name in ("llama7b-qlora-alpaca", "qwen2.5-7b-qlora-chat", "mistral7b-qlora-dpo", "llama-60m-scratch"):
        loaded = load_recipe(str(find_recipe(name)))
        light, real = resolve_config(loaded, light=True), resolve_config(loaded)
        assert isinstance(light, DenseConfig) and not isinstance(real, DenseConfig)
        plans = [estimate(c, loaded.recipe, get_gpu("rtx4070"), samples=1000) for c in (light, real)]
        assert plans[0].items == plans[1].items and plans[0].seconds == plans[1].seconds, name


RESOLVE = """
import sys, time
from hf_vram.recipe.load import find_recipe, load_recipe
from hf_vram.vram.configs import ConfigUnavailable, resolve_config
loaded = load_recipe(str(find_recipe(sys.argv[1])), sys.argv[3:])
start = time.monotonic()
try:
    config = resolve_config(loaded, light=sys.argv[2] == "light")
    print("vocab", config.vocab_size)
except ConfigUnavailable as e:
    print("unavailable", e)
print("seconds", time.monotonic() - start)
heavy = [m for m in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets") if m in sys.modules]
print("imported", ",".join(heavy) or "-")
"""


def resolve_in_subprocess(hf_home, endpoint: str, recipe_name: str, *overrides: str, light: bool = True) -> dict:
    """resolve_config in a fresh interpreter (huggingface_hub reads HF_ENDPOINT when imported): what it printed,
    the seconds it took (imports left out) and stderr."""
    env = {**os.environ, **HUB_ENV, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home)}
    r = subprocess.run([sys.executable, "-c", RESOLVE, recipe_name, "light" if light else "full", *overrides], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    return {**out, "seconds": float(out["seconds"]), "stderr": r.stderr}


@pytest.fixture(autouse=True)
def default_hub_timeout(monkeypatch):
    """The Hub look-up's own timeout, whatever this machine sets (HF_HUB_ETAG_TIMEOUT replaces it)."""
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)


@pytest.fixture
def silent_hub():
    """A loopback port that accepts connections and never answers (a Hub behind a stalled network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("hub", ["refused", "silent"])
def test_a_known_base_is_planned_from_its_known_config_when_the_hub_does_not_answer(hub, tmp_path, silent_hub):
    endpoint = "http://127.0.0.1:9" if hub == "refused" else silent_hub  # port 9 (discard): nothing listens
    got = resolve_in_subprocess(tmp_path, endpoint, "llama7b-qlora-alpaca")
    assert got["vocab"] == "32000" and got["seconds"] < 10, got
    assert "[hf-vram] the Hub did not answer in 1.5 s: planning NousResearch/Llama-2-7b-hf from hf-vram's known config" in got["stderr"]
    assert "Retrying" not in got["stderr"] and got["imported"] == "-", got


def test_an_unknown_base_is_a_clear_error_within_seconds_when_the_hub_does_not_answer(tmp_path, silent_hub):
    got = resolve_in_subprocess(tmp_path, silent_hub, "llama7b-qlora-alpaca", "model.name_or_path=someone/unknown-7b")
    assert got["seconds"] < 10, got
    assert got["unavailable"].startswith("model.name_or_path: cannot read the config of 'someone/unknown-7b' (the Hub "
                                         "did not answer in 1.5 s, and not a known base)"), got


SEVERAL = """
import sys, time
from hf_vram.recipe.load import load_recipe
from hf_vram.vram.diffusion_plan import DiffusionShapes
from hf_vram.vram.configs import resolve_config
for name in sys.argv[1:]:
    loaded = load_recipe(name)  # its checks import the model classes: not timed
    start = time.monotonic()
    DiffusionShapes(loaded) if loaded.recipe.task == "diffusion" else resolve_config(loaded, light=True)
    print(name, time.monotonic() - start, flush=True)
"""


def test_a_silent_hub_costs_one_deadline_per_process_and_diffusion_parts_do_not_retry(tmp_path, silent_hub):
    """The first look-up waits out the 1.5 s deadline; the next ones, Hub bases and a diffusion recipe's VAE and
    text encoder alike, are answered from the known configs at once, with no huggingface_hub retries."""
    env = {**os.environ, **HUB_ENV, "HF_ENDPOINT": silent_hub, "HF_HOME": str(tmp_path)}
    names = ["llama7b-qlora-alpaca", "mistral7b-qlora-alpaca", "unet-text2img-64", "pixart-24m-text2img"]
    r = subprocess.run([sys.executable, "-c", SEVERAL, *names], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    seconds = {name: float(t) for name, t in (line.split() for line in r.stdout.splitlines())}
    assert seconds["llama7b-qlora-alpaca"] > 1.4, seconds  # the deadline, waited once
    assert all(seconds[n] < 1.0 for n in names[1:]), seconds
    assert "Retrying" not in r.stderr, r.stderr[-2000:]
    assert "not asked again for 60 s): planning stabilityai/sd-vae-ft-mse from hf-vram's known config" in r.stderr


@pytest.fixture
def answering_hub():
    """A loopback Hub that serves one config.json (NousResearch/Llama-2-7b-hf's, with a vocabulary of 32,002) the
    way huggingface_hub 2.4 downloads it: HEAD gives the commit, ETag and size, GET the bytes."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = json.dumps(dict(KNOWN_CONFIGS["NousResearch/Llama-2-7b-hf"], vocab_size=32002)).encode()
    served = []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            served.append((self.command, self.path))
            if self.path != "/NousResearch/Llama-2-7b-hf/resolve/main/config.json":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            for k, v in {"X-Repo-Commit": "89abcdef0123456789abcdef0123456789abcdef", "ETag": '"e7a9"',
                         "Content-Length": str(len(body)), "Content-Type": "application/json"}.items():
                self.send_header(k, v)
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            if self.path.endswith("/config.json"):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def test_a_hub_that_answers_gives_the_config_and_caches_it(tmp_path, answering_hub):
    url, served = answering_hub
    for light in (True, False):
        got = resolve_in_subprocess(tmp_path, url, "llama7b-qlora-alpaca", light=light)
        assert got["vocab"] == "32002" and "[hf-vram]" not in got["stderr"], got
    assert ("GET", "/NousResearch/Llama-2-7b-hf/resolve/main/config.json") in served
    assert list((tmp_path / "hub").glob("models--NousResearch--Llama-2-7b-hf/snapshots/*/config.json"))
    assert served.count(("GET", "/NousResearch/Llama-2-7b-hf/resolve/main/config.json")) == 1  # then from the cache


def test_a_config_in_the_hf_cache_wins_without_asking_the_hub(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--NousResearch--Llama-2-7b-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    cached = dict(KNOWN_CONFIGS["NousResearch/Llama-2-7b-hf"], vocab_size=32001, architectures=["LlamaForCausalLM"])
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(cached))
    for light in (True, False):
        got = resolve_in_subprocess(tmp_path, "http://127.0.0.1:9", "llama7b-qlora-alpaca", light=light)
        assert got["vocab"] == "32001" and "[hf-vram]" not in got["stderr"], got


def test_plan_cli_answers_with_the_known_config_when_the_hub_does_not_answer(tmp_path, silent_hub):
    start = time.monotonic()
    r = run_cli("plan", "llama3-8b-qlora-chat", timeout=300,
                env={**HUB_ENV, "HF_ENDPOINT": silent_hub, "HF_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "planning NousResearch/Meta-Llama-3-8B-Instruct from hf-vram's known config" in r.stderr
    assert "8,072,204,288 parameters, 41,943,040 trained" in r.stdout and "Traceback" not in r.stderr
    assert time.monotonic() - start < 60  # huggingface_hub alone would wait 10 s, then retry with 60 s timeouts


def test_huggingface_hub_still_retries_an_unreachable_hub(tmp_path, monkeypatch):
    """Why configs.hub_config_file asks once before downloading: huggingface_hub 2.4's hf_hub_download, with
    nothing cached, asks again with retries and backoff. If this fails, that library behaviour changed and the
    probe may be dropped."""
    from huggingface_hub import constants, hf_hub_download

    sleeps = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(OSError):  # LocalEntryNotFoundError, after the retries
        hf_hub_download("NousResearch/Llama-2-7b-hf", "config.json", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")
    assert sleeps, "huggingface_hub no longer retries an unreachable Hub"
