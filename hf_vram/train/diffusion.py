"""The diffusion runner (task diffusion): images -> a diffusers model trained to denoise -> a saved pipeline.

diffusers has no trainer; this is an Accelerate loop of the shape of diffusers'
examples/unconditional_image_generation/train_unconditional.py: DDPMScheduler noise, MSE on the noise (or v), optional
min-SNR weighting, EMA weights, classifier-free guidance by dropping labels, and sample grids on the way.

The output directory holds the pipeline (`save_pretrained`: model_index.json and one folder per component, EMA weights
when diffusion.ema), `recipe.yaml`, a model card, samples/step-XXXXXX.png, memory.jsonl (one line per optimizer step),
TensorBoard logs under logs/, and `train_summary.json`, written last: its presence means the run finished.
Checkpoints (`accelerator.save_state`) are written to a hidden temporary folder, flushed, marked complete and then
renamed to checkpoint-N; re-running on the same output directory resumes from the last complete one.
With diffusion.cache_latents the VAE's latents (and a frozen text encoder's caption embeddings) are computed once
into OUTPUT_DIR/prepared/latents/ (data_prep/latent_cache.py) and the steps read them instead of encoding.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_vram.atomic import atomic_write_json, atomic_write_text, fsync_tree
from hf_vram.recipe.load import LoadedRecipe
from hf_vram.train.checkpoints import COMPLETE_MARKER, checkpoints, discard_incomplete, latest_complete
from hf_vram.train.memory import memory_now

SUMMARY = "train_summary.json"


def _log(text: str) -> None:
    print(f"[hf-vram] {text}", flush=True)


def mixed_precision(precision: str) -> str:
    """train.precision -> Accelerate's mixed_precision, by the language models' rule (hf_vram/device.py)."""
    from hf_vram.device import mixed_precision as chosen

    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[chosen(precision)]


def _optimizer(recipe, params):
    t = recipe.train
    kw = dict(lr=t.lr, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay)
    if t.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[t.optimizer]
        return cls(params, **kw)
    return torch.optim.AdamW(params, fused=t.optimizer == "adamw_torch_fused", **kw)


def _lr_scheduler(recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    t = recipe.train
    warmup = int(t.warmup * total_steps) if t.warmup < 1 else int(t.warmup)
    name = t.lr_scheduler
    extra = {}
    if name == "cosine_with_min_lr":
        extra["scheduler_specific_kwargs"] = {"min_lr": t.min_lr}
    elif name == "two_stage":
        raise_user("train.lr_scheduler: two_stage is BitNet's schedule, for language models only")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, **extra)


def raise_user(msg: str):
    from hf_vram.errors import UserError

    raise UserError(msg)


def _save_checkpoint(accelerator, out: Path, step: int, keep: int) -> None:
    """save_state into a temporary folder, flush it, mark it complete, rename it to checkpoint-N, then rotate."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)
        atomic_write_json(tmp / COMPLETE_MARKER, {"step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        complete = [p for _, p, ok in checkpoints(out) if ok]
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _conditions(batch, parts, cond_dropout: float, device=None):
    """Class labels with a fraction replaced by the null class, or caption embeddings (and mask) with a fraction of
    the captions replaced by the empty one (classifier-free guidance training)."""
    if parts.conditioning == "text":
        from hf_vram.builders.diffusion import encode_text

        captions = list(batch["caption"])
        if cond_dropout > 0:
            drop = torch.rand(len(captions)) < cond_dropout
            captions = ["" if dropped else c for c, dropped in zip(captions, drop.tolist())]
        if parts.text_trainable:
            return encode_text(parts, captions, device)
        with torch.no_grad():
            return encode_text(parts, captions, device)
    if parts.conditioning != "class":
        return None
    labels = batch["label"].long()
    if cond_dropout > 0:
        drop = torch.rand(labels.shape[0], device=labels.device) < cond_dropout
        labels = torch.where(drop, torch.full_like(labels, parts.null_class), labels)
    return labels


def diffusion_loss(parts, model, latents, labels, snr_gamma: float | None):
    """Noise the batch at random timesteps and return the (min-SNR weighted) MSE of the model's prediction."""
    from diffusers.training_utils import compute_snr

    sched = parts.noise_scheduler
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    from hf_vram.builders.diffusion import forward

    pred = forward(parts, model, noisy, timesteps, labels)
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(sched, timesteps)
    weight = torch.clamp(snr, max=snr_gamma)
    weight = weight / (snr + 1) if sched.config.prediction_type == "v_prediction" else weight / snr
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weight).mean()


def _trained_parameters(parts, model, accelerator) -> list:
    """The parameters the optimizer and the EMA follow: the model's, and a text encoder's trained with it."""
    params = list(accelerator.unwrap_model(model).parameters())
    if parts.text_trainable:
        params += list(parts.text_encoder.parameters())
    return params


def _sample_prompts(recipe, data) -> list[str]:
    from data_prep.images import sample_captions

    d = recipe.diffusion
    prompts = list(d.sample_prompts) or sample_captions(data, d.num_samples)
    return [prompts[i % len(prompts)] for i in range(d.num_samples)]


def _sample_grid(parts, model, recipe, data, path: Path, accelerator, ema=None) -> Path:
    from data_prep.images import sample_classes, save_grid
    from hf_vram.builders.diffusion import generate, make_pipeline

    d = recipe.diffusion
    unwrapped = accelerator.unwrap_model(model)
    params = _trained_parameters(parts, unwrapped, accelerator)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    modules = [unwrapped] + ([parts.text_encoder] if parts.text_trainable else [])
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        pipe = make_pipeline(parts, unwrapped)
        pipe.set_progress_bar_config(disable=True)
        labels = sample_classes(data, d.num_samples) if parts.conditioning == "class" else None
        prompts = _sample_prompts(recipe, data) if parts.conditioning == "text" else None
        with _frozen_in_fp32(parts):
            images = generate(pipe, parts, d.num_samples, d.inference_steps, d.guidance_scale, recipe.train.seed,
                              labels, prompts)
    finally:
        if ema is not None:
            ema.restore(params)
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return save_grid(images, path)


def _encode(parts, pixel_values):
    if parts.vae is None:
        return pixel_values
    with torch.no_grad():
        latents = parts.vae.encode(pixel_values.to(parts.vae.dtype)).latent_dist.mode()
    return latents * parts.vae.config.scaling_factor


def _cached_conditions(batch, parts, cache, cond_dropout: float, device):
    """_conditions for a batch of the latent cache: caption embeddings are looked up, and a dropped caption is the
    cached empty one (row 0), as encoding "" would give."""
    if not (cache.embeds is not None and parts.conditioning == "text"):
        return _conditions(batch, parts, cond_dropout, device)
    rows = batch["caption_index"].cpu()
    if cond_dropout > 0:
        rows = torch.where(torch.rand(rows.shape[0]) < cond_dropout, torch.zeros_like(rows), rows)
    return cache.text(rows, device)


def _frozen_modules(parts) -> list:
    return [m for m in (parts.vae, None if parts.text_trainable else parts.text_encoder) if m is not None]


def _cast(module, dtype) -> None:
    # Only when it changes something: diffusers warns on every dtype cast of a model.
    if module.dtype != dtype:
        module.to(dtype)


class _frozen_in_fp32:
    """The frozen VAE and text encoder in float32 for the duration (sampling: the stock pipelines feed the VAE
    the model's float32 latents, and take the text encoder's dtype for the latents), then back."""

    def __init__(self, parts):
        self.modules = _frozen_modules(parts)
        self.dtypes = [m.dtype for m in self.modules]

    def __enter__(self):
        for m in self.modules:
            _cast(m, torch.float32)

    def __exit__(self, *exc):
        for m, dtype in zip(self.modules, self.dtypes):
            _cast(m, dtype)


def model_card(loaded: LoadedRecipe, summary: dict) -> str:
    """README.md: Hub metadata (library diffusers, pipeline tag, tags) and how the pipeline was trained and is used."""
    import yaml

    r = loaded.recipe
    d = r.diffusion
    tag = "text-to-image" if d.conditioning == "text" else "unconditional-image-generation"
    meta = {"library_name": "diffusers", "pipeline_tag": tag, "tags": ["hf-vram", loaded.name, "diffusers", r.model.arch]}
    if r.hub.repo_id:
        meta["model-index"] = [{"name": r.hub.repo_id}]
    where = r.hub.repo_id or str(loaded.output_dir)
    if d.conditioning == "class":
        call = f"pipe(class_labels=[0, 1, 2, 3], num_inference_steps={d.inference_steps}, guidance_scale={d.guidance_scale}).images"
    elif d.conditioning == "text":
        prompt = (d.sample_prompts or ["a photo"])[0]
        extra = ", use_resolution_binning=False" if r.model.arch == "pixart" else ""
        call = (f"pipe({prompt!r}, num_inference_steps={d.inference_steps}, guidance_scale={d.guidance_scale}"
                f"{extra}).images")
    else:
        call = f"pipe(batch_size=4, num_inference_steps={d.inference_steps}).images"
    rows = [
        ("recipe", f"`{loaded.name}` (task diffusion)"),
        ("model", f"`{r.model.arch}` from scratch, {summary.get('total_params', 0):,} parameters, {d.conditioning} conditioning"),
        ("data", f"`{r.data.source}` ({summary.get('images')} images at {r.data.images.resolution if r.data.images else '?'} px)"),
        ("space", f"latents of `{d.vae}`" if d.vae else "pixel space"),
        ("noise", f"{d.beta_schedule} schedule, {d.num_train_timesteps} steps, {d.prediction_type} prediction"
                  + (f", min-SNR gamma {d.snr_gamma}" if d.snr_gamma else "")),
        ("optimizer steps", summary.get("global_step")),
        ("loss", f"{summary.get('first_loss', 0):.4f} -> {summary.get('final_loss', 0):.4f}"),
        ("EMA", f"decay {d.ema_decay} (saved weights)" if d.ema else "off"),
        ("sampler", f"{d.sampler}, {d.inference_steps} steps"),
    ]
    if "images_per_second" in summary:
        rows.append(("throughput", f"{summary['images_per_second']} images/s"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    from hf_vram.builders.diffusion import CUSTOM_PIPELINE_MODULE, is_custom_pipeline, pipeline_name

    name = pipeline_name(r.model.arch, d.conditioning, bool(d.vae))
    trust, custom = "", ""
    if is_custom_pipeline(name):
        trust = ", trust_remote_code=True"
        custom = (f"`{name}` is not one of diffusers' pipelines: its code is `{CUSTOM_PIPELINE_MODULE}.py` in this "
                  "repository (torch and diffusers only), which `trust_remote_code=True` lets diffusers import.\n\n")
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        f"# {loaded.name}\n\n{r.description}\n\nTrained with hf-vram from the recipe `{loaded.name}` (the resolved recipe is `recipe.yaml`).\n\n"
        "## Usage\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
        f"model_id = {json.dumps(where)}\npipe = DiffusionPipeline.from_pretrained(model_id{trust})\n"
        f"images = {call}\n```\n\n{custom}"
        f"## Training\n\n| | |\n|---|---|\n{table}\n"
    )


def train_diffusion(loaded: LoadedRecipe) -> dict:
    """Train (or resume) a task diffusion recipe to the end; returns the summary written to the output directory."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from data_prep.images import collate, load_images
    from data_prep.latent_cache import build_latent_cache, cache_root, collate_latents
    from hf_vram.builders.diffusion import build, save_pipeline

    recipe, out = loaded.recipe, loaded.output_dir
    d, t, images_cfg = recipe.diffusion, recipe.train, recipe.data.images
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=mixed_precision(t.precision),
        cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        log_with="tensorboard" if "tensorboard" in t.report_to else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    main = accelerator.is_main_process
    set_seed(t.seed)

    data = load_images(recipe.data.source, recipe.data.split, images_cfg, recipe.data.max_samples)
    num_classes = d.num_classes or data.num_classes
    if d.conditioning == "class" and not num_classes:
        raise_user("diffusion.conditioning: class needs labels: set data.images.label_field (or use builtin:digits)")
    sample_px = data.dataset[0]["pixel_values"]
    captions = ()
    if d.conditioning == "text":
        if not data.has_captions:
            raise_user("diffusion.conditioning: text needs captions: set data.images.caption_field "
                       "(or use builtin:digits / builtin:shapes)")
        if not d.text_encoder:  # the scratch tokenizer is trained on the captions
            captions = [data.dataset.caption(i) for i in range(len(data))]
    parts = build(recipe, channels=sample_px.shape[0], resolution=sample_px.shape[-1], num_classes=num_classes,
                  class_names=data.class_names or [], captions=captions)
    model = parts.model
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if parts.text_trainable:
        parts.text_encoder.train()
    ema = None
    if d.ema:
        from diffusers.training_utils import EMAModel

        ema_params = list(model.parameters()) + (list(parts.text_encoder.parameters()) if parts.text_trainable else [])
        ema = EMAModel(ema_params, decay=d.ema_decay, model_cls=type(model), model_config=model.config)

    # As diffusers' training examples: frozen parts in the weight dtype of bf16 mixed precision (half their memory,
    # and what autocast would compute in anyway). Not in fp16: the SD VAE overflows in fp16.
    frozen_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    for m in _frozen_modules(parts):
        m.to(accelerator.device)
        _cast(m, frozen_dtype)

    cache = None
    train_set, collate_fn = data.dataset, collate
    if d.cache_latents:
        # The main process encodes; the others wait, then read what it wrote.
        with accelerator.main_process_first():
            cache = build_latent_cache(recipe, data, parts, accelerator.device, cache_root(out), show=_log)
        if main:
            _log(f"latent cache {'reused' if cache.reused else 'built'}: {cache.describe()}")
        train_set, collate_fn = cache.dataset, collate_latents
    loader = torch.utils.data.DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True,
                                         collate_fn=collate_fn, drop_last=len(data) >= t.micro_batch_size,
                                         num_workers=0)
    updates_per_epoch = max(1, math.ceil(len(loader) / t.grad_accum))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * updates_per_epoch))
    trained = list(model.parameters()) + (list(parts.text_encoder.parameters()) if parts.text_trainable else [])
    optimizer = _optimizer(recipe, trained)
    lr_scheduler = _lr_scheduler(recipe, optimizer, total_steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if parts.text_trainable:
        # Prepared (device, precision, DDP) and saved in the checkpoints with the model.
        parts.text_encoder = accelerator.prepare(parts.text_encoder)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if t.torch_compile:
        model = torch.compile(model)

    step, resumed_from = 0, None
    if main:
        discard_incomplete(out)
        atomic_write_text(out / "recipe.yaml", loaded.resolved_yaml())
    accelerator.wait_for_everyone()
    resume = latest_complete(out)
    if resume is not None:
        accelerator.load_state(str(resume))
        step = json.loads((resume / COMPLETE_MARKER).read_text())["step"]
        resumed_from = str(resume)
    history_file = out / "loss_history.jsonl"
    losses: list[float] = []
    if history_file.is_file():  # the losses of the steps before the resumed checkpoint
        losses = [json.loads(line)["loss"] for line in history_file.read_text().splitlines() if line.strip()]
        losses = losses[:step]
    if main:
        atomic_write_text(history_file, "".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                 for i, v in enumerate(losses)))
    if accelerator.log_with and main:
        accelerator.init_trackers(loaded.name.replace("/", "_"))
    n_params = sum(p.numel() for p in model.parameters())
    cond_text = "unconditional" if d.conditioning == "none" else f"{d.conditioning}-conditional"
    if main:
        _log(f"{loaded.name}: {cond_text} {recipe.model.arch} of {n_params:,} parameters, "
             f"{len(data)} images at {sample_px.shape[-1]}px ({'latent ' + str(parts.latent_size) + 'px' if parts.vae else 'pixel space'}), "
             f"{total_steps} steps on {accelerator.device} ({accelerator.mixed_precision})"
             + (f", resuming from {resume}" if resume else ""))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    samples_dir = out / "samples"
    samples_dir.mkdir(exist_ok=True)
    batches_done = step * t.grad_accum
    epoch = batches_done // len(loader)
    skip = batches_done % len(loader)
    start, images_seen, running = time.time(), 0, []
    first_images_time = None
    while step < total_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                if cache is not None:
                    latents = batch["latents"].float()
                    labels = _cached_conditions(batch, parts, cache, d.cond_dropout, accelerator.device)
                else:
                    latents = _encode(parts, batch["pixel_values"]).float()
                    labels = _conditions(batch, parts, d.cond_dropout, accelerator.device)
                loss = diffusion_loss(parts, model, latents, labels, d.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(_trained_parameters(parts, model, accelerator), t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running.append(loss.detach().float().item())
            images_seen += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(_trained_parameters(parts, model, accelerator))
            step += 1
            step_loss = sum(running) / len(running)
            running = []
            losses.append(step_loss)
            if step == 1:
                first_images_time = (time.time(), images_seen)
            if main:
                with open(history_file, "a") as f:
                    f.write(json.dumps({"step": step, "loss": step_loss}) + "\n")
                with open(out / "memory.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **memory_now()}) + "\n")
                if step % t.logging_steps == 0 or step == total_steps:
                    _log(f"step {step}/{total_steps} loss {step_loss:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
            if accelerator.log_with:
                accelerator.log({"train/loss": step_loss, "train/lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if d.sample_every and step % d.sample_every == 0 and step < total_steps and main:
                _sample_grid(parts, model, recipe, data, samples_dir / f"step-{step:06d}.png", accelerator, ema)
            if step % t.save_steps == 0 and step < total_steps:
                _save_checkpoint(accelerator, out, step, t.save_total_limit)
            if step >= total_steps:
                break
        epoch += 1
    train_seconds = time.time() - start
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.end_training()
    summary = {
        "recipe": loaded.name, "task": "diffusion", "arch": recipe.model.arch, "conditioning": d.conditioning,
        "total_params": n_params, "images": len(data), "global_step": step,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "world_size": accelerator.num_processes, "train_seconds": round(train_seconds, 2),
        "resumed_from": resumed_from, "mixed_precision": accelerator.mixed_precision,
    }
    if first_images_time is not None and images_seen > first_images_time[1]:
        # Throughput after the first step (which includes one-time setup).
        summary["images_per_second"] = round((images_seen - first_images_time[1]) / (time.time() - first_images_time[0]), 2)
    if torch.cuda.is_available():
        summary["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        summary["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        import resource

        summary["cpu_process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not main:
        return summary
    unwrapped = accelerator.unwrap_model(model)
    if parts.text_trainable:
        parts.text_encoder = accelerator.unwrap_model(parts.text_encoder)
    if ema is not None:
        ema.copy_to(_trained_parameters(parts, unwrapped, accelerator))  # the saved pipeline holds the EMA weights
    unwrapped.eval()
    if parts.text_encoder is not None:
        parts.text_encoder.eval()
    for m in _frozen_modules(parts):  # saved as loaded, not in the training-time dtype
        _cast(m, torch.float32)
    grid = _sample_grid(parts, unwrapped, recipe, data, samples_dir / f"step-{step:06d}.png", accelerator)
    summary["samples"] = str(grid)
    summary["ema"] = ema is not None
    save_pipeline(parts, unwrapped, out)
    atomic_write_text(out / "README.md", model_card(loaded, summary))
    atomic_write_json(out / SUMMARY, summary)
    _log(f"saved {out} (loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, samples {grid})")
    if recipe.hub.repo_id:
        from hf_vram.errors import UserError
        from hf_vram.hub import push_output

        try:
            _log(f"pushed to {push_output(out, recipe.hub.repo_id, recipe.hub.private)}")
        except UserError as e:
            raise UserError(f"{e}\nThe trained output is saved in {out}; push it later with `hf-vram push {out}`") from None
    return summary
