"""`hf-vram plan` for task diffusion: peak VRAM and time of a diffusion recipe, from one step run on fake tensors.

Why measured rather than counted: the language models' estimate (estimate.py) counts tensors per transformer
block; a U-Net's saved tensors depend on its block types, resolutions, attention levels and skip connections, and a
DiT's on its patching. So the recipe's model is built under torch's FakeTensorMode (shapes and dtypes, no memory)
at the real resolution and micro-batch, and one training step (noise -> model -> MSE -> backward -> AdamW) runs on
it under bf16 autocast, as a mixed-precision GPU step does, with measure.py's storage tracker (the one that checks
the language models' estimate) counting live bytes. A 100M-parameter U-Net at 64x64 takes a few seconds.
The step's FLOPs come from torch's FlopCounterMode over the same fake step.

Added to the measured step: the optimizer's states as the recipe's optimizer keeps them (the step runs torch's
AdamW, whose states are fp32), the fp32 EMA copy, the frozen VAE and text encoder (bf16 under bf16 mixed
precision, as the runner casts them), the VAE's encoding of a micro-batch (measured the same way; none with
diffusion.cache_latents), the CUDA context and the allocator's slack.
Not counted: cuDNN convolution workspaces, and drawing sample grids (no gradients; smaller than a training step
unless diffusion.num_samples is far above the micro-batch).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from hf_vram.errors import UserError
from hf_vram.recipe.load import LoadedRecipe
from hf_vram.vram.configs import ConfigUnavailable
from hf_vram.vram.estimate import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT,
    OPTIMIZERS_8BIT,
    GiB,
    Item,
    Plan,
    optimizer_bytes,
)
from hf_vram.vram.fitting import fit_search
from hf_vram.vram.gpus import GPU
from hf_vram.vram.report import item_lines, rough_duration

# Model FLOPs utilisation assumed for time: convolutions at small resolutions and many small kernels keep a
# diffusion step under a dense transformer's 40% (an assumption, not a measurement).
MFU_DIFFUSION = 0.30


def _config_or_known(ref: str, known: dict, what: str, load):
    """A frozen part's config: from a local folder or the Hub, else hf-vram's table of the shipped recipes' parts.
    A Hub id is asked for as the language-model planner asks (configs.hub_config_file: the HF cache, else one
    request under a deadline), never through huggingface_hub's retries, which wait 23 s or more per part when the
    Hub does not answer."""
    import sys

    from hf_vram.vram.configs import hub_config_file

    why = ""
    if not Path(ref).expanduser().exists():
        file, why = hub_config_file(ref)
        ref_or_folder = str(Path(file).parent) if file is not None else None
    else:
        ref_or_folder = ref
    if ref_or_folder is not None:
        try:
            return load(ref_or_folder)
        except (OSError, ValueError) as e:
            why = f"{ref}'s config cannot be read ({e})"
    if ref in known:
        if why:
            print(f"[hf-vram] {why}: planning {ref} from hf-vram's known config", file=sys.stderr, flush=True)
        return dict(known[ref])
    raise ConfigUnavailable(f"diffusion.{what}: cannot read the config of '{ref}' ({why or 'offline: HF_HUB_OFFLINE'}, "
                            "and not a known one); download it once or give a local path") from None


def vae_config(ref: str) -> dict:
    from diffusers import AutoencoderKL

    from hf_vram.vram.known_configs import KNOWN_VAE_CONFIGS

    return _config_or_known(ref, KNOWN_VAE_CONFIGS, "vae", lambda r: dict(AutoencoderKL.load_config(r)))


def text_encoder_config(ref: str):
    from transformers import AutoConfig

    from hf_vram.vram.known_configs import KNOWN_TEXT_ENCODER_CONFIGS

    def load(r):
        config = AutoConfig.from_pretrained(r)
        return getattr(config, "text_config", config)  # a full CLIP checkpoint holds its text model's config

    config = _config_or_known(ref, KNOWN_TEXT_ENCODER_CONFIGS, "text_encoder", load)
    if isinstance(config, dict):
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return config


def frozen_text_encoder(config):
    from transformers import CLIPTextModel, T5EncoderModel

    return (T5EncoderModel if config.model_type == "t5" else CLIPTextModel)(config)


def image_count(loaded: LoadedRecipe) -> int | None:
    """Training images: counted for builtin and local data, looked up for the shipped recipes' Hub datasets."""
    from hf_vram.vram.known_configs import KNOWN_DATASET_SIZES

    d = loaded.recipe.data
    if d.source.startswith("builtin:") or Path(d.source).expanduser().exists():
        from data_prep.images import load_images

        n = len(load_images(d.source, d.split, d.images, d.max_samples))
    else:
        n = KNOWN_DATASET_SIZES.get((d.source, d.split))
        if n is None:
            return None
    return min(n, d.max_samples) if d.max_samples else n


class DiffusionShapes:
    """What the step is built from: latent shape, the frozen parts' configs, the text encoder's width."""

    def __init__(self, loaded: LoadedRecipe):
        r = loaded.recipe
        d, images = r.diffusion, r.data.images
        self.recipe = r
        self.channels, self.resolution = images.channels, images.resolution
        self.vae = vae_config(d.vae) if d.vae else None
        if self.vae:
            factor = 2 ** (len(self.vae["block_out_channels"]) - 1)
            self.latent_channels, self.latent_size = self.vae["latent_channels"], self.resolution // factor
        else:
            self.latent_channels, self.latent_size = self.channels, self.resolution
        self.text = text_encoder_config(d.text_encoder) if d.conditioning == "text" and d.text_encoder else None
        self.text_trainable = d.conditioning == "text" and not d.text_encoder
        if self.text is not None:
            self.text_dim = getattr(self.text, "d_model", None) or self.text.hidden_size
        elif self.text_trainable:
            from hf_vram.builders.diffusion import scratch_text_dim

            self.text_dim = scratch_text_dim(r)
        else:
            self.text_dim = None
        # Classes read from the data at training time; 10 stands in here (one embedding row each: no measurable bytes).
        self.num_classes = d.num_classes or (10 if d.conditioning == "class" else None)


def _act_dtype(precision: str):
    """The autocast dtype of a GPU step: auto is bf16 on the cards hf-vram plans for (all have it)."""
    return {"fp32": None, "fp16": torch.float16}.get(precision, torch.bfloat16)


class _Step(torch.nn.Module):
    """One training step's forward: (text encoder ->) model -> MSE against the noise, under autocast."""

    def __init__(self, parts, text_encoder, dtype):
        super().__init__()
        self.model, self.text_encoder, self.parts, self.dtype = parts.model, text_encoder, parts, dtype

    def forward(self, latents, noise, timesteps, labels=None, input_ids=None, mask=None, embeds=None):
        from types import SimpleNamespace

        from hf_vram.builders.diffusion import forward

        noisy = latents + noise  # the scheduler's add_noise: same shapes, same memory
        autocast = torch.autocast("cpu", dtype=self.dtype) if self.dtype else nullcontext()
        with autocast:
            if input_ids is not None:
                emb = self.text_encoder(input_ids, attention_mask=mask)[0] if self.parts.arch == "pixart" \
                    else self.text_encoder(input_ids)[0]
                labels = (emb, mask)
            elif embeds is not None:
                labels = (embeds, mask)
            pred = forward(self.parts, self.model, noisy, timesteps, labels)
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(pred.float(), noise.float()))


def _peak_of(fn, fake_mode) -> int:
    """Peak live bytes of fn() above what was alive before (no gradients)."""
    from hf_vram.vram.measure import PeakTracker

    tracker = PeakTracker()
    try:
        with fake_mode, tracker, torch.no_grad():
            fn()
        return tracker.peak
    finally:
        tracker.close()


def measure_diffusion_step(shapes: DiffusionShapes, micro: int, checkpointing: bool, precision: str, fake: bool = True) -> dict:
    """One step of the recipe's model on fake tensors (real ones with fake=False, to check them): weights, fp32
    grads, the forward-backward peak and the optimizer step's (torch AdamW), and FLOPs per micro-batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from hf_vram.builders.diffusion import DiffusionParts, model_class, model_config, scratch_text_encoder
    from hf_vram.vram.measure import measure_step as tracked_step

    r, d = shapes.recipe, shapes.recipe.diffusion
    dtype = _act_dtype(precision)
    with FakeTensorMode() if fake else nullcontext():
        config = model_config(r, shapes.latent_channels, shapes.latent_size, shapes.text_dim, shapes.num_classes)
        model = model_class(r.model.arch)(**config)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        text = None
        if shapes.text_trainable:
            text = scratch_text_encoder(r, r.tokenizer.vocab_size, pad_id=0, bos_id=1, eos_id=2)  # ids: any in range
            text.train()
        parts = DiffusionParts(r.model.arch, model, None, None, latent_channels=shapes.latent_channels,
                               latent_size=shapes.latent_size, conditioning=d.conditioning)
        step = _Step(parts, text, dtype)
        params = [p for p in step.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        shape = (micro, shapes.latent_channels, shapes.latent_size, shapes.latent_size)
        batch = {"latents": torch.randn(shape), "noise": torch.randn(shape),
                 "timesteps": torch.randint(0, d.num_train_timesteps, (micro,))}
        length = d.max_caption_length
        if d.conditioning == "class":
            batch["labels"] = torch.randint(0, shapes.num_classes, (micro,))
        elif shapes.text_trainable:
            batch["input_ids"] = torch.randint(0, r.tokenizer.vocab_size, (micro, length))
            batch["mask"] = torch.ones(micro, length, dtype=torch.long)
        elif d.conditioning == "text":
            batch["embeds"] = torch.randn(micro, length, shapes.text_dim, dtype=dtype or torch.float32)
            batch["mask"] = torch.ones(micro, length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            measured = tracked_step(step, batch, optimizer, fake=fake)
    except ValueError as e:
        raise UserError(f"plan: the {r.model.arch} step could not run on fake tensors ({e})") from None
    n = sum(p.numel() for p in params)
    return {"params": sum(p.numel() for p in model.parameters()), "trained": n,
            "text_params": sum(p.numel() for p in text.parameters()) if text is not None else 0,
            "weights": measured.weights, "grads": measured.grads, "optimizer": measured.optimizer,
            "forward_backward": measured.weights + measured.activations, "peak": measured.peak,
            "flops": counter.get_total_flops()}


def _frozen(shapes: DiffusionShapes, micro: int, precision: str) -> tuple[list[Item], int, int, float]:
    """Items of the frozen parts, the VAE's encoding peak above its weights, their parameters, and the FLOPs per
    micro-batch of encoding (VAE and frozen text encoder)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    d = shapes.recipe.diffusion
    dtype = _act_dtype(precision) or torch.float32
    size = torch.tensor([], dtype=dtype).element_size()
    items, encode_peak, params, flops = [], 0, 0, 0.0
    if shapes.vae:
        from diffusers import AutoencoderKL

        fake, default = FakeTensorMode(), torch.get_default_dtype()
        try:
            # Built in the runner's dtype (a fake module's .to() cannot swap its parameters).
            torch.set_default_dtype(dtype)
            with fake:
                vae = AutoencoderKL(**{k: v for k, v in shapes.vae.items() if not k.startswith("_")})
                px = torch.randn(micro, shapes.channels, shapes.resolution, shapes.resolution, dtype=dtype)
        finally:
            torch.set_default_dtype(default)
        n = sum(p.numel() for p in vae.parameters())
        params += n
        items.append(Item("VAE (frozen)", n * size, f"{n:,} parameters in {str(dtype).removeprefix('torch.')}"))
        if not d.cache_latents:
            counter = FlopCounterMode(display=False)
            with counter:
                encode_peak = _peak_of(lambda: vae.encode(px).latent_dist.mode(), fake)
            flops += counter.get_total_flops()
    if shapes.text is not None:
        with torch.device("meta"):
            encoder = frozen_text_encoder(shapes.text)
        n = sum(p.numel() for p in encoder.parameters())
        params += n
        items.append(Item("text encoder (frozen)", n * size, f"{n:,} parameters in {str(dtype).removeprefix('torch.')}"))
        if not d.cache_latents:
            flops += 2 * n * micro * d.max_caption_length  # a forward: 2 FLOPs per weight and token
    return items, encode_peak, params, flops


def plan_diffusion(loaded: LoadedRecipe, gpu: GPU, shapes: DiffusionShapes | None = None, images: int | None = -1) -> Plan:
    r = loaded.recipe
    t, d = r.train, r.diffusion
    shapes = shapes or DiffusionShapes(loaded)
    m = measure_diffusion_step(shapes, t.micro_batch_size, t.gradient_checkpointing, t.precision)
    frozen, encode_peak, frozen_params, encode_flops = _frozen(shapes, t.micro_batch_size, t.precision)
    n = m["trained"]
    opt, opt_note = optimizer_bytes(t.optimizer, n, 4)
    items = [Item("weights", m["weights"], f"{m['params']:,} parameters in fp32 (mixed precision keeps fp32 masters)"
                  + (f", plus the text encoder's {m['text_params']:,} trained with it" if m["text_params"] else "")),
             *frozen,
             Item("gradients", m["grads"], "fp32"),
             Item("optimizer states", opt, opt_note)]
    ema = 4 * n if d.ema else 0
    if ema:
        items.append(Item("EMA weights", ema, "an fp32 copy of every trained parameter"))
    frozen_bytes = sum(i.bytes for i in frozen)
    # Forward and backward (measured without optimizer states: the first step's), then the optimizer step (its
    # measured peak holds torch AdamW's fp32 states: swapped for the recipe's optimizer's).
    backward = m["forward_backward"] + opt
    optimizer_step = m["peak"] - m["optimizer"] + opt
    encoding = m["weights"] + opt + encode_peak  # gradients are freed (set to None) before the next batch
    activations = m["forward_backward"] - m["weights"]
    how = "checkpointed" if t.gradient_checkpointing else "saved for backward"
    items.append(Item("activations", activations, f"{how}, with the gradients built in backward; micro-batch "
                      f"{t.micro_batch_size} x {shapes.latent_channels}x{shapes.latent_size}x{shapes.latent_size}"
                      f"{' latents' if shapes.vae else ' pixels'} (measured on fake tensors)"))
    if encode_peak:
        items.append(Item("VAE encoding", encode_peak, f"encoding {t.micro_batch_size} images of "
                          f"{shapes.resolution}px (before the step; diffusion.cache_latents removes it)"))
    step_peak = max(backward, optimizer_step, encoding) + frozen_bytes + ema
    slack = int(ALLOCATOR_OVERHEAD * step_peak)
    items.append(Item("CUDA context + allocator", CUDA_CONTEXT + slack,
                      f"{CUDA_CONTEXT / GiB:.1f} GiB context, {ALLOCATOR_OVERHEAD:.0%} caching-allocator slack"))
    if images == -1:
        images = image_count(loaded)
    per_image = (m["flops"] + encode_flops) / t.micro_batch_size
    images_per_step = t.micro_batch_size * t.grad_accum
    steps = t.max_steps or (math.ceil(t.epochs * images / images_per_step) if images else None)
    seconds = steps * images_per_step * per_image / (gpu.bf16_tflops * 1e12 * MFU_DIFFUSION) if steps else None
    settings = {k: getattr(t, k) for k in ("micro_batch_size", "grad_accum", "gradient_checkpointing", "optimizer")}
    settings["max_length"] = shapes.resolution
    notes = []
    if t.optimizer in OPTIMIZERS_8BIT:
        notes.append("8-bit AdamW states counted from bitsandbytes' layout (the fake step runs torch's AdamW)")
    return Plan(items, gpu, m["params"] + m["text_params"] + frozen_params, n, settings, per_image, images_per_step,
                steps, seconds, MFU_DIFFUSION, step_peak=step_peak, peak=step_peak + CUDA_CONTEXT + slack, notes=notes)


def fit_diffusion(loaded: LoadedRecipe, gpu: GPU) -> tuple[list[str], Plan]:
    """fitting.fit_search for a diffusion recipe (its frozen parts' configs and image count read once); the 8-bit
    optimizer it tries is bitsandbytes' adamw_8bit (paging would only move states the card still has room for)."""
    shapes, images = DiffusionShapes(loaded), image_count(loaded)
    return fit_search(loaded.recipe, lambda r: plan_diffusion(replace(loaded, recipe=r), gpu, shapes, images),
                      optimizer_8bit="adamw_8bit")


def format_diffusion_plan(loaded: LoadedRecipe, plan: Plan) -> str:
    r = loaded.recipe
    s = plan.settings
    lines = [
        f"plan: {loaded.name} on {plan.gpu.name} ({plan.gpu.memory_gib:.0f} GiB)",
        f"  {plan.params:,} parameters, {plan.trainable:,} trained ({r.model.arch} from scratch, "
        f"{'unconditional' if r.diffusion.conditioning == 'none' else r.diffusion.conditioning + '-conditional'}); micro-batch {s['micro_batch_size']} x {s['max_length']}px images, "
        f"accumulation {s['grad_accum']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {s['optimizer']}",
    ]
    lines += item_lines(plan, "the largest of backward, the optimizer step and the VAE's encoding, with what stays: "
                              "the items are not all alive at once")
    lines += [f"  note: {n}" for n in plan.notes]
    rate = (f"{plan.flops_per_token:.3g} FLOPs per image (measured) at {plan.mfu:.0%} MFU (assumed) of "
            f"{plan.gpu.bf16_tflops} TFLOPS bf16")
    if plan.seconds:
        lines.append(f"  time: {plan.steps:,} steps x {plan.tokens_per_step:,} images, {rate}: {rough_duration(plan.seconds)}")
    else:
        per_step = plan.tokens_per_step * plan.flops_per_token / (plan.gpu.bf16_tflops * 1e12 * plan.mfu)
        lines.append(f"  time: {per_step:.2f} s per step of {plan.tokens_per_step:,} images, {rate} (dataset size unknown)")
    return "\n".join(lines)


class DiffusionPlanner:
    """The planner of task diffusion (hf_vram/tasks.py): a plan is a measurement of one step on fake tensors."""

    def plan(self, loaded: LoadedRecipe, gpu: GPU) -> Plan:
        return plan_diffusion(loaded, gpu)

    def fit(self, loaded: LoadedRecipe, gpu: GPU) -> tuple[list[str], Plan]:
        return fit_diffusion(loaded, gpu)

    def format(self, loaded: LoadedRecipe, plan: Plan) -> str:
        return format_diffusion_plan(loaded, plan)

    def fix_hint(self, recipe) -> str:
        return "lower data.images.resolution, use a VAE's latents (diffusion.vae) or a smaller model"

    def longest(self, loaded: LoadedRecipe, gpu: GPU) -> str:
        return "--longest: a diffusion recipe has no sequence length (its size is data.images.resolution)"

    def measure(self, loaded: LoadedRecipe) -> str:
        return "--measure: a diffusion plan is already a measurement (of one step on fake tensors at full size)"

    def table_row(self, loaded: LoadedRecipe, gpu: GPU, plan: Plan | None = None) -> dict:
        from hf_vram.vram.report import fit_cell

        plan = plan or self.plan(loaded, gpu)  # the caller's, when it planned already
        return {"kind": f"diffusion {loaded.recipe.model.arch}", **fit_cell(plan, lambda: self.fit(loaded, gpu)),
                "longest_context": "-"}
