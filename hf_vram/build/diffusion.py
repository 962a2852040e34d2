"""Recipe -> diffusers objects: the denoising model, the frozen VAE, the noise schedulers, and the pipeline class the
output is saved as (so that `DiffusionPipeline.from_pretrained(OUTPUT_DIR)` loads it).

Architectures (model.arch):
  unet2d            UNet2DModel, unconditional, pixel space (or a VAE's latents) -> DDPMPipeline
  dit               DiTTransformer2DModel, class-conditional, in a VAE's latent space -> DiTPipeline

The VAE question. DiTPipeline (like StableDiffusionPipeline and PixArtAlphaPipeline) always decodes its result
with `self.vae.decode(latents / scaling_factor)`: no stock pipeline runs these models in pixel space, and no
diffusers autoencoder is an identity. Rather than save a fake VAE, an arch whose stock pipeline needs one requires
`diffusion.vae` (a frozen pretrained AutoencoderKL such as stabilityai/sd-vae-ft-mse), and the model learns in its
latent space; the saved pipeline holds that VAE and is complete. Latents are the posterior mean (`mode()`), as in
trainers that cache latents. The CPU tests name a small AutoencoderKL built from a config (random, frozen): the
pipeline loads and runs; its decoded pictures are only as good as that VAE.

DiTPipeline hardcodes the null class of classifier-free guidance as id 1000, so a DiT's label table always has
1000 classes (+ the null row): a dataset's classes use the first rows; the rest are never trained.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from hf_vram.errors import UserError

ARCHS = {
    "unet2d": "UNet2DModel",
    "dit": "DiTTransformer2DModel",
}
# Archs the schema knows of but this version does not build yet (text-to-image).
PLANNED_ARCHS = {
    "unet2d-condition": "UNet2DConditionModel",
    "pixart": "PixArtTransformer2DModel",
}
ALL_ARCHS = {**ARCHS, **PLANNED_ARCHS}
PIPELINES = {"unet2d": "DDPMPipeline", "dit": "DiTPipeline"}
DIT_NULL_CLASS = 1000
# Keys of model.config that hf-vram sets from the data and the VAE.
DERIVED_KEYS = {"in_channels", "out_channels", "sample_size", "num_embeds_ada_norm", "num_class_embeds"}


def model_class(arch: str):
    import diffusers

    return getattr(diffusers, ALL_ARCHS[arch])


def config_keys(arch: str) -> set[str]:
    """The parameters of the arch's diffusers class's __init__ (what model.config may set)."""
    params = inspect.signature(model_class(arch).__init__).parameters
    return {k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@dataclass
class DiffusionParts:
    arch: str
    model: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler: training noise
    sample_scheduler: object  # ddpm or ddim: sampling and the saved pipeline
    vae: object | None = None
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    latent_channels: int = 3
    latent_size: int = 64

    @property
    def conditioning(self) -> str:
        return "class" if self.arch == "dit" else "none"

    @property
    def null_class(self) -> int | None:
        return DIT_NULL_CLASS if self.arch == "dit" else None


def _check_arch(arch: str) -> None:
    if arch in PLANNED_ARCHS:
        raise UserError(f"model.arch: {arch} ({PLANNED_ARCHS[arch]}) is not built by this version of hf-vram yet; "
                        f"use one of {', '.join(ARCHS)}")
    if arch not in ARCHS:
        raise UserError(f"model.arch: unknown diffusion architecture '{arch}'; one of {', '.join(ALL_ARCHS)}")


def model_config(recipe, latent_channels: int, latent_size: int) -> dict:
    """model.config with the keys that follow from the data and the VAE filled in (a conflicting value is an error)."""
    arch = recipe.model.arch
    derived = {"in_channels": latent_channels, "out_channels": latent_channels, "sample_size": latent_size}
    if arch == "dit":
        derived["num_embeds_ada_norm"] = DIT_NULL_CLASS
    config = dict(recipe.model.config)
    for key, value in derived.items():
        if key in config and config[key] != value:
            raise UserError(f"model.config.{key}: {config[key]} conflicts with the data/VAE ({value}); leave it out, "
                            "hf-vram sets it")
        config[key] = value
    return config


def load_vae(recipe):
    if not recipe.diffusion.vae:
        return None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(recipe.diffusion.vae)
    vae.requires_grad_(False)
    return vae.eval()


def schedulers(recipe):
    from diffusers import DDIMScheduler, DDPMScheduler

    d = recipe.diffusion
    kw = dict(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)
    noise = DDPMScheduler(**kw)
    sample = DDIMScheduler(**kw, clip_sample=recipe.diffusion.vae is None) if d.sampler == "ddim" else DDPMScheduler(**kw)
    return noise, sample


def build(recipe, channels: int, resolution: int, num_classes: int | None = None, class_names=(),
          vae=None) -> DiffusionParts:
    """The model (random weights), schedulers and VAE of a recipe, for images of `channels` x `resolution`^2."""
    arch = recipe.model.arch
    _check_arch(arch)
    if arch == "dit" and num_classes is not None and num_classes > DIT_NULL_CLASS:
        raise UserError(f"diffusion.num_classes: DiT's pipeline supports up to {DIT_NULL_CLASS} classes")
    if vae is None:
        vae = load_vae(recipe)
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if vae.config.in_channels != channels:
            raise UserError(f"diffusion.vae: it encodes {vae.config.in_channels}-channel images; set "
                            f"data.images.channels: {vae.config.in_channels}")
        latent_channels, latent_size = vae.config.latent_channels, resolution // factor
    else:
        latent_channels, latent_size = channels, resolution
    config = model_config(recipe, latent_channels, latent_size)
    model = model_class(arch)(**config)
    if arch == "dit":
        # hf-vram drops labels itself (diffusion.cond_dropout); DiT's built-in 10% label dropout is switched off.
        for m in model.modules():
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
    noise, sample = schedulers(recipe)
    return DiffusionParts(arch, model, noise, sample, vae, num_classes, list(class_names), latent_channels, latent_size)


def count_parameters_meta(recipe, channels: int | None = None, resolution: int | None = None) -> int:
    """Parameters of the recipe's model, built on the meta device (no memory, no VAE download)."""
    arch = recipe.model.arch
    images = recipe.data.images if recipe.data else None
    channels = channels or (images.channels if images else 3)
    resolution = resolution or (images.resolution if images else 64)
    latent_channels, size = (4, resolution // 8) if recipe.diffusion and recipe.diffusion.vae else (channels, resolution)
    config = model_config(recipe, latent_channels, size)
    with torch.device("meta"):
        model = model_class(arch)(**config)
    return sum(p.numel() for p in model.parameters())


def forward(parts: DiffusionParts, model, noisy, timesteps, labels=None):
    """The model's prediction (noise or v) for a noisy batch."""
    if parts.arch == "dit":
        out = model(noisy, timestep=timesteps, class_labels=labels).sample
        return out[:, : parts.latent_channels]
    return model(noisy, timesteps).sample


def make_pipeline(parts: DiffusionParts, model):
    """The stock pipeline around a (trained) model: what is saved and what draws the sample grids."""
    from diffusers import DDPMPipeline, DiTPipeline

    if parts.arch == "dit":
        names = parts.class_names or [str(i) for i in range(parts.num_classes or 0)]
        # id2label lets `pipe.get_label_ids(["7"])` find class ids by name.
        return DiTPipeline(transformer=model, vae=parts.vae, scheduler=parts.sample_scheduler,
                           id2label={i: n for i, n in enumerate(names)})
    return DDPMPipeline(unet=model, scheduler=parts.sample_scheduler)


def generate(pipe, parts: DiffusionParts, n: int, steps: int, guidance_scale: float, seed: int,
             class_labels: list[int] | None = None):
    """n PIL images from a pipeline (class_labels: one per image, for class-conditional models)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if parts.arch == "dit":
        return pipe(class_labels=class_labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator).images
    return pipe(batch_size=n, num_inference_steps=steps, generator=generator).images
