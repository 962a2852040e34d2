"""diffusion.cache_latents: the frozen VAE's latents (and a frozen text encoder's caption embeddings) of a recipe's
images, computed once before training and read back instead of running the encoders every step.

Latents are the posterior mean (`latent_dist.mode() * scaling_factor`, as the uncached loop), so one encoding per
image is exact. With data.images.random_flip the mirrored image is encoded too (pixels flipped before encoding: a
VAE is not flip-equivariant, so flipping latents would not give the latents of the flipped image), and each draw of
an item picks one of the two at random, which keeps the flip augmentation. A random crop (center_crop false) is
drawn once, when the cache is built.

Caption embeddings are cached only for a frozen pretrained text encoder (a text encoder trained with the model
must see its captions every step); each distinct caption is encoded once, and row 0 holds the empty caption that
classifier-free guidance dropout puts in place of a caption.

Values are stored in the dtype the encoder produced them in (float32, or bfloat16 when the frozen parts run in
bf16): that is exactly what the uncached loop would feed the model, at no loss, and half the disk under bf16.

Layout of `OUTPUT_DIR/prepared/latents/<key>/` (beside the tokenized data cache, which a Hub push leaves out):
  latents.safetensors   latents (N, C, h, w); latents_flipped when random_flip; labels (N,) when the data has them
  text.safetensors      frozen text encoder: embeds (U, L, D), mask (U, L) when the encoder is given one (PixArt),
                        caption_index (N,) rows of embeds, row 0 = ""
  captions.json         text encoder trained with the model: the caption of each image
  meta.json             key, format version and counts
The files are read back memory-mapped (safetensors), so the cache costs page cache rather than process memory.
The folder is written under a temporary name and renamed when whole, so a folder under its key is complete; one
that does not read back (damaged from outside) is rebuilt. The key is a hash of everything that changes the values.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.atomic import atomic_write_json, fsync_tree

# Bump when what is stored or how it is computed changes: every old cache key then misses.
CACHE_FORMAT_VERSION = 1
LATENTS_FILE = "latents.safetensors"
TEXT_FILE = "text.safetensors"
CAPTIONS_FILE = "captions.json"
META_FILE = "meta.json"


def cache_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "prepared" / "latents"


def _path_fingerprint(name: str | None) -> Any:
    """A local file or folder by its files' names, sizes and modification times (hashing every image or weight
    file on each run would cost more than it saves); anything else (a Hub id, a builtin source) by its name."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        st = path.stat()
        return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return {"folder": str(path.resolve()),
                "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    return {"name": name}


def _config(module) -> dict:
    """A diffusers (FrozenDict) or transformers (PretrainedConfig) config as plain JSON values."""
    if module is None:
        return {}
    config = module.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Bookkeeping that changes with the library version or the loading path, not the weights' computation.
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "_diffusers_version")}
    return json.loads(json.dumps(config, default=str, sort_keys=True))


def caches_text(parts) -> bool:
    """Whether caption embeddings are cached: text conditioning with a frozen text encoder."""
    return parts.conditioning == "text" and parts.text_encoder is not None and not parts.text_trainable


def latent_cache_key(recipe, parts) -> str:
    """A short hex digest of everything that changes the cached values."""
    data, d = recipe.data, recipe.diffusion
    images = data.images.model_dump() if data.images else {}
    text = None
    if caches_text(parts):
        text = {"encoder": _path_fingerprint(d.text_encoder), "config": _config(parts.text_encoder),
                "dtype": str(parts.text_encoder.dtype), "arch": parts.arch, "max_caption_length": d.max_caption_length}
    blob = json.dumps({
        "source": _path_fingerprint(data.source), "split": data.split, "max_samples": data.max_samples,
        "images": images, "conditioning": d.conditioning, "text_trainable": parts.text_trainable,
        "vae": {"path": _path_fingerprint(d.vae), "config": _config(parts.vae), "dtype": str(parts.vae.dtype)},
        "text": text, "version": CACHE_FORMAT_VERSION,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class LatentDataset(torch.utils.data.Dataset):
    """Items `{"latents": (C, h, w)}` plus "label", "caption_index" (a row of the text cache) or "caption" (a text
    encoder trained with the model), as the cache holds them."""

    def __init__(self, latents: torch.Tensor, flipped: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 caption_index: torch.Tensor | None = None, captions: list[str] | None = None):
        self.latents, self.flipped, self.labels = latents, flipped, labels
        self.caption_index, self.captions = caption_index, captions

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        # Drawn from torch's global generator, as ImageTransform's flip: seeded runs draw the same.
        flip = self.flipped is not None and torch.rand(()).item() < 0.5
        item: dict[str, Any] = {"latents": (self.flipped if flip else self.latents)[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.caption_index is not None:
            item["caption_index"] = self.caption_index[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


def collate_latents(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"latents": torch.stack([item["latents"] for item in batch])}
    for key in ("label", "caption_index"):
        if key in batch[0]:
            out[key] = torch.stack([item[key] for item in batch])
    if "caption" in batch[0]:
        out["caption"] = [item["caption"] for item in batch]
    return out


@dataclass
class LatentCache:
    path: Path
    latents: torch.Tensor
    flipped: torch.Tensor | None
    labels: torch.Tensor | None
    caption_index: torch.Tensor | None
    embeds: torch.Tensor | None
    mask: torch.Tensor | None
    captions: list[str] | None
    reused: bool

    @property
    def dataset(self) -> LatentDataset:
        return LatentDataset(self.latents, self.flipped, self.labels, self.caption_index, self.captions)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def text(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption embeddings (B, L, D) and mask (B, L) or None, as encode_text returns them, for rows of the text
        cache (0 = the empty caption). The table stays in host memory; only the batch goes to the device."""
        rows = rows.cpu().long()
        mask = self.mask[rows].to(device) if self.mask is not None else None
        return self.embeds[rows].to(device), mask

    def describe(self) -> str:
        parts = [f"{self.latents.shape[0]} images"]
        if self.flipped is not None:
            parts.append("and their mirror images")
        parts.append(f"latents {tuple(self.latents.shape[1:])} {str(self.latents.dtype).removeprefix('torch.')}")
        if self.embeds is not None:
            parts.append(f"{self.embeds.shape[0] - 1} distinct captions embedded")
        return f"{self.path} ({', '.join(parts)}; {self.nbytes / 2**20:.1f} MiB)"


def _load(directory: Path, key: str) -> LatentCache | None:
    """The cache in `directory` when it is whole and of this key and format; None otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("key") != key or meta.get("format_version") != CACHE_FORMAT_VERSION:
            return None
        lat = load_file(str(directory / LATENTS_FILE))
        text = load_file(str(directory / TEXT_FILE)) if meta["text"] else {}
        captions = json.loads((directory / CAPTIONS_FILE).read_text()) if meta["captions"] else None
    except (OSError, ValueError, KeyError, SafetensorError):  # missing or damaged files
        return None
    n = meta["images"]
    cache = LatentCache(directory, lat.get("latents"), lat.get("latents_flipped"), lat.get("labels"),
                        text.get("caption_index"), text.get("embeds"), text.get("mask"), captions, reused=True)
    if cache.latents is None or cache.latents.shape[0] != n or (meta["flipped"] and cache.flipped is None):
        return None
    if meta["text"] and (cache.embeds is None or cache.caption_index is None or cache.caption_index.shape[0] != n):
        return None
    if captions is not None and len(captions) != n:
        return None
    return cache


@contextmanager
def _without_flip(dataset):
    """Read the dataset's items unflipped: the mirror images are made here, both of every image."""
    transform = getattr(dataset, "transform", None)
    if transform is None or not transform.random_flip:
        yield
        return
    plain = copy.copy(transform)
    plain.random_flip = False
    dataset.transform = plain
    try:
        yield
    finally:
        dataset.transform = transform


@torch.no_grad()
def _encode_latents(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
    return (latents * vae.config.scaling_factor).cpu()


@dataclass
class _Encoded:
    """What one pass over the images gives: latents per batch (and of the mirror images), labels, captions."""

    latents: list[torch.Tensor]
    flipped: list[torch.Tensor]
    labels: list[torch.Tensor]
    captions: list[str]


def _encode_images(dataset, parts, device, batch_size: int, flip: bool, show: Callable[[str], None]) -> _Encoded:
    from data_prep.images import collate

    out = _Encoded([], [], [], [])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         num_workers=0)
    done, last = 0, time.time()
    with _without_flip(dataset):
        for batch in loader:
            px = batch["pixel_values"]
            out.latents.append(_encode_latents(parts.vae, px, device))
            if flip:
                out.flipped.append(_encode_latents(parts.vae, torch.flip(px, dims=[3]), device))
            if "label" in batch:
                out.labels.append(batch["label"].long())
            if "caption" in batch:
                out.captions.extend(batch["caption"])
            done += px.shape[0]
            if time.time() - last > 30:
                show(f"latent cache: {done}/{len(dataset)} images encoded")
                last = time.time()
    return out


def _save_latents(directory: Path, encoded: _Encoded) -> int:
    """Write latents.safetensors; returns the number of images."""
    from safetensors.torch import save_file

    tensors = {"latents": torch.cat(encoded.latents).contiguous()}
    if encoded.flipped:
        tensors["latents_flipped"] = torch.cat(encoded.flipped).contiguous()
    if encoded.labels:
        tensors["labels"] = torch.cat(encoded.labels)
    save_file(tensors, str(directory / LATENTS_FILE))
    return tensors["latents"].shape[0]


def _save_text(directory: Path, parts, captions: list[str], device, batch_size: int) -> int:
    """Embed each distinct caption once (row 0 the empty caption) and write text.safetensors; returns the number
    of distinct captions of the data."""
    from safetensors.torch import save_file

    rows: dict[str, int] = {"": 0}
    index = [rows.setdefault(c, len(rows)) for c in captions]
    distinct = list(rows)
    embeds, masks = [], []
    with torch.no_grad():
        for i in range(0, len(distinct), batch_size):
            emb, mask = parts.encode_text(distinct[i:i + batch_size], device)
            embeds.append(emb.cpu())
            if mask is not None:
                masks.append(mask.cpu())
    tensors = {"embeds": torch.cat(embeds).contiguous(), "caption_index": torch.tensor(index, dtype=torch.long)}
    if masks:
        tensors["mask"] = torch.cat(masks).contiguous()
    save_file(tensors, str(directory / TEXT_FILE))
    return len(distinct) - 1


def _build(directory: Path, key: str, data, parts, device, batch_size: int, flip: bool,
           show: Callable[[str], None]) -> None:
    """Encode `data.dataset` into `directory`. `parts` is read by attribute: vae, conditioning, text_encoder,
    text_trainable, and encode_text(captions, device) -> (embeds, mask or None) when captions are cached."""
    text = caches_text(parts)
    encoded = _encode_images(data.dataset, parts, device, batch_size, flip, show)
    n = _save_latents(directory, encoded)
    meta: dict[str, Any] = {"key": key, "format_version": CACHE_FORMAT_VERSION, "images": n, "flipped": flip,
                            "text": text, "captions": False}
    if text:
        meta["distinct_captions"] = _save_text(directory, parts, encoded.captions, device, batch_size)
    elif parts.conditioning == "text":
        (directory / CAPTIONS_FILE).write_text(json.dumps(encoded.captions))
        meta["captions"] = True
    atomic_write_json(directory / META_FILE, meta)


def build_latent_cache(recipe, data, parts, device, root: Path, batch_size: int | None = None,
                       show: Callable[[str], None] = print) -> LatentCache:
    """The recipe's latent cache under `root/<key>/`: read back when a whole one is there, else encoded now
    (`data` from load_images, `parts` from build, with the VAE and a frozen text encoder on `device`)."""
    if parts.vae is None:
        raise ValueError("diffusion.cache_latents needs diffusion.vae (a pixel-space model has no latents to cache)")
    key = latent_cache_key(recipe, parts)
    directory = Path(root) / key
    cache = _load(directory, key)
    if cache is not None:
        return cache
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{key}.tmp-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir()
    flip = bool(recipe.data.images and recipe.data.images.random_flip)
    try:
        # The global generator (random crops) left as it was: a run that builds the cache and one that reads it
        # draw the same noise.
        with torch.random.fork_rng(devices=[]):
            _build(tmp, key, data, parts, device, batch_size or recipe.train.micro_batch_size, flip, show)
        fsync_tree(tmp)
        shutil.rmtree(directory, ignore_errors=True)  # a damaged one of the same key
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = _load(directory, key)
    if cache is None:
        raise RuntimeError(f"{directory}: the latent cache just written does not read back")
    cache.reused = False
    return cache
