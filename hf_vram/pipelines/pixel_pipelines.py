"""Pixel-space pipelines that diffusers does not ship: a class-conditional UNet2DModel, and a text-conditional
UNet2DConditionModel without a VAE.

Written by hand because no stock pipeline runs them: DDPMPipeline passes no class labels, and DiTPipeline,
StableDiffusionPipeline and PixArtAlphaPipeline always decode with a VAE. This file is self-contained (torch and
diffusers only): hf-vram copies it into the saved output, whose model_index.json names it the way custom pipelines on
the Hub do (`"_class_name": ["pixel_pipelines", "ClassConditionalPipeline"]`), so that

    DiffusionPipeline.from_pretrained(OUTPUT_DIR, trust_remote_code=True)

loads the pipeline without hf-vram installed. Classifier-free guidance as in DiTPipeline and StableDiffusionPipeline:
the unconditional prediction comes from the null class (the last row of the class table) or the empty caption, the
conditions the model saw dropped in training.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def _guided(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Conditional and unconditional halves of a doubled batch -> the guided prediction."""
    cond, uncond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _denoise(pipe, images: torch.Tensor, num_inference_steps: int, guidance_scale: float, generator,
             **condition) -> torch.Tensor:
    """The sampling loop: with guidance, the batch runs twice (conditions, then their null/empty halves)."""
    guide = guidance_scale > 1
    pipe.scheduler.set_timesteps(num_inference_steps)
    for t in pipe.progress_bar(pipe.scheduler.timesteps):
        model_in = torch.cat([images, images]) if guide else images
        model_in = pipe.scheduler.scale_model_input(model_in, t)
        out = pipe.unet(model_in, t, **condition).sample
        if guide:
            out = _guided(out, guidance_scale)
        images = pipe.scheduler.step(out, t, images, generator=generator).prev_sample
    return images


def _to_output(pipe, images: torch.Tensor, output_type: str, return_dict: bool):
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        result = images
    else:
        result = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            result = pipe.numpy_to_pil(result)
    return ImagePipelineOutput(images=result) if return_dict else (result,)


class ClassConditionalPipeline(DiffusionPipeline):
    """A UNet2DModel with a class table (`num_class_embeds` = classes + 1 null row) in pixel space.

    pipe(class_labels=[0, 7], guidance_scale=3.0).images; pipe.get_label_ids(["7"]) maps names to ids.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, id2label: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # JSON keys are strings: keep {int id: name}.
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label)
        self.labels = {name: i for i, name in id2label.items()}

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        label = [label] if isinstance(label, str) else list(label)
        missing = [name for name in label if name not in self.labels]
        if missing:
            raise ValueError(f"unknown labels {missing}; the classes are {sorted(self.labels)}")
        return [self.labels[name] for name in label]

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 3.0, generator=None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        device, size = self._execution_device, self.unet.config.sample_size
        labels = torch.tensor(list(class_labels), device=device).reshape(-1)
        if bool(((labels < 0) | (labels >= self.null_class)).any()):
            raise ValueError(f"class_labels must lie in [0, {self.null_class}); got {labels.tolist()}")
        guide = guidance_scale > 1
        if guide:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        images = randn_tensor((len(class_labels), self.unet.config.in_channels, size, size), generator=generator,
                              device=device, dtype=self.unet.dtype)
        images = _denoise(self, images, num_inference_steps, guidance_scale, generator, class_labels=labels)
        return _to_output(self, images, output_type, return_dict)


class PixelTextToImagePipeline(DiffusionPipeline):
    """A UNet2DConditionModel conditioned on a text encoder's hidden states, in pixel space.

    pipe("a handwritten digit 7", guidance_scale=3.0).images
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def encode_prompt(self, prompts: list[str], device) -> torch.Tensor:
        # Padded to the tokenizer's model_max_length, as in training (and as StableDiffusionPipeline does).
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(device))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, guidance_scale: float = 3.0, generator=None,
                 num_inference_steps: int = 50, height: int | None = None, width: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        emb = self.encode_prompt(prompts, device)
        guide = guidance_scale > 1
        if guide:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * len(prompts) if isinstance(negative, str) else \
                [n for n in negative for _ in range(num_images_per_prompt)]
            emb = torch.cat([emb, self.encode_prompt(negative, device)])
        images = randn_tensor((len(prompts), self.unet.config.in_channels, height, width), generator=generator,
                              device=device, dtype=self.unet.dtype)
        images = _denoise(self, images, num_inference_steps, guidance_scale, generator,
                          encoder_hidden_states=emb.to(self.unet.dtype))
        return _to_output(self, images, output_type, return_dict)
