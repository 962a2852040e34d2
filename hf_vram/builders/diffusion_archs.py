"""The table of diffusion architectures (model.arch): the diffusers model class, the conditioning it takes, whether
its stock pipeline needs a VAE, its text encoder, the pipeline its output is saved as, and how it is called. The
schema's checks, the builder (builders/diffusion.py), the planner and the CLI read it; a new architecture is one
row here (and a forward function when it is called differently).

This module imports nothing heavy: the recipe schema reads it while validating."""

from __future__ import annotations

from dataclasses import dataclass, field

# DiTPipeline hardcodes the null class of classifier-free guidance as id 1000, so a DiT's label table always has
# 1000 classes (+ the null row): a dataset's classes use the first rows; the rest are never trained.
DIT_NULL_CLASS = 1000
# The file (copied into outputs that need it) holding the pipelines diffusers does not ship.
CUSTOM_PIPELINE_MODULE = "pixel_pipelines"
CUSTOM_PIPELINES = ("ClassConditionalPipeline", "PixelTextToImagePipeline")


@dataclass(frozen=True)
class DiffusionArch:
    name: str
    model_class: str  # the diffusers class
    conditionings: tuple[str, ...]  # the diffusion.conditioning values it takes
    # The pipeline class per conditioning, with a VAE (latent space) and without (pixel space); a conditioning
    # missing from `pixel` means the stock pipeline always decodes with a VAE (diffusion.vae is required).
    latent: dict[str, str]
    pixel: dict[str, str]
    text_encoder: str | None = None  # the transformers class of its text encoder (text conditioning)
    text_dim_key: str | None = None  # the model.config key that receives the text encoder's width
    masked_captions: bool = False  # the pipeline passes the captions' attention mask to the encoder and the model
    # Keys of model.config that hf-vram sets from the data and the VAE (a recipe may not set them; the text
    # encoder's width, text_dim_key, a recipe may set, and the encoder follows).
    derived_keys: tuple[str, ...] = ("in_channels", "out_channels", "sample_size")
    # Keyword arguments its pipeline needs when sampling at the training size (PixArt's resolution bins exist only
    # for sample sizes 32/64/128, and its caption cleaning needs extra packages).
    sample_kwargs: dict = field(default_factory=dict)
    caption_length_kwarg: str | None = None  # the pipeline argument that takes diffusion.max_caption_length
    # The model projects the captions to its own width, which its cross-attention then reads (model.config's
    # cross_attention_dim follows from its heads unless set).
    projects_captions: bool = False
    fixed_null_class: int | None = None  # the null class its pipeline hardcodes for classifier-free guidance

    @property
    def needs_vae(self) -> bool:
        return any(c not in self.pixel for c in self.conditionings)

    def pipeline_name(self, conditioning: str, vae: bool) -> str:
        return (self.latent if vae else self.pixel)[conditioning]


ARCHS: dict[str, DiffusionArch] = {a.name: a for a in (
    DiffusionArch("unet2d", "UNet2DModel", ("none", "class"),
                  latent={"none": "DDPMPipeline", "class": "ClassConditionalPipeline"},
                  pixel={"none": "DDPMPipeline", "class": "ClassConditionalPipeline"},
                  derived_keys=("in_channels", "out_channels", "sample_size", "num_class_embeds")),
    DiffusionArch("dit", "DiTTransformer2DModel", ("class",), latent={"class": "DiTPipeline"}, pixel={},
                  derived_keys=("in_channels", "out_channels", "sample_size", "num_embeds_ada_norm"),
                  fixed_null_class=DIT_NULL_CLASS),
    DiffusionArch("unet2d-condition", "UNet2DConditionModel", ("text",), latent={"text": "StableDiffusionPipeline"},
                  pixel={"text": "PixelTextToImagePipeline"}, text_encoder="CLIPTextModel",
                  text_dim_key="cross_attention_dim"),
    DiffusionArch("pixart", "PixArtTransformer2DModel", ("text",), latent={"text": "PixArtAlphaPipeline"}, pixel={},
                  text_encoder="T5EncoderModel", text_dim_key="caption_channels", masked_captions=True,
                  sample_kwargs={"use_resolution_binning": False, "clean_caption": False},
                  caption_length_kwarg="max_sequence_length", projects_captions=True),
)}


# Every key of model.config that hf-vram sets itself, for some architecture.
DERIVED_KEYS = frozenset(k for a in ARCHS.values() for k in a.derived_keys)


def conditioning_problem(arch: str, conditioning: str, vae: str | None) -> str | None:
    """Why a recipe's diffusion section does not go with its architecture ("key: message"), or None (also for an
    unknown arch, which the recipe loader reports with its did-you-mean)."""
    a = ARCHS.get(arch)
    if a is None:
        return None
    if conditioning not in a.conditionings:
        kind = {"none": "unconditional training", "class": "class conditioning", "text": "text conditioning"}
        fits = [n for n, other in ARCHS.items() if conditioning in other.conditionings]
        return (f"diffusion.conditioning: {kind[conditioning]} goes with arch {' or '.join(fits)} (got conditioning "
                f"{conditioning} with arch {arch}, which takes {' or '.join(a.conditionings)})")
    if not vae and conditioning not in a.pixel:
        pixel = [n for n, other in ARCHS.items() if other.pixel]
        return (f"diffusion.vae: arch {arch} is saved as a pipeline that decodes latents with a VAE: name a pretrained "
                f"AutoencoderKL (e.g. stabilityai/sd-vae-ft-mse); {' and '.join(pixel)} also run in pixel space")
    return None


def sampling_kwargs(arch: str, max_caption_length: int) -> dict:
    """What the arch's pipeline needs, besides prompt and sizes, to sample as training did."""
    a = ARCHS[arch]
    kw = dict(a.sample_kwargs)
    if a.caption_length_kwarg:
        kw[a.caption_length_kwarg] = max_caption_length
    return kw
