"""Recipe -> diffusers objects: the denoising model, the frozen VAE, the noise schedulers, and the pipeline class the
output is saved as (so that `DiffusionPipeline.from_pretrained(OUTPUT_DIR)` loads it).

Architectures (model.arch; their table is diffusion_archs.py):
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
model.config.caption_channels (pixart) (default SCRATCH_TEXT_DIM), heads of 64, and a byte-level BPE
tokenizer trained offline on the dataset's captions (an EOS token appended to every caption, so an empty caption
is never an all-padding sequence). Every caption is padded to diffusion.max_caption_length tokens.

The VAE question. DiTPipeline and PixArtAlphaPipeline always decode their result with
`self.vae.decode(latents / scaling_factor)`: no stock pipeline runs these models in pixel space, and no diffusers
autoencoder is an identity. Rather than save a fake VAE, an arch whose stock pipeline needs one requires
`diffusion.vae` (a frozen pretrained AutoencoderKL such as stabilityai/sd-vae-ft-mse), and the model learns in its
latent space; the saved pipeline holds that VAE and is complete. Latents are the posterior mean (`mode()`), as in
trainers that cache latents. The CPU tests name a small AutoencoderKL built from a config (random, frozen): the
pipeline loads and runs; its decoded pictures are only as good as that VAE.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from hf_vram.builders.diffusion_archs import ARCHS, CUSTOM_PIPELINE_MODULE, CUSTOM_PIPELINES, sampling_kwargs
from hf_vram.errors import UserError

# Width of a text encoder trained from scratch when model.config does not set the arch's text_dim_key.
SCRATCH_TEXT_DIM = 256
TEXT_LAYERS = 4


def pipeline_name(arch: str, conditioning: str, vae: bool) -> str:
    """The class the output is saved as."""
    return ARCHS[arch].pipeline_name(conditioning, vae)


def is_custom_pipeline(name: str) -> bool:
    return name in CUSTOM_PIPELINES


def model_class(arch: str):
    import diffusers

    return getattr(diffusers, ARCHS[arch].model_class)


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
        return ARCHS[self.arch].fixed_null_class or self.num_classes

    @property
    def pipeline_name(self) -> str:
        return pipeline_name(self.arch, self.conditioning, self.vae is not None)

    def encode_text(self, captions: list[str], device):
        """Caption embeddings (B, L, D) and attention mask (B, L) or None; see encode_text."""
        return encode_text(self, captions, device)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UserError(f"model.arch: unknown diffusion architecture '{arch}'; one of {', '.join(ARCHS)}")


def model_config(recipe, latent_channels: int, latent_size: int, text_dim: int | None = None,
                 num_classes: int | None = None) -> dict:
    """model.config with the keys that follow from the data, the VAE and the text encoder filled in (a conflicting
    value is an error)."""
    a = ARCHS[recipe.model.arch]
    derived = {"in_channels": latent_channels, "out_channels": latent_channels, "sample_size": latent_size}
    if "num_embeds_ada_norm" in a.derived_keys:
        derived["num_embeds_ada_norm"] = a.fixed_null_class
    if "num_class_embeds" in a.derived_keys and recipe.diffusion.conditioning == "class":
        # One row per class plus the null class of classifier-free guidance.
        derived["num_class_embeds"] = (num_classes or recipe.diffusion.num_classes or 10) + 1
    if a.text_dim_key:
        derived[a.text_dim_key] = text_dim or scratch_text_dim(recipe)
    if a.projects_captions and "cross_attention_dim" not in recipe.model.config:
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
    return recipe.model.config.get(ARCHS[recipe.model.arch].text_dim_key) or SCRATCH_TEXT_DIM


def _add_eos(tok) -> None:
    from tokenizers import processors

    eos = tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.convert_tokens_to_ids(eos))])


def load_text_encoder(recipe, captions=()):
    """(text encoder, tokenizer, trainable): the named frozen encoder, or a small one from a config (trainable)
    with a BPE tokenizer trained on `captions`."""
    d = recipe.diffusion
    if d.text_encoder:
        import transformers
        from transformers import AutoTokenizer

        encoder = getattr(transformers, ARCHS[recipe.model.arch].text_encoder).from_pretrained(d.text_encoder)
        tok = AutoTokenizer.from_pretrained(d.text_encoder)
        tok.model_max_length = d.max_caption_length
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        encoder.requires_grad_(False)
        return encoder.eval(), tok, False
    from data_prep.tokenizer import train_bpe

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
    dim = scratch_text_dim(recipe)
    build = _SCRATCH_ENCODERS[ARCHS[recipe.model.arch].text_encoder]
    return build(vocab_size, dim, max(1, dim // 64), recipe.diffusion.max_caption_length, pad_id, bos_id, eos_id)


def _scratch_clip(vocab_size, dim, heads, max_length, pad_id, bos_id, eos_id):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=4 * dim,
                            num_hidden_layers=TEXT_LAYERS, num_attention_heads=heads,
                            max_position_embeddings=max_length, pad_token_id=pad_id,
                            bos_token_id=bos_id, eos_token_id=eos_id)
    return CLIPTextModel(config)


def _scratch_t5(vocab_size, dim, heads, max_length, pad_id, bos_id, eos_id):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=dim, d_kv=64 if dim >= 64 else dim, d_ff=4 * dim,
                      num_layers=TEXT_LAYERS, num_heads=heads, feed_forward_proj="gated-gelu",
                      pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
    return T5EncoderModel(config)


# By the arch's text_encoder class (diffusion_archs.py).
_SCRATCH_ENCODERS = {"CLIPTextModel": _scratch_clip, "T5EncoderModel": _scratch_t5}


def text_dim_of(encoder) -> int:
    return getattr(encoder.config, "d_model", None) or encoder.config.hidden_size


def encode_text(parts: DiffusionParts, captions: list[str], device):
    """Caption embeddings (B, L, D) and attention mask (B, L): every caption padded to max_caption_length."""
    tok = parts.tokenizer(captions, padding="max_length", max_length=parts.max_caption_length, truncation=True,
                          return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    if ARCHS[parts.arch].masked_captions:
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
          captions=()) -> DiffusionParts:
    """The model (random weights), schedulers and VAE of a recipe, for images of `channels` x `resolution`^2."""
    arch = recipe.model.arch
    _check_arch(arch)
    null_class = ARCHS[arch].fixed_null_class
    if null_class is not None and num_classes is not None and num_classes > null_class:
        raise UserError(f"diffusion.num_classes: the {arch} pipeline supports up to {null_class} classes")
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
    if ARCHS[arch].text_encoder:
        encoder, tok, trainable = load_text_encoder(recipe, captions)
    config = model_config(recipe, latent_channels, latent_size, text_dim_of(encoder) if encoder is not None else None,
                          num_classes)
    model = model_class(arch)(**config)
    # hf-vram drops labels itself (diffusion.cond_dropout); a label embedding's built-in dropout (DiT's 10%) is off.
    for m in model.modules():
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    noise, sample = schedulers(recipe)
    return DiffusionParts(arch, model, noise, sample, vae, num_classes, list(class_names), latent_channels, latent_size,
                          encoder, tok, trainable, recipe.diffusion.max_caption_length, recipe.diffusion.conditioning)


def forward(parts: DiffusionParts, model, noisy, timesteps, labels=None):
    """The model's prediction (noise or v) for a noisy batch (labels: class ids, or (embeddings, mask) of text)."""
    return _FORWARDS[parts.arch](parts, model, noisy, timesteps, labels)


def _forward_unet2d(parts, model, noisy, timesteps, labels):
    if parts.conditioning == "class":
        return model(noisy, timesteps, class_labels=labels).sample
    return model(noisy, timesteps).sample


def _forward_dit(parts, model, noisy, timesteps, labels):
    out = model(noisy, timestep=timesteps, class_labels=labels).sample
    return out[:, : parts.latent_channels]  # the rest is its learned variance, unused by DDPM's loss


def _forward_unet2d_condition(parts, model, noisy, timesteps, labels):
    return model(noisy, timesteps, encoder_hidden_states=labels[0]).sample


def _forward_pixart(parts, model, noisy, timesteps, labels):
    emb, mask = labels
    out = model(noisy, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=timesteps,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return out[:, : parts.latent_channels]


# One per architecture of diffusion_archs.ARCHS (a test checks that none is missing).
_FORWARDS = {"unet2d": _forward_unet2d, "dit": _forward_dit, "unet2d-condition": _forward_unet2d_condition,
             "pixart": _forward_pixart}


def make_pipeline(parts: DiffusionParts, model):
    """The pipeline around a (trained) model: what is saved and what draws the sample grids."""
    return _PIPELINES[parts.pipeline_name](parts, model)


def _class_names(parts: DiffusionParts) -> list[str]:
    return parts.class_names or [str(i) for i in range(parts.num_classes or 0)]


def _ddpm(parts, model):
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=model, scheduler=parts.sample_scheduler)


def _class_conditional(parts, model):
    from hf_vram.pipelines.pixel_pipelines import ClassConditionalPipeline

    return ClassConditionalPipeline(unet=model, scheduler=parts.sample_scheduler,
                                    id2label=dict(enumerate(_class_names(parts))))


def _dit(parts, model):
    from diffusers import DiTPipeline

    # id2label lets `pipe.get_label_ids(["7"])` find class ids by name.
    return DiTPipeline(transformer=model, vae=parts.vae, scheduler=parts.sample_scheduler,
                       id2label=dict(enumerate(_class_names(parts))))


def _stable_diffusion(parts, model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=model, scheduler=parts.sample_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _pixel_text_to_image(parts, model):
    from hf_vram.pipelines.pixel_pipelines import PixelTextToImagePipeline

    return PixelTextToImagePipeline(unet=model, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                    scheduler=parts.sample_scheduler)


def _pixart(parts, model):
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                               transformer=model, scheduler=parts.sample_scheduler)


# By the pipeline names of diffusion_archs.ARCHS.
_PIPELINES = {"DDPMPipeline": _ddpm, "ClassConditionalPipeline": _class_conditional, "DiTPipeline": _dit,
              "StableDiffusionPipeline": _stable_diffusion, "PixelTextToImagePipeline": _pixel_text_to_image,
              "PixArtAlphaPipeline": _pixart}


def pipeline_kwargs(arch: str, resolution: int, max_caption_length: int) -> dict:
    """Keyword arguments a text-to-image pipeline needs besides the prompt: the image size, and what the arch's
    pipeline needs to sample as training did (diffusion_archs.sampling_kwargs)."""
    return {"height": resolution, "width": resolution, **sampling_kwargs(arch, max_caption_length)}


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

    from data_prep.atomic import atomic_write_json

    out = Path(out)
    make_pipeline(parts, model).save_pretrained(str(out))
    index = json.loads((out / "model_index.json").read_text())
    if parts.pipeline_name == "DiTPipeline":
        # The Hub's DiT checkpoints keep id2label in model_index.json, from where from_pretrained passes it back
        # (pipe.get_label_ids(["7"])).
        index["id2label"] = {str(i): n for i, n in enumerate(_class_names(parts))}
    if is_custom_pipeline(parts.pipeline_name):
        from hf_vram.pipelines import pixel_pipelines

        shutil.copyfile(pixel_pipelines.__file__, out / f"{CUSTOM_PIPELINE_MODULE}.py")
        index["_class_name"] = [CUSTOM_PIPELINE_MODULE, parts.pipeline_name]
    atomic_write_json(out / "model_index.json", index)


def load_diffusion_pipeline(out):
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
