"""The diffusion runner (task diffusion): images -> a diffusers model trained to denoise -> a saved pipeline.

diffusers has no trainer; this is an Accelerate loop of the shape of diffusers'
examples/unconditional_image_generation/train_unconditional.py: DDPMScheduler noise, MSE on the noise (or v), optional
min-SNR weighting, EMA weights, classifier-free guidance by dropping labels, and sample grids on the way. The step's
pieces are hf_vram/train/denoising.py; the output layer (checkpoints, memory log, loss history, non-finite-loss stop,
card, summary, push) is the one every runner uses (hf_vram/output/).

The output directory holds the pipeline (`save_pretrained`: model_index.json and one folder per component, EMA weights
when diffusion.ema), `recipe.yaml`, a model card, samples/step-XXXXXX.png, memory.jsonl (one line per optimizer step),
loss_history.jsonl, TensorBoard logs under logs/, and `train_summary.json`, written last: its presence means the run
finished. Checkpoints (`accelerator.save_state`) are written to a hidden temporary folder, flushed, marked complete and
then renamed to checkpoint-N; re-running on the same output directory resumes from the last complete one.
With diffusion.cache_latents the VAE's latents (and a frozen text encoder's caption embeddings) are computed once
into OUTPUT_DIR/prepared/latents/ (data_prep/latent_cache.py) and the steps read them instead of encoding.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch

from data_prep.atomic import atomic_write_text
from hf_vram.errors import TrainingStopped, UserError
from hf_vram.output.checkpoints import completed_step, discard_incomplete, latest_complete, mark_complete, rotate
from hf_vram.output.finite import FiniteLossWatch
from hf_vram.output.loss_history import LossHistory
from hf_vram.output.loss_plot import curves_from_steps, write_loss_png
from hf_vram.output.memory import log_memory
from hf_vram.output.publish import log
from hf_vram.output.stop import clear_stop, stop_requested, stopped_message
from hf_vram.output.summary import peak_memory, reset_peak_memory
from hf_vram.runners.base import Runner
from hf_vram.train.denoising import (
    cached_conditions,
    cast,
    conditions,
    diffusion_loss,
    encode_images,
    frozen_modules,
    sample_grid,
    trained_parameters,
)


def save_state_checkpoint(accelerator, out: Path, step: int, keep: int) -> None:
    """save_state into a temporary folder, then (main process) flush it, mark it complete, rename it to checkpoint-N
    and rotate: a kill at any moment leaves the previous complete checkpoint."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mark_complete(tmp, step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        rotate(out, keep)
    accelerator.wait_for_everyone()


class DiffusionRunner(Runner):
    accelerator = data = parts = model = ema = cache = loader = optimizer = lr_scheduler = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- setup --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from hf_vram.builders.training_args import optimization_args

        self.out.mkdir(parents=True, exist_ok=True)
        # Before the Accelerator, as the Trainer has it: building training arguments resets Accelerate's state.
        self.args = optimization_args(self.recipe, str(self.out))
        self.accelerator = _accelerator(self.recipe, self.out)
        set_seed(self.recipe.train.seed)
        self._build_parts()
        self._loader()
        self._optimizer()
        self._resume()

    def _build_parts(self) -> None:
        """The images, then the model, schedulers, VAE and text encoder that fit them; the EMA of the trained weights."""
        from data_prep.images import load_images
        from hf_vram.builders.diffusion import build

        recipe, d = self.recipe, self.recipe.diffusion
        self.data = data = load_images(recipe.data.source, recipe.data.split, recipe.data.images, recipe.data.max_samples)
        num_classes = d.num_classes or data.num_classes
        if d.conditioning == "class" and not num_classes:
            raise UserError("diffusion.conditioning: class needs labels: set data.images.label_field (or use builtin:digits)")
        if d.conditioning == "text" and not data.has_captions:
            raise UserError("diffusion.conditioning: text needs captions: set data.images.caption_field "
                            "(or use builtin:digits / builtin:shapes)")
        # A text encoder trained from scratch has its tokenizer trained on the captions.
        captions = [data.dataset.caption(i) for i in range(len(data))] if d.conditioning == "text" and not d.text_encoder else ()
        sample_px = data.dataset[0]["pixel_values"]
        self.parts = parts = build(recipe, channels=sample_px.shape[0], resolution=sample_px.shape[-1],
                                   num_classes=num_classes, class_names=data.class_names or [], captions=captions)
        self.resolution = sample_px.shape[-1]
        self.model = parts.model
        if recipe.train.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        if parts.text_trainable:
            parts.text_encoder.train()
        if d.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(trained_parameters(parts, self.model), decay=d.ema_decay, model_cls=type(self.model),
                                model_config=self.model.config)
        # As diffusers' training examples: frozen parts in the weight dtype of bf16 mixed precision (half their memory,
        # and what autocast would compute in anyway). Not in fp16: the SD VAE overflows in fp16.
        frozen_dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32
        for m in frozen_modules(parts):
            m.to(self.accelerator.device)
            cast(m, frozen_dtype)

    def _loader(self) -> None:
        """The images (or their cached latents, encoded once by the main process while the others wait)."""
        from data_prep.images import collate
        from data_prep.latent_cache import build_latent_cache, cache_root, collate_latents

        t, accelerator = self.recipe.train, self.accelerator
        train_set, collate_fn = self.data.dataset, collate
        if self.recipe.diffusion.cache_latents:
            with accelerator.main_process_first():
                self.cache = build_latent_cache(self.recipe, self.data, self.parts, accelerator.device,
                                                cache_root(self.out), show=log)
            if self.is_main:
                log(f"latent cache {'reused' if self.cache.reused else 'built'}: {self.cache.describe()}")
            train_set, collate_fn = self.cache.dataset, collate_latents
        self.loader = torch.utils.data.DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True,
                                                  collate_fn=collate_fn, drop_last=len(self.data) >= t.micro_batch_size,
                                                  num_workers=0)
        updates_per_epoch = max(1, math.ceil(len(self.loader) / t.grad_accum))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * updates_per_epoch))

    def _optimizer(self) -> None:
        """Optimizer and schedule from the same training arguments (and the same library functions) as the Trainer's,
        then everything handed to Accelerate."""
        from transformers import Trainer, get_scheduler

        args = self.args
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        # Weight decay on every trained weight, as diffusers' training examples do.
        self.optimizer = cls(trained_parameters(self.parts, self.model), weight_decay=args.weight_decay, **kwargs)
        self.lr_scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                          num_warmup_steps=args.get_warmup_steps(self.total_steps),
                                          num_training_steps=self.total_steps,
                                          scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        accelerator, parts = self.accelerator, self.parts
        self.model, self.optimizer, self.loader, self.lr_scheduler = accelerator.prepare(
            self.model, self.optimizer, self.loader, self.lr_scheduler)
        if parts.text_trainable:
            # Prepared (device, precision, DDP) and saved in the checkpoints with the model.
            parts.text_encoder = accelerator.prepare(parts.text_encoder)
        if self.ema is not None:
            self.ema.to(accelerator.device)
            accelerator.register_for_checkpointing(self.ema)
        if self.recipe.train.torch_compile:
            self.model = torch.compile(self.model)

    def _resume(self) -> None:
        accelerator = self.accelerator
        if self.is_main:
            discard_incomplete(self.out)
            clear_stop(self.out)
            atomic_write_text(self.out / "recipe.yaml", self.loaded.resolved_yaml())
        accelerator.wait_for_everyone()
        self.resume = latest_complete(self.out)
        self.step = 0
        if self.resume is not None:
            accelerator.load_state(str(self.resume))
            self.step = completed_step(self.resume)
        self.history = LossHistory(self.out, self.step, self.is_main)
        self.watch = FiniteLossWatch(str(self.out))
        if accelerator.log_with and self.is_main:
            accelerator.init_trackers(self.loaded.name.replace("/", "_"))

    # --- train --------------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps to the end (resumed from the checkpoint's step, the data loader skipping what it had
        served), a sample grid every diffusion.sample_every steps, a checkpoint every train.save_steps."""
        t, accelerator, loader = self.recipe.train, self.accelerator, self.loader
        self._announce()
        reset_peak_memory()
        (self.out / "samples").mkdir(exist_ok=True)
        batches_done = self.step * t.grad_accum
        epoch, skip = batches_done // len(loader), batches_done % len(loader)
        start, self.images_seen, self.after_first = time.time(), 0, None
        while self.step < self.total_steps:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            self._epoch(accelerator.skip_first_batches(loader, skip) if skip else loader)
            skip, epoch = 0, epoch + 1
        self._flush()
        self._draw_losses()
        self.train_seconds = time.time() - start
        accelerator.wait_for_everyone()
        if accelerator.log_with:
            accelerator.end_training()

    def _epoch(self, batches) -> None:
        accelerator, running = self.accelerator, []
        for batch in batches:
            loss = self._micro_step(batch)
            running.append(loss.detach())
            self.images_seen += self._batch_size(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            self._optimizer_step_done(torch.stack(running).float().mean())
            running = []
            if self.step >= self.total_steps:
                break

    def _micro_step(self, batch) -> torch.Tensor:
        accelerator, parts, d = self.accelerator, self.parts, self.recipe.diffusion
        with accelerator.accumulate(self.model):
            if self.cache is not None:
                latents = batch["latents"].float()
                labels = cached_conditions(batch, parts, self.cache, d.cond_dropout, accelerator.device)
            else:
                latents = encode_images(parts, batch["pixel_values"]).float()
                labels = conditions(batch, parts, d.cond_dropout, accelerator.device)
            loss = diffusion_loss(parts, self.model, latents, labels, d.snr_gamma)
            self.watch.record(loss, self.step + 1)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.recipe.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self._trained(), self.recipe.train.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    @staticmethod
    def _batch_size(batch) -> int:
        return (batch["latents"] if "latents" in batch else batch["pixel_values"]).shape[0]

    def _trained(self) -> list:
        return trained_parameters(self.parts, self.accelerator.unwrap_model(self.model))

    def _optimizer_step_done(self, step_loss: torch.Tensor) -> None:
        t, d = self.recipe.train, self.recipe.diffusion
        if self.ema is not None:
            self.ema.step(self._trained())
        self.step += 1
        if self.step == 1:
            self.after_first = (time.time(), self.images_seen)
        self.history.add(self.step, step_loss, self.lr_scheduler.get_last_lr()[0])
        if self.is_main:
            log_memory(self.out, self.step)
        last = self.step == self.total_steps
        if self.step % t.logging_steps == 0 or last:
            self._flush()
        if d.sample_every and self.step % d.sample_every == 0 and not last and self.is_main:
            sample_grid(self.parts, self.accelerator.unwrap_model(self.model), self.recipe, self.data,
                        self._grid_path(), self.ema)
        if self.step % t.save_steps == 0 and not last:
            self._flush()  # never a checkpoint of weights a non-finite loss produced
            save_state_checkpoint(self.accelerator, self.out, self.step, t.save_total_limit)
            self._draw_losses()
        elif not last and stop_requested(self.out):  # OUTPUT_DIR/STOP: a checkpoint, then stop (resumable)
            self._flush()
            save_state_checkpoint(self.accelerator, self.out, self.step, t.save_total_limit)
            self._draw_losses()
            raise TrainingStopped(stopped_message(self.step))

    def _flush(self) -> None:
        """The pending losses read (one sync), checked, written, logged."""
        self.watch.check()
        for step, loss, lr in self.history.flush():
            if self.accelerator.log_with:
                self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
            if self.is_main and (step % self.recipe.train.logging_steps == 0 or step == self.total_steps):
                log(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e}")

    def _draw_losses(self) -> None:
        """OUTPUT_DIR/loss.png of the steps so far (main process)."""
        if self.is_main:
            write_loss_png(self.out, curves_from_steps(self.history.lines), f"{self.loaded.name} (task diffusion)")

    def _grid_path(self) -> Path:
        return self.out / "samples" / f"step-{self.step:06d}.png"

    def _announce(self) -> None:
        if not self.is_main:
            return
        r, parts = self.recipe, self.parts
        n_params = sum(p.numel() for p in self.model.parameters())
        cond = "unconditional" if r.diffusion.conditioning == "none" else f"{r.diffusion.conditioning}-conditional"
        space = f"latent {parts.latent_size}px" if parts.vae else "pixel space"
        log(f"{self.loaded.name}: {cond} {r.model.arch} of {n_params:,} parameters, {len(self.data)} images at "
            f"{self.resolution}px ({space}), {self.total_steps} steps on {self.accelerator.device} "
            f"({self.accelerator.mixed_precision})" + (f", resuming from {self.resume}" if self.resume else ""))

    # --- save ---------------------------------------------------------------------------------------------------

    def save_output(self) -> None:
        """The summary; then (main process) the pipeline with the EMA weights and the frozen parts in float32, and
        a last sample grid."""
        self.summary.update(self._run_summary())
        if not self.is_main:
            return
        accelerator, parts = self.accelerator, self.parts
        unwrapped = accelerator.unwrap_model(self.model)
        if parts.text_trainable:
            parts.text_encoder = accelerator.unwrap_model(parts.text_encoder)
        if self.ema is not None:
            self.ema.copy_to(trained_parameters(parts, unwrapped))  # the saved pipeline holds the EMA weights
        unwrapped.eval()
        if parts.text_encoder is not None:
            parts.text_encoder.eval()
        for m in frozen_modules(parts):  # saved as loaded, not in the training-time dtype
            cast(m, torch.float32)
        grid = sample_grid(parts, unwrapped, self.recipe, self.data, self._grid_path())
        self.summary.update(samples=str(grid), ema=self.ema is not None)
        from hf_vram.builders.diffusion import save_pipeline

        save_pipeline(parts, unwrapped, self.out)

    def _run_summary(self) -> dict:
        r, losses = self.recipe, self.history.values
        summary = {
            "arch": r.model.arch, "conditioning": r.diffusion.conditioning,
            "total_params": sum(p.numel() for p in self.model.parameters()), "images": len(self.data),
            "global_step": self.step, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "world_size": self.accelerator.num_processes,
            "train_seconds": round(self.train_seconds, 2), "resumed_from": str(self.resume) if self.resume else None,
            "mixed_precision": self.accelerator.mixed_precision,
        }
        if self.after_first is not None and self.images_seen > self.after_first[1]:
            # Throughput after the first step (which includes one-time setup).
            since, seen = self.after_first
            summary["images_per_second"] = round((self.images_seen - seen) / (time.time() - since), 2)
        return {**summary, **peak_memory()}

    def card(self) -> str:
        from hf_vram.output.cards.diffusion import diffusion_card

        return diffusion_card(self.loaded, self.summary)

    def report(self) -> None:
        s = self.summary
        log(f"saved {self.out} (loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, samples {s['samples']})")


def _accelerator(recipe, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from hf_vram.device import accelerate_mixed_precision

    t = recipe.train
    return Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=accelerate_mixed_precision(t.precision),
        cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        log_with="tensorboard" if "tensorboard" in t.report_to else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
