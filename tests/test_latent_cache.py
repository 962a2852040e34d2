"""diffusion.cache_latents: latents and frozen caption embeddings computed once, equal to what the training loop would
compute each step, trained from, and reused by the next run (tiny VAE and T5 encoder built from configs, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_vram.errors import RecipeError
from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import train

from .conftest import write_recipe
from .test_diffusion import TINY_DIT, TINY_PIXART, losses, tiny_vae, unet_recipe

pytest.importorskip("sklearn")

CAPTION_LENGTH = 8


@pytest.fixture(scope="module")
def frozen_parts(tmp_path_factory):
    """A saved tiny VAE and a saved tiny T5 encoder with a BPE tokenizer trained on the digits' captions."""
    from transformers import T5Config, T5EncoderModel

    from data_prep.images import load_images
    from data_prep.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("frozen")
    data = load_images("builtin:digits", max_samples=200)
    tok = train_bpe([data.dataset.caption(i) for i in range(len(data))], vocab_size=300,
                    model_max_length=CAPTION_LENGTH)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5EncoderModel(config).save_pretrained(folder / "t5")
    tok.save_pretrained(folder / "t5")
    return {"vae": tiny_vae(folder / "vae"), "text_encoder": str(folder / "t5")}


def pixart_recipe(out, frozen, max_steps=20, flip=True) -> dict:
    recipe = unet_recipe(out, max_steps=max_steps, lr=2e-3, logging_steps=10)
    recipe["model"] = {"arch": "pixart", "config": dict(TINY_PIXART)}
    recipe["data"]["max_samples"] = 64
    recipe["data"]["images"]["random_flip"] = flip
    recipe["train"]["micro_batch_size"] = 16
    recipe["diffusion"] = {"conditioning": "text", "vae": frozen["vae"], "text_encoder": frozen["text_encoder"],
                           "cache_latents": True, "inference_steps": 2, "num_samples": 2, "ema_decay": 0.9,
                           "max_caption_length": CAPTION_LENGTH, "guidance_scale": 2.0,
                           "sample_prompts": ["a handwritten digit 3"]}
    return recipe


def test_cached_values_equal_what_the_loop_computes(tmp_path, frozen_parts):
    from data_prep.images import load_images
    from data_prep.latent_cache import build_latent_cache, collate_latents
    from hf_vram.builders.diffusion import build, encode_text
    from hf_vram.recipe.schema import ImageSection

    recipe = load_recipe(str(write_recipe(tmp_path, "pixart", pixart_recipe(tmp_path / "out", frozen_parts)))).recipe
    data = load_images("builtin:digits", "train", recipe.data.images, 64)
    parts = build(recipe, channels=1, resolution=16, captions=())
    assert not parts.text_trainable
    cache = build_latent_cache(recipe, data, parts, "cpu", tmp_path / "cache", batch_size=48, show=lambda _: None)
    assert not cache.reused and cache.path.parent == tmp_path / "cache"

    plain = load_images("builtin:digits", images=ImageSection(resolution=16, channels=1), max_samples=64)
    px = torch.stack([plain.dataset[i]["pixel_values"] for i in range(len(plain))])
    vae, scale = parts.vae, parts.vae.config.scaling_factor
    with torch.no_grad():
        expected = vae.encode(px).latent_dist.mode() * scale
        mirrored = vae.encode(torch.flip(px, dims=[3])).latent_dist.mode() * scale
    assert cache.latents.dtype == torch.float32 and cache.latents.shape == expected.shape == (64, 4, 16, 16)
    torch.testing.assert_close(cache.latents, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.flipped, mirrored, rtol=1e-5, atol=1e-5)
    # The mirror image's latents are not the mirrored latents: the flip has to happen in pixels.
    assert (torch.flip(expected, dims=[3]) - mirrored).abs().max() > 1e-2
    assert torch.equal(cache.labels, torch.tensor([int(plain.dataset[i]["label"]) for i in range(64)]))

    captions = [plain.dataset.caption(i) for i in range(64)]
    assert cache.embeds.shape[0] == len(set(captions)) + 1  # ten digits and the empty caption
    with torch.no_grad():
        emb, mask = encode_text(parts, captions + [""], "cpu")
    got, got_mask = cache.text(torch.cat([cache.caption_index, torch.zeros(1, dtype=torch.long)]), "cpu")
    torch.testing.assert_close(got, emb, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_mask, mask)

    # Items draw either variant of an image, so the flip augmentation survives caching.
    torch.manual_seed(0)
    draws = collate_latents([cache.dataset[5] for _ in range(32)])["latents"]
    which = [0 if torch.equal(d, cache.latents[5]) else 1 if torch.equal(d, cache.flipped[5]) else -1 for d in draws]
    assert set(which) == {0, 1}

    # A whole cache is read back; a damaged one is built again.
    quiet = {"batch_size": 64, "show": lambda _: None}
    assert build_latent_cache(recipe, data, parts, "cpu", tmp_path / "cache", **quiet).reused
    latents_file = cache.path / "latents.safetensors"
    head = latents_file.read_bytes()[:100]
    latents_file.unlink()  # a new file: the loaded cache maps the old one
    latents_file.write_bytes(head)
    again = build_latent_cache(recipe, data, parts, "cpu", tmp_path / "cache", **quiet)
    assert not again.reused and torch.equal(again.latents, cache.latents)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path.name]  # no temporary folder left


def test_training_from_the_cache_and_reusing_it(tmp_path, frozen_parts, capsys):
    """PixArt with a frozen T5 trained from cached latents and caption embeddings: the loss falls, the saved pipeline
    loads and draws, and a second run on the same output directory reads the cache instead of building it again."""
    from diffusers import DiffusionPipeline

    from hf_vram.builders.diffusion import pipeline_kwargs
    from hf_vram.runners import diffusion as runner

    out = tmp_path / "out"
    path = write_recipe(tmp_path, "pixart", pixart_recipe(out, frozen_parts))
    calls = []
    real_encode = runner.encode_images
    runner.encode_images = lambda *a: calls.append(1) or real_encode(*a)
    try:
        summary = train(load_recipe(str(path)))
    finally:
        runner.encode_images = real_encode
    assert summary["global_step"] == 20 and not calls  # no VAE call in the steps
    assert "latent cache built" in capsys.readouterr().out
    history = losses(out)
    print(f"pixart from the cache: loss {np.mean(history[:5]):.4f} -> {np.mean(history[-5:]):.4f}")
    assert np.mean(history[-5:]) < np.mean(history[:5])
    (cache_dir,) = (out / "prepared" / "latents").iterdir()
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["images"] == 64 and meta["flipped"] and meta["text"]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.vae.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a handwritten digit 3", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  **pipeline_kwargs("pixart", 16, CAPTION_LENGTH)).images
    assert len(images) == 1 and images[0].size == (16, 16)

    written = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    (out / "train_summary.json").unlink()
    path = write_recipe(tmp_path, "pixart", pixart_recipe(out, frozen_parts, max_steps=3))
    assert train(load_recipe(str(path)))["global_step"] == 3
    assert "latent cache reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == written


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, whose mixed precision a later Accelerator may not change: a test in
    another precision starts from, and leaves, a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_dit_class_labels_from_the_cache_in_bf16(tmp_path, frozen_parts, fresh_accelerate_state):
    """Class labels come from the cache; under bf16 mixed precision the frozen VAE runs (and its latents are
    cached) in bf16, sampling and the saved pipeline have it in fp32."""
    from diffusers import DiffusionPipeline

    recipe = unet_recipe(tmp_path / "out", max_steps=4, precision="bf16")
    recipe["model"] = {"arch": "dit", "config": dict(TINY_DIT)}
    recipe["data"]["max_samples"] = 64
    recipe["train"]["micro_batch_size"] = 16
    recipe["diffusion"] = {"conditioning": "class", "vae": frozen_parts["vae"], "cache_latents": True,
                           "inference_steps": 2, "num_samples": 2}
    summary = train(load_recipe(str(write_recipe(tmp_path, "dit", recipe))))
    assert summary["global_step"] == 4 and summary["mixed_precision"] == "bf16"
    assert all(np.isfinite(losses(tmp_path / "out")))
    (cache_dir,) = (tmp_path / "out" / "prepared" / "latents").iterdir()
    from safetensors.torch import load_file

    cached = load_file(str(cache_dir / "latents.safetensors"))
    assert cached["latents"].dtype == torch.bfloat16 and cached["labels"].shape == (64,)
    assert DiffusionPipeline.from_pretrained(tmp_path / "out").vae.dtype == torch.float32


def test_cache_latents_needs_a_vae(tmp_path):
    recipe = unet_recipe(tmp_path / "o", diffusion={"cache_latents": True})
    with pytest.raises(RecipeError, match=r"diffusion\.cache_latents.*diffusion\.vae"):
        load_recipe(str(write_recipe(tmp_path, "pixel", recipe)))
