"""Image datasets for task diffusion: builtin sources, image folders and Hub image datasets as torch datasets.

Every item is `{"pixel_values": (channels, resolution, resolution) float in [-1, 1], "label": int64 scalar,
"caption": str}`; "label" is present only when the data has labels, "caption" only when it has captions.

Sources:
- `builtin:digits`: scikit-learn's 1,797 8x8 handwritten digits (offline, bundled with scikit-learn).
- `builtin:shapes`: coloured circles, squares and triangles drawn here (offline, deterministic).
- a local folder in the imagefolder layout (captions/labels in metadata.jsonl, or labels from sub-folders).
- anything else: a Hub dataset id, read with `datasets.load_dataset(source, split=split)`.

Images are decoded and transformed lazily in `__getitem__`, so a large folder or Hub dataset is never held in
memory as tensors; the builtin sources are small and, when the transforms are deterministic, precomputed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_prep.errors import DataError, did_you_mean

BUILTIN_IMAGE_SOURCES = ("builtin:digits", "builtin:shapes")

SHAPES_SIZE = 64
SHAPES_DEFAULT_COUNT = 900
SHAPES_SEED = 0
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPE_KINDS = ("circle", "square", "triangle")
# Off-white rather than white, so that no shape colour touches the ends of the pixel range by accident.
SHAPES_BACKGROUND = (235, 235, 235)
SHAPE_CLASS_NAMES = [f"{colour} {kind}" for colour in SHAPE_COLOURS for kind in SHAPE_KINDS]

# sample_captions reads at most this many captions looking for distinct ones (a large Hub dataset could
# otherwise be scanned end to end when its captions repeat).
_CAPTION_SCAN_LIMIT = 10_000


class ImageSettings(Protocol):
    """What load_images reads of data.images: the recipe's validated section, ImageOptions, or any object with
    these attributes."""

    resolution: int
    center_crop: bool
    random_flip: bool
    channels: int
    image_field: str
    caption_field: str | None
    label_field: str | None


@dataclass(frozen=True)
class ImageOptions:
    """data.images when a recipe leaves it out: the same fields and defaults as the recipe schema's section (a test
    checks that the two agree)."""

    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    channels: int = 3
    image_field: str = "image"
    caption_field: str | None = None
    label_field: str | None = None


@dataclass
class ImageData:
    """A loaded image source: the torch dataset and what the trainer needs to condition and sample."""

    dataset: torch.utils.data.Dataset
    class_names: list[str] | None
    num_classes: int | None
    has_captions: bool
    description: str
    resolution: int = 64
    channels: int = 3

    @property
    def has_labels(self) -> bool:
        return self.num_classes is not None

    def __len__(self) -> int:
        return len(self.dataset)


# ----------------------------------------------------------------------------------------------- transforms


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB"; transparency is composited on white (a plain convert would turn it black)."""
    if img.mode == mode:
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode.startswith("I") or img.mode == "F":
        # 16-bit and float images: PIL's convert clips at 255 instead of rescaling.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if arr.max(initial=0.0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    return img.convert(mode)


class ImageTransform:
    """Resize the short side to `resolution`, crop square, maybe flip, convert channels, scale to [-1, 1].

    Upsampling uses bilinear filtering (8x8 digits become smooth blobs, not blocks); downsampling uses
    bicubic, which PIL antialiases. Random crops and flips draw from torch's global generator, which the
    DataLoader seeds differently in each worker and `torch.manual_seed` makes reproducible.
    """

    def __init__(self, resolution: int = 64, center_crop: bool = True, random_flip: bool = False, channels: int = 3):
        if channels not in (1, 3):
            raise DataError(f"data.images.channels: got {channels}, expected 1 (grayscale) or 3 (RGB)")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.channels = channels

    @classmethod
    def from_section(cls, images: ImageSettings) -> ImageTransform:
        return cls(images.resolution, images.center_crop, images.random_flip, images.channels)

    @property
    def deterministic(self) -> bool:
        return self.center_crop and not self.random_flip

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = _to_mode(img, "L" if self.channels == 1 else "RGB")
        res = self.resolution
        w, h = img.size
        if min(w, h) != res:
            scale = res / min(w, h)
            size = (max(res, round(w * scale)), max(res, round(h * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BICUBIC)
            w, h = img.size
        if self.center_crop:
            left, top = (w - res) // 2, (h - res) // 2
        else:
            left = int(torch.randint(0, w - res + 1, ()).item())
            top = int(torch.randint(0, h - res + 1, ()).item())
        if (left, top, w, h) != (0, 0, res, res):
            img = img.crop((left, top, left + res, top + res))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        pixels = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        if self.random_flip and torch.rand(()).item() < 0.5:
            pixels = torch.flip(pixels, dims=[2])
        return pixels


# ----------------------------------------------------------------------------------------------- datasets


class MemoryImageDataset(torch.utils.data.Dataset):
    """Images held in memory as PIL images (builtin sources). With deterministic transforms the tensors are
    computed once up front, since every epoch would produce the same ones."""

    def __init__(self, images: list[Image.Image], transform: ImageTransform, labels: list[int] | None = None,
                 captions: list[str] | None = None):
        self.images = images
        self.transform = transform
        self.labels = labels
        self.captions = captions
        self._cached = [transform(img) for img in images] if transform.deterministic else None

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> str | None:
        return None if self.captions is None else self.captions[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = self._cached[index] if self._cached is not None else self.transform(self.images[index])
        item: dict[str, Any] = {"pixel_values": pixels}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[index], dtype=torch.long)
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


class HFImageDataset(torch.utils.data.Dataset):
    """A Hugging Face dataset (imagefolder or Hub) read one record at a time: images are decoded only when
    an item is requested, so memory stays flat however large the source is."""

    def __init__(self, ds, transform: ImageTransform, source: str, image_field: str, caption_field: str | None = None,
                 label_field: str | None = None, label_ids: dict[str, int] | None = None):
        self.ds = ds
        self.transform = transform
        self.source = source
        self.image_field = image_field
        self.caption_field = caption_field
        self.label_field = label_field
        self.label_ids = label_ids
        # Captions read without decoding images (sample_captions scans many of them).
        self._captions = ds.select_columns([caption_field]) if caption_field else None

    def __len__(self) -> int:
        return len(self.ds)

    def _image(self, value: Any, index: int) -> Image.Image:
        if isinstance(value, Image.Image):
            return value
        # Columns that are not an Image feature hold a path or {"bytes", "path"} records.
        try:
            if isinstance(value, dict) and value.get("bytes"):
                import io

                return Image.open(io.BytesIO(value["bytes"]))
            if isinstance(value, dict) and value.get("path"):
                return Image.open(value["path"])
            if isinstance(value, str):
                return Image.open(value)
        except OSError as exc:
            raise DataError(f"{self.source}: record {index}: field '{self.image_field}' cannot be opened as an image: {exc}") from exc
        raise DataError(
            f"{self.source}: record {index}: field '{self.image_field}' holds {type(value).__name__}, not an image; "
            "set data.images.image_field to the column holding the images"
        )

    def _caption(self, value: Any, index: int) -> str:
        if isinstance(value, (list, tuple)):
            # Datasets with several captions per image: the first is used, so the same image always gets one.
            value = value[0] if value else None
        if value is None:
            raise DataError(f"{self.source}: record {index}: caption field '{self.caption_field}' is empty; "
                            "fill it in, or leave data.images.caption_field empty to train without captions")
        return str(value)

    def _label(self, value: Any, index: int) -> int:
        if self.label_ids is not None:
            if value is None or str(value) not in self.label_ids:
                raise DataError(f"{self.source}: record {index}: label field '{self.label_field}' is {value!r}, "
                                "not one of the class names; fill it in or leave data.images.label_field empty")
            return self.label_ids[str(value)]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"{self.source}: record {index}: label field '{self.label_field}' is {value!r}, "
                            "expected a class index >= 0; fix the record or set data.images.label_field to another column")
        return int(value)

    def caption(self, index: int) -> str | None:
        if self._captions is None:
            return None
        return self._caption(self._captions[int(index)][self.caption_field], index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        row = self.ds[index]
        item: dict[str, Any] = {"pixel_values": self.transform(self._image(row[self.image_field], index))}
        if self.label_field:
            item["label"] = torch.tensor(self._label(row[self.label_field], index), dtype=torch.long)
        if self.caption_field:
            item["caption"] = self._caption(row[self.caption_field], index)
        return item


# ----------------------------------------------------------------------------------------------- builtin sources


def _only_train(source: str, split: str) -> None:
    if split != "train":
        raise DataError(f"{source}: no split '{split}' (the only split is 'train'); set data.split: train "
                        "(and leave data.eval_split empty)")


def _digits(split: str, transform: ImageTransform, max_samples: int | None) -> ImageData:
    _only_train("builtin:digits", split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("builtin:digits needs scikit-learn, which is not installed: run `pip install scikit-learn` "
                        "(or use builtin:shapes, which needs nothing)") from exc
    bunch = load_digits()
    # Values are 0..16 (counts of set pixels in 4x4 blocks of the 32x32 scans); spread them over 0..255.
    pixels = np.clip(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = [int(t) for t in bunch.target]
    if max_samples is not None:
        pixels, labels = pixels[:max_samples], labels[:max_samples]
    images = [Image.fromarray(p, mode="L") for p in pixels]
    captions = [f"a handwritten digit {label}" for label in labels]
    dataset = MemoryImageDataset(images, transform, labels, captions)
    return ImageData(dataset, [str(d) for d in range(10)], 10, True,
                     f"builtin:digits (scikit-learn's 8x8 handwritten digits): {len(dataset)} images, 10 classes, captions",
                     transform.resolution, transform.channels)


def shapes_images(n: int = SHAPES_DEFAULT_COUNT, seed: int = SHAPES_SEED) -> tuple[list[Image.Image], list[int]]:
    """n 64x64 RGB images of one shape each, classes in turn (balanced); same n and seed, same pixels."""
    rng = np.random.default_rng(seed)
    colours = list(SHAPE_COLOURS.values())
    images, labels = [], []
    for i in range(n):
        label = i % len(SHAPE_CLASS_NAMES)
        colour, kind = colours[label // len(SHAPE_KINDS)], SHAPE_KINDS[label % len(SHAPE_KINDS)]
        size = int(rng.integers(16, 41))  # side of the bounding square, 1/4 to 5/8 of the image
        x0 = int(rng.integers(2, SHAPES_SIZE - size - 1))
        y0 = int(rng.integers(2, SHAPES_SIZE - size - 1))
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        img = Image.new("RGB", (SHAPES_SIZE, SHAPES_SIZE), SHAPES_BACKGROUND)
        draw = ImageDraw.Draw(img)
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + (size - 1) / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=colour)
        images.append(img)
        labels.append(label)
    return images, labels


def _shapes(split: str, transform: ImageTransform, max_samples: int | None) -> ImageData:
    _only_train("builtin:shapes", split)
    images, labels = shapes_images(SHAPES_DEFAULT_COUNT if max_samples is None else max_samples)
    captions = [f"a {SHAPE_CLASS_NAMES[label]}" for label in labels]
    dataset = MemoryImageDataset(images, transform, labels, captions)
    return ImageData(dataset, list(SHAPE_CLASS_NAMES), len(SHAPE_CLASS_NAMES), True,
                     f"builtin:shapes (generated coloured shapes): {len(dataset)} images, {len(SHAPE_CLASS_NAMES)} classes, captions",
                     transform.resolution, transform.channels)


# ----------------------------------------------------------------------------------------------- folders and the Hub


def _looks_like_path(source: str) -> bool:
    # A Hub id is owner/name; anything rooted or relative-looking was meant as a folder.
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


def _check_field(ds, source: str, field: str, what: str, key: str) -> None:
    if field not in ds.column_names:
        columns = ", ".join(ds.column_names)
        raise DataError(f"{source}: no {what} column '{field}' (columns: {columns}){did_you_mean(field, ds.column_names)}; "
                        f"set {key} to one of them")


def _labels_of(ds, source: str, field: str) -> tuple[list[str], dict[str, int] | None]:
    """Class names, and a name -> id map when the labels are strings (e.g. "cat" in metadata.jsonl)."""
    import datasets

    feature = ds.features[field]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    values = [v for v in ds.unique(field) if v is not None]
    if not values:
        raise DataError(f"{source}: label field '{field}' is empty in every record; fill it in or leave data.images.label_field empty")
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
        return names, {name: i for i, name in enumerate(names)}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataError(f"{source}: label field '{field}' has the value {min(values)}; class labels must be >= 0 "
                            "(imagefolder gives -1 to images outside a class sub-folder)")
        return [str(i) for i in range(max(values) + 1)], None
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(f"{source}: label field '{field}' holds {', '.join(kinds)}; expected integer class ids or class names "
                    "(strings); set data.images.label_field to such a column")


def _load_hf(source: str, split: str):
    import datasets

    folder = Path(source).expanduser()
    try:
        if folder.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split), f"image folder {folder}"
        if _looks_like_path(source):
            raise DataError(f"data.source: folder '{source}' does not exist; give an image folder, a Hub dataset id, "
                            f"or one of {', '.join(BUILTIN_IMAGE_SOURCES)}")
        return datasets.load_dataset(source, split=split), f"Hub dataset {source}"
    except DataError:
        raise
    except Exception as exc:  # load_dataset raises many types (network, missing split, bad files)
        raise DataError(f"{source}: cannot load split '{split}': {type(exc).__name__}: {exc}. Check data.source "
                        "(a folder, or a Hub id owner/name, downloaded once with network access: HF_DATASETS_OFFLINE=1 "
                        "reads only the local cache) and data.split") from exc


def _hf_images(source: str, split: str, images: ImageSettings, transform: ImageTransform, max_samples: int | None) -> ImageData:
    ds, what = _load_hf(source, split)
    _check_field(ds, source, images.image_field, "image", "data.images.image_field")
    if images.caption_field:
        _check_field(ds, source, images.caption_field, "caption", "data.images.caption_field")
    if images.label_field:
        _check_field(ds, source, images.label_field, "label", "data.images.label_field")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{source}: split '{split}' has no images; check data.source and data.split")
    # Only the fields used are decoded per item (a dataset may carry other images or heavy columns).
    ds = ds.select_columns([f for f in (images.image_field, images.caption_field, images.label_field) if f])
    class_names, label_ids = _labels_of(ds, source, images.label_field) if images.label_field else (None, None)
    dataset = HFImageDataset(ds, transform, source, images.image_field, images.caption_field, images.label_field, label_ids)
    _ = dataset[0]  # fail now, with the record named, rather than in the first training step
    parts = [f"{what}, split {split}: {len(dataset)} images"]
    if class_names is not None:
        parts.append(f"{len(class_names)} classes")
    if images.caption_field:
        parts.append("captions")
    return ImageData(dataset, class_names, None if class_names is None else len(class_names), bool(images.caption_field),
                     ", ".join(parts), transform.resolution, transform.channels)


# ----------------------------------------------------------------------------------------------- public API


def load_images(source: str, split: str = "train", images: ImageSettings | None = None,
                max_samples: int | None = None) -> ImageData:
    """The recipe's image data (data.source, data.split, data.max_samples, data.images) as a torch dataset.
    `images` is read by attribute (see ImageSettings); None means ImageOptions' defaults."""
    images = images or ImageOptions()
    transform = ImageTransform.from_section(images)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"data.max_samples: got {max_samples}, expected at least 1 (or empty for all)")
    if source == "builtin:digits":
        return _digits(split, transform, max_samples)
    if source == "builtin:shapes":
        return _shapes(split, transform, max_samples)
    if source.startswith("builtin:"):
        raise DataError(f"data.source: '{source}' is not a builtin image source{did_you_mean(source, BUILTIN_IMAGE_SOURCES)}; "
                        f"choose {' or '.join(BUILTIN_IMAGE_SOURCES)}, an image folder, or a Hub dataset id")
    return _hf_images(source, split, images, transform, max_samples)


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixel_values (B, C, H, W) and labels (B,); captions stay a list of B strings."""
    out: dict[str, Any] = {"pixel_values": torch.stack([item["pixel_values"] for item in batch])}
    if "label" in batch[0]:
        out["label"] = torch.stack([item["label"] for item in batch])
    if "caption" in batch[0]:
        out["caption"] = [item["caption"] for item in batch]
    return out


def sample_classes(image_data: ImageData, n: int) -> list[int]:
    """n class ids 0, 1, ..., C-1, 0, 1, ... (a sample grid shows every class in turn)."""
    if not image_data.num_classes:
        raise DataError(f"{image_data.description}: no class labels to sample; set data.images.label_field")
    return [i % image_data.num_classes for i in range(n)]


def sample_captions(image_data: ImageData, n: int) -> list[str]:
    """n captions: the first distinct captions of the data in order, repeated in turn when there are fewer."""
    if not image_data.has_captions:
        raise DataError(f"{image_data.description}: no captions to sample; set data.images.caption_field")
    dataset = image_data.dataset
    distinct: list[str] = []
    seen: set[str] = set()
    for i in range(min(len(dataset), _CAPTION_SCAN_LIMIT)):
        caption = dataset.caption(i)
        if caption not in seen:
            seen.add(caption)
            distinct.append(caption)
            if len(distinct) == n:
                break
    return [distinct[i % len(distinct)] for i in range(n)]


GRID_PADDING = 2


def _tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid: expected a tensor (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[3] == 1:
        return [Image.fromarray(a[:, :, 0], mode="L") for a in arr]
    return [Image.fromarray(a, mode="RGB") for a in arr]


def save_grid(images: Sequence[Image.Image] | torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images as one PNG grid, nrow images per row (default: a square-ish grid), written atomically.

    Accepts a list of PIL images (any sizes: each is resized to the first's) or a tensor (N, C, H, W) in
    [-1, 1], the model's range (values outside are clipped). Cells are separated and framed by 2 black pixels,
    so the PNG is nrow*(W+2)+2 wide and rows*(H+2)+2 high.
    """
    pil = _tensor_to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    if not pil:
        raise ValueError("save_grid: no images")
    mode = "RGB" if any(img.mode not in ("L", "1", "I", "I;16", "F") for img in pil) else "L"
    w, h = pil[0].size
    per_row = nrow or math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / per_row)
    pad = GRID_PADDING
    grid = Image.new(mode, (per_row * (w + pad) + pad, rows * (h + pad) + pad), 0)
    for i, img in enumerate(pil):
        img = _to_mode(img, mode)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        grid.paste(img, (pad + (i % per_row) * (w + pad), pad + (i // per_row) * (h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
