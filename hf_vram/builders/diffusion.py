"""Recipe -> diffusers objects: the denoising model, the frozen VAE, the noise schedulers, and the pipeline class the
output is saved as (so that `DiffusionPipeline.from_pretrained(OUTPUT_DIR)` loads it).

Architectures (model.arch):
  unet2d            UNet2DModel in pixel space (or a VAE's latents): unconditional -> DDPMPipeline;
                    class-conditional -> ClassConditionalPipeline (hf_vram/pipelines/pixel_pipelines.py)
  dit               DiTTransformer2DModel, class-conditional, in a VAE's latent space -> DiTPipeline
  unet2d-condition  UNet2DConditionModel, text-conditional (CLIP text encoder): in a VAE's latents
                    -> StableDiffusionPipeline; without a VAE, in pixel space -> PixelTextToImagePipeline
  pixart            PixArtTransformer2DModel, text-conditional (T5 encoder), in a VAE's latents -> PixArtAlphaPipeline

The two pipelines diffusers does not ship are saved with their code (pixel_pipelines.py, named in model_index.json as
custom pipelines on the Hub are): `DiffusionPipeline.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` loads them.

Text encoders. diffusion.text_encoder names a frozen pretrained one (CLIPTextModel for unet2d-condition,
T5EncoderModel for pixart) with its own tokenizer. Empty = a small encoder of the same family built from a config
and trained with the model: TEXT_LAYERS layers of width model.config.cross_attention_dim (unet2d-condition) or
model.config.caption_channels (pixart) (defaults in SCRATCH_TEXT_DIM), heads of 64, and a byte-level BPE
tokenizer trained offline on the dataset's captions (an EOS token appended to every caption, so an empty caption
is never an all-padding sequence). Every caption is padded to diffusion.max_caption_length tokens.

The VAE question. DiTPipeline and PixArtAlphaPipeline always decode their result with
`self.vae.decode(latents / scaling_factor)`: no stock pipeline runs these models in pixel space, and no diffusers
autoencoder is an identity. Rather than save a fake VAE, an arch whose stock pipeline needs one requires
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
    "unet2d-condition": "UNet2DConditionModel",
    "pixart": "PixArtTransformer2DModel",
}
# Archs the schema knows of but this version does not build yet.
PLANNED_ARCHS: dict[str, str] = {}
ALL_ARCHS = {**ARCHS, **PLANNED_ARCHS}
# Archs whose pipelines always decode with a VAE (diffusion.vae is required).
VAE_ARCHS = ("dit", "pixart")
# The file (copied into outputs that need it) holding the pipelines diffusers does not ship.
CUSTOM_PIPELINE_MODULE = "pixel_pipelines"
TEXT_ARCHS = ("unet2d-condition", "pixart")
# The model.config key that receives the text encoder's width.
TEXT_DIM_KEY = {"unet2d-condition": "cross_attention_dim", "pixart": "caption_channels"}
# Width of a text encoder trained from scratch when model.config does not set TEXT_DIM_KEY.
SCRATCH_TEXT_DIM = {"unet2d-condition": 256, "pixart": 256}
TEXT_LAYERS = 4
DIT_NULL_CLASS = 1000
# Keys of model.config that hf-vram sets from the data and the VAE.
DERIVED_KEYS = {"in_channels", "out_channels", "sample_size", "num_embeds_ada_norm", "num_class_embeds"}


def pipeline_name(arch: str, conditioning: str, vae: bool) -> str:
    """The class the output is saved as."""
    if arch == "unet2d":
        return "ClassConditionalPipeline" if conditioning == "class" else "DDPMPipeline"
    if arch == "unet2d-condition":
        return "StableDiffusionPipeline" if vae else "PixelTextToImagePipeline"
    return {"dit": "DiTPipeline", "pixart": "PixArtAlphaPipeline"}[arch]


def is_custom_pipeline(name: str) -> bool:
    return name in ("ClassConditionalPipeline", "PixelTextToImagePipeline")


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
    text_encoder: object | None = None
    tokenizer: object | None = None
    text_trainable: bool = False
    max_caption_length: int = 32
    conditioning: str = "none"  # none, class or text

    @property
    def null_class(self) -> int | None:
        """The class id of 'no class' (classifier-free guidance): DiTPipeline's fixed 1000, or a class-conditional
        UNet's last row."""
        if self.conditioning != "class":
            return None
        return DIT_NULL_CLASS if self.arch == "dit" else self.num_classes

    @property
    def pipeline_name(self) -> str:
        return pipeline_name(self.arch, self.conditioning, self.vae is not None)


def _check_arch(arch: str) -> None:
    if arch in PLANNED_ARCHS:  # pragma: no cover (none at present)
        raise UserError(f"model.arch: {arch} ({PLANNED_ARCHS[arch]}) is not built by this version of hf-vram yet; "
                        f"use one of {', '.join(ARCHS)}")
    if arch not in ARCHS:
        raise UserError(f"model.arch: unknown diffusion architecture '{arch}'; one of {', '.join(ALL_ARCHS)}")


def model_config(recipe, latent_channels: int, latent_size: int, text_dim: int | None = None,
                 num_classes: int | None = None) -> dict:
    """model.config with the keys that follow from the data, the VAE and the text encoder filled in (a conflicting
    value is an error)."""
    arch = recipe.model.arch
    derived = {"in_channels": latent_channels, "out_channels": latent_channels, "sample_size": latent_size}
    if arch == "dit":
        derived["num_embeds_ada_norm"] = DIT_NULL_CLASS
    if arch == "unet2d" and recipe.diffusion.conditioning == "class":
        # One row per class plus the null class of classifier-free guidance.
        derived["num_class_embeds"] = (num_classes or recipe.diffusion.num_classes or 10) + 1
    if arch in TEXT_ARCHS:
        derived[TEXT_DIM_KEY[arch]] = text_dim or scratch_text_dim(recipe)
    if arch == "pixart" and "cross_attention_dim" not in recipe.model.config:
        # PixArt projects the captions to its own width: its cross-attention reads that width.
        c = recipe.model.config
        derived["cross_attention_dim"] = c.get("num_attention_heads", 16) * c.get("attention_head_dim", 72)
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


def scratch_text_dim(recipe) -> int:
    arch = recipe.model.arch
    return recipe.model.config.get(TEXT_DIM_KEY[arch]) or SCRATCH_TEXT_DIM[arch]


def _add_eos(tok) -> None:
    from tokenizers import processors

    eos = tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.convert_tokens_to_ids(eos))])


def load_text_encoder(recipe, captions=()):
    """(text encoder, tokenizer, trainable): the named frozen encoder, or a small one from a config (trainable)
    with a BPE tokenizer trained on `captions`."""
    arch, d = recipe.model.arch, recipe.diffusion
    if d.text_encoder:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        cls = CLIPTextModel if arch == "unet2d-condition" else T5EncoderModel
        encoder = cls.from_pretrained(d.text_encoder)
        tok = AutoTokenizer.from_pretrained(d.text_encoder)
        tok.model_max_length = d.max_caption_length
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        encoder.requires_grad_(False)
        return encoder.eval(), tok, False
    from hf_vram.builders.tokenizer import train_bpe

    captions = [c for c in captions if c]
    if not captions:
        raise UserError("diffusion.text_encoder: a text encoder trained from scratch needs captions "
                        "(data.images.caption_field) to train its tokenizer on")
    tok = train_bpe(captions, recipe.tokenizer.vocab_size, d.max_caption_length)
    _add_eos(tok)
    encoder = scratch_text_encoder(recipe, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    return encoder, tok, True


def scratch_text_encoder(recipe, vocab_size: int, pad_id: int = 0, bos_id: int | None = None, eos_id: int | None = None):
    """A small text encoder (random weights) of the arch's family: CLIP for unet2d-condition, T5 for pixart."""
    arch, d = recipe.model.arch, recipe.diffusion
    dim = scratch_text_dim(recipe)
    heads = max(1, dim // 64)
    if arch == "unet2d-condition":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=4 * dim,
                                num_hidden_layers=TEXT_LAYERS, num_attention_heads=heads,
                                max_position_embeddings=d.max_caption_length, pad_token_id=pad_id,
                                bos_token_id=bos_id, eos_token_id=eos_id)
        return CLIPTextModel(config)
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=dim, d_kv=64 if dim >= 64 else dim, d_ff=4 * dim,
                      num_layers=TEXT_LAYERS, num_heads=heads, feed_forward_proj="gated-gelu",
                      pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
    return T5EncoderModel(config)


def text_dim_of(encoder) -> int:
    return getattr(encoder.config, "d_model", None) or encoder.config.hidden_size


def encode_text(parts: DiffusionParts, captions: list[str], device):
    """Caption embeddings (B, L, D) and attention mask (B, L): every caption padded to max_caption_length."""
    tok = parts.tokenizer(captions, padding="max_length", max_length=parts.max_caption_length, truncation=True,
                          return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    if parts.arch == "pixart":
        # As PixArtAlphaPipeline: T5 sees the mask, and so does the transformer's cross-attention.
        return parts.text_encoder(ids, attention_mask=mask)[0], mask
    # As StableDiffusionPipeline: CLIP without a mask, the UNet attends to every position (padding included).
    return parts.text_encoder(ids)[0], None


def schedulers(recipe):
    from diffusers import DDIMScheduler, DDPMScheduler

    d = recipe.diffusion
    kw = dict(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)
    noise = DDPMScheduler(**kw)
    # DDIM: clip x0 to [-1, 1] in pixel space only (latents are not bounded); steps_offset 1 as Stable Diffusion's
    # DDIM (StableDiffusionPipeline rewrites and warns about 0).
    sample = (DDIMScheduler(**kw, clip_sample=recipe.diffusion.vae is None, steps_offset=1) if d.sampler == "ddim"
              else DDPMScheduler(**kw))
    return noise, sample


def build(recipe, channels: int, resolution: int, num_classes: int | None = None, class_names=(),
          vae=None, captions=()) -> DiffusionParts:
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
    encoder = tok = None
    trainable = False
    if arch in TEXT_ARCHS:
        encoder, tok, trainable = load_text_encoder(recipe, captions)
    config = model_config(recipe, latent_channels, latent_size, text_dim_of(encoder) if encoder is not None else None,
                          num_classes)
    model = model_class(arch)(**config)
    if arch == "dit":
        # hf-vram drops labels itself (diffusion.cond_dropout); DiT's built-in 10% label dropout is switched off.
        for m in model.modules():
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
    noise, sample = schedulers(recipe)
    return DiffusionParts(arch, model, noise, sample, vae, num_classes, list(class_names), latent_channels, latent_size,
                          encoder, tok, trainable, recipe.diffusion.max_caption_length, recipe.diffusion.conditioning)


def forward(parts: DiffusionParts, model, noisy, timesteps, labels=None):
    """The model's prediction (noise or v) for a noisy batch (labels: class ids, or (embeddings, mask) of text)."""
    if parts.arch == "dit":
        out = model(noisy, timestep=timesteps, class_labels=labels).sample
        return out[:, : parts.latent_channels]
    if parts.arch == "unet2d-condition":
        return model(noisy, timesteps, encoder_hidden_states=labels[0]).sample
    if parts.arch == "pixart":
        emb, mask = labels
        out = model(noisy, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=timesteps,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out[:, : parts.latent_channels]
    if parts.conditioning == "class":
        return model(noisy, timesteps, class_labels=labels).sample
    return model(noisy, timesteps).sample


def make_pipeline(parts: DiffusionParts, model):
    """The stock pipeline around a (trained) model: what is saved and what draws the sample grids."""
    from diffusers import DDPMPipeline, DiTPipeline, PixArtAlphaPipeline, StableDiffusionPipeline

    from hf_vram.pipelines.pixel_pipelines import ClassConditionalPipeline, PixelTextToImagePipeline

    names = parts.class_names or [str(i) for i in range(parts.num_classes or 0)]
    if parts.pipeline_name == "ClassConditionalPipeline":
        return ClassConditionalPipeline(unet=model, scheduler=parts.sample_scheduler, id2label=dict(enumerate(names)))
    if parts.pipeline_name == "PixelTextToImagePipeline":
        return PixelTextToImagePipeline(unet=model, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                        scheduler=parts.sample_scheduler)
    if parts.arch == "unet2d-condition":
        return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=model, scheduler=parts.sample_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if parts.arch == "pixart":
        return PixArtAlphaPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                                   transformer=model, scheduler=parts.sample_scheduler)
    if parts.arch == "dit":
        # id2label lets `pipe.get_label_ids(["7"])` find class ids by name.
        return DiTPipeline(transformer=model, vae=parts.vae, scheduler=parts.sample_scheduler,
                           id2label={i: n for i, n in enumerate(names)})
    return DDPMPipeline(unet=model, scheduler=parts.sample_scheduler)


def pipeline_kwargs(arch: str, resolution: int, max_caption_length: int) -> dict:
    """Keyword arguments a text-to-image pipeline needs besides the prompt: the image size, and for PixArt no
    resolution binning (its bins exist only for sample sizes 32/64/128) and the training caption length."""
    kw = {"height": resolution, "width": resolution}
    if arch == "pixart":
        kw.update(use_resolution_binning=False, max_sequence_length=max_caption_length, clean_caption=False)
    return kw


def generate(pipe, parts: DiffusionParts, n: int, steps: int, guidance_scale: float, seed: int,
             class_labels: list[int] | None = None, prompts: list[str] | None = None):
    """n PIL images from a pipeline (class_labels: one per image, for class-conditional models; prompts: one per
    image, for text-conditional ones)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if parts.conditioning == "text":
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae is not None else 1
        kw = pipeline_kwargs(parts.arch, parts.latent_size * factor, parts.max_caption_length)
        return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator, **kw).images
    if parts.conditioning == "class":
        return pipe(class_labels=class_labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator).images
    return pipe(batch_size=n, num_inference_steps=steps, generator=generator).images


def save_pipeline(parts: DiffusionParts, model, out) -> None:
    """save_pretrained, plus what it leaves out: DiTPipeline's id2label, and the code of a pipeline diffusers does
    not ship (copied beside model_index.json, which names it as [module, class])."""
    import json
    import shutil
    from pathlib import Path

    from hf_vram.atomic import atomic_write_json

    out = Path(out)
    make_pipeline(parts, model).save_pretrained(str(out))
    index = json.loads((out / "model_index.json").read_text())
    if parts.arch == "dit":
        # The Hub's DiT checkpoints keep id2label in model_index.json, from where from_pretrained passes it back
        # (pipe.get_label_ids(["7"])).
        names = parts.class_names or [str(i) for i in range(parts.num_classes or 0)]
        index["id2label"] = {str(i): n for i, n in enumerate(names)}
    if is_custom_pipeline(parts.pipeline_name):
        from hf_vram.pipelines import pixel_pipelines

        shutil.copyfile(pixel_pipelines.__file__, out / f"{CUSTOM_PIPELINE_MODULE}.py")
        index["_class_name"] = [CUSTOM_PIPELINE_MODULE, parts.pipeline_name]
    atomic_write_json(out / "model_index.json", index)


def load_pipeline(out):
    """DiffusionPipeline.from_pretrained of a saved output; the code of a custom pipeline is trusted only when it is
    hf-vram's own file, byte for byte."""
    import json
    from pathlib import Path

    from diffusers import DiffusionPipeline

    out = Path(out)
    index = json.loads((out / "model_index.json").read_text())
    trust = False
    if isinstance(index.get("_class_name"), list):
        from hf_vram.pipelines import pixel_pipelines

        saved = out / f"{CUSTOM_PIPELINE_MODULE}.py"
        trust = saved.is_file() and saved.read_bytes() == Path(pixel_pipelines.__file__).read_bytes()
        if not trust:
            raise UserError(f"{out}: model_index.json names custom pipeline code, and {saved.name} is not this "
                            f"hf-vram's {CUSTOM_PIPELINE_MODULE}.py (another version, or edited); inspect it and load "
                            "it with DiffusionPipeline.from_pretrained(..., trust_remote_code=True), or copy "
                            f"{pixel_pipelines.__file__} over it")
    return DiffusionPipeline.from_pretrained(str(out), trust_remote_code=trust)
