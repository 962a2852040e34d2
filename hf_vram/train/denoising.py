"""The pieces of a denoising step and of drawing samples (the loop is hf_vram/runners/diffusion.py): conditions
with classifier-free-guidance dropout, the VAE's latents, the (min-SNR weighted) noise-prediction loss, and a sample
grid drawn by the pipeline the output is saved as."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hf_vram.builders.diffusion import forward, generate, make_pipeline


def conditions(batch, parts, cond_dropout: float, device=None):
    """Class labels with a fraction replaced by the null class, or caption embeddings (and mask) with a fraction of
    the captions replaced by the empty one (classifier-free guidance training)."""
    if parts.conditioning == "text":
        captions = list(batch["caption"])
        if cond_dropout > 0:
            drop = torch.rand(len(captions)) < cond_dropout
            captions = ["" if dropped else c for c, dropped in zip(captions, drop.tolist())]
        if parts.text_trainable:
            return parts.encode_text(captions, device)
        with torch.no_grad():
            return parts.encode_text(captions, device)
    if parts.conditioning != "class":
        return None
    labels = batch["label"].long()
    if cond_dropout > 0:
        drop = torch.rand(labels.shape[0], device=labels.device) < cond_dropout
        labels = torch.where(drop, torch.full_like(labels, parts.null_class), labels)
    return labels


def cached_conditions(batch, parts, cache, cond_dropout: float, device):
    """conditions() for a batch of the latent cache: caption embeddings are looked up, and a dropped caption is the
    cached empty one (row 0), as encoding "" would give."""
    if not (cache.embeds is not None and parts.conditioning == "text"):
        return conditions(batch, parts, cond_dropout, device)
    rows = batch["caption_index"].cpu()
    if cond_dropout > 0:
        rows = torch.where(torch.rand(rows.shape[0]) < cond_dropout, torch.zeros_like(rows), rows)
    return cache.text(rows, device)


def encode_images(parts, pixel_values):
    """What the model denoises: the VAE's scaled latents (posterior mean), or the pixels themselves."""
    if parts.vae is None:
        return pixel_values
    with torch.no_grad():
        latents = parts.vae.encode(pixel_values.to(parts.vae.dtype)).latent_dist.mode()
    return latents * parts.vae.config.scaling_factor


def diffusion_loss(parts, model, latents, labels, snr_gamma: float | None):
    """Noise the batch at random timesteps and return the (min-SNR weighted) MSE of the model's prediction."""
    from diffusers.training_utils import compute_snr

    sched = parts.noise_scheduler
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = sched.add_noise(latents, noise, timesteps)
    v_prediction = sched.config.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v_prediction else noise
    pred = forward(parts, model, noisy, timesteps, labels)
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(sched, timesteps)
    weight = torch.clamp(snr, max=snr_gamma)
    weight = weight / (snr + 1) if v_prediction else weight / snr
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weight).mean()


def trained_parameters(parts, model) -> list:
    """The parameters the optimizer and the EMA follow: the (unwrapped) model's, and a text encoder's trained with it."""
    params = list(model.parameters())
    if parts.text_trainable:
        params += list(parts.text_encoder.parameters())
    return params


def frozen_modules(parts) -> list:
    return [m for m in (parts.vae, None if parts.text_trainable else parts.text_encoder) if m is not None]


def cast(module, dtype) -> None:
    # Only when it changes something: diffusers warns on every dtype cast of a model.
    if module.dtype != dtype:
        module.to(dtype)


class frozen_in_fp32:
    """The frozen VAE and text encoder in float32 for the duration (sampling: the stock pipelines feed the VAE
    the model's float32 latents, and take the text encoder's dtype for the latents), then back."""

    def __init__(self, parts):
        self.modules = frozen_modules(parts)
        self.dtypes = [m.dtype for m in self.modules]

    def __enter__(self):
        for m in self.modules:
            cast(m, torch.float32)

    def __exit__(self, *exc):
        for m, dtype in zip(self.modules, self.dtypes):
            cast(m, dtype)


def sample_prompts(recipe, data) -> list[str]:
    from data_prep.images import sample_captions

    d = recipe.diffusion
    prompts = list(d.sample_prompts) or sample_captions(data, d.num_samples)
    return [prompts[i % len(prompts)] for i in range(d.num_samples)]


def sample_grid(parts, model, recipe, data, path: Path, ema=None) -> Path:
    """A grid of diffusion.num_samples images drawn by the pipeline around the (unwrapped) model, with the EMA
    weights when given; the model's training state is restored after."""
    from data_prep.images import sample_classes, save_grid

    d = recipe.diffusion
    params = trained_parameters(parts, model)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    modules = [model] + ([parts.text_encoder] if parts.text_trainable else [])
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        pipe = make_pipeline(parts, model)
        pipe.set_progress_bar_config(disable=True)
        labels = sample_classes(data, d.num_samples) if parts.conditioning == "class" else None
        prompts = sample_prompts(recipe, data) if parts.conditioning == "text" else None
        with frozen_in_fp32(parts):
            images = generate(pipe, parts, d.num_samples, d.inference_steps, d.guidance_scale, recipe.train.seed,
                              labels, prompts)
    finally:
        if ema is not None:
            ema.restore(params)
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return save_grid(images, path)
