"""Image data for task diffusion: builtin digits and shapes, image folders, transforms, collate and grids."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.images import collate, load_images, sample_captions, sample_classes, save_grid
from hf_vram.errors import DataError
from hf_vram.recipe.schema import ImageSection

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn is not installed (builtin:digits needs it)")


# ----------------------------------------------------------------------------------------------- digits


@needs_sklearn
def test_digits_real():
    data = load_images("builtin:digits", images=ImageSection(resolution=16, channels=1))
    assert len(data) == 1797
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)] and data.has_captions
    item = data.dataset[0]
    assert item["pixel_values"].shape == (1, 16, 16)
    labels = {int(data.dataset[i]["label"]) for i in range(0, 1797, 7)}
    assert labels == set(range(10))
    pixels = torch.stack([data.dataset[i]["pixel_values"] for i in range(50)])
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.99 and pixels.max() > 0.9
    assert item["caption"] == f"a handwritten digit {int(item['label'])}"


def _fake_sklearn(monkeypatch):
    """A stand-in for sklearn.datasets.load_digits with the same layout (values 0..16, labels 0-9)."""
    rng = np.random.default_rng(0)
    bunch = types.SimpleNamespace(images=rng.integers(0, 17, size=(30, 8, 8)).astype(np.float64),
                                  target=np.arange(30) % 10)
    bunch.images[0] = 0
    bunch.images[0, 3, 3] = 16
    sklearn = types.ModuleType("sklearn")
    sk_datasets = types.ModuleType("sklearn.datasets")
    sk_datasets.load_digits = lambda: bunch
    sklearn.datasets = sk_datasets
    monkeypatch.setitem(sys.modules, "sklearn", sklearn)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", sk_datasets)


def test_digits_conversion(monkeypatch):
    _fake_sklearn(monkeypatch)
    data = load_images("builtin:digits", images=ImageSection(resolution=8, channels=3), max_samples=20)
    assert len(data) == 20 and data.num_classes == 10
    item = data.dataset[0]
    assert item["pixel_values"].shape == (3, 8, 8)
    # 0 -> -1, 16 -> +1: the 0..16 range is spread over the whole pixel range.
    assert item["pixel_values"][:, 3, 3].tolist() == [1.0, 1.0, 1.0]
    assert item["pixel_values"][:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert int(data.dataset[13]["label"]) == 3 and data.dataset[13]["caption"] == "a handwritten digit 3"
    big = load_images("builtin:digits", images=ImageSection(resolution=32, channels=1))
    assert big.dataset[1]["pixel_values"].shape == (1, 32, 32)


def test_digits_errors(monkeypatch):
    if not HAS_SKLEARN:
        with pytest.raises(DataError, match="pip install scikit-learn"):
            load_images("builtin:digits")
    _fake_sklearn(monkeypatch)
    with pytest.raises(DataError, match="split 'test'"):
        load_images("builtin:digits", split="test")
    with pytest.raises(DataError, match="builtin:shapes"):
        load_images("builtin:shape")


# ----------------------------------------------------------------------------------------------- shapes


def test_shapes_deterministic_and_classes():
    section = ImageSection(resolution=32, channels=3)
    a = load_images("builtin:shapes", images=section, max_samples=45)
    b = load_images("builtin:shapes", images=section, max_samples=45)
    assert len(a) == 45 and a.num_classes == 9 and len(a.class_names) == 9
    for i in (0, 7, 44):
        assert torch.equal(a.dataset[i]["pixel_values"], b.dataset[i]["pixel_values"])
    assert a.dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert {int(a.dataset[i]["label"]) for i in range(45)} == set(range(9))
    assert a.dataset[0]["caption"] == f"a {a.class_names[0]}"
    assert not torch.equal(a.dataset[0]["pixel_values"], a.dataset[9]["pixel_values"])  # same class, other place
    assert len(load_images("builtin:shapes")) == 900
    assert sample_classes(a, 11) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1]
    captions = sample_captions(a, 10)
    assert captions[:9] == [f"a {name}" for name in a.class_names] and captions[9] == captions[0]


def test_random_flip_flips():
    flip = load_images("builtin:shapes", images=ImageSection(resolution=64, random_flip=True), max_samples=3)
    plain = load_images("builtin:shapes", images=ImageSection(resolution=64), max_samples=3)
    original = plain.dataset[2]["pixel_values"]
    mirrored = torch.flip(original, dims=[2])
    assert not torch.equal(original, mirrored)
    torch.manual_seed(0)
    draws = [flip.dataset[2]["pixel_values"] for _ in range(20)]
    assert any(torch.equal(d, mirrored) for d in draws) and any(torch.equal(d, original) for d in draws)
    torch.manual_seed(0)
    again = [flip.dataset[2]["pixel_values"] for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(draws, again))


def test_random_crop_on_wide_image(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    arr = np.zeros((8, 32, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(32, dtype=np.uint8)[None, :] * 8
    Image.fromarray(arr).save(folder / "a.png")
    centre = load_images(str(folder), images=ImageSection(resolution=8)).dataset[0]["pixel_values"]
    assert centre.shape == (3, 8, 8)
    assert centre[0, 0, 0] == pytest.approx(12 * 8 / 127.5 - 1)  # columns 12..19 of 32
    data = load_images(str(folder), images=ImageSection(resolution=8, center_crop=False))
    torch.manual_seed(0)
    starts = {round(float(data.dataset[0]["pixel_values"][0, 0, 0]), 4) for _ in range(20)}
    assert len(starts) > 1


# ----------------------------------------------------------------------------------------------- image folders


def _write_folder(root, n=4):
    root.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (20, 12), (40 * i, 10, 200)).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a picture number {i % 2}", "label": i % 2})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_imagefolder_captions_and_labels(tmp_path):
    folder = _write_folder(tmp_path / "pics")
    data = load_images(str(folder), images=ImageSection(resolution=8, caption_field="text", label_field="label"))
    assert len(data) == 4 and data.has_captions and data.num_classes == 2 and data.class_names == ["0", "1"]
    items = [data.dataset[i] for i in range(4)]
    assert all(it["pixel_values"].shape == (3, 8, 8) for it in items)
    assert all(-1 <= float(it["pixel_values"].min()) and float(it["pixel_values"].max()) <= 1 for it in items)
    assert sorted(int(it["label"]) for it in items) == [0, 0, 1, 1]
    assert {it["caption"] for it in items} == {"a picture number 0", "a picture number 1"}
    assert sorted(sample_captions(data, 2)) == ["a picture number 0", "a picture number 1"]
    batch = collate(items)
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["label"].shape == (4,)
    assert batch["label"].dtype == torch.long and isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert len(load_images(str(folder), images=ImageSection(resolution=8), max_samples=2)) == 2
    grey = load_images(str(folder), images=ImageSection(resolution=8, channels=1)).dataset[0]
    assert grey["pixel_values"].shape == (1, 8, 8) and "label" not in grey and "caption" not in grey


def test_imagefolder_string_labels(tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    rows = []
    for i, name in enumerate(["dog", "cat", "dog"]):
        Image.new("L", (8, 8), 30 * i).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "kind": name})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_images(str(folder), images=ImageSection(resolution=8, label_field="kind"))
    assert data.class_names == ["cat", "dog"]
    assert sorted(int(data.dataset[i]["label"]) for i in range(3)) == [0, 1, 1]


def test_missing_fields_name_field_and_columns(tmp_path):
    folder = _write_folder(tmp_path / "pics")
    with pytest.raises(DataError) as err:
        load_images(str(folder), images=ImageSection(caption_field="caption"))
    message = str(err.value)
    assert "'caption'" in message and "image, text, label" in message and "data.images.caption_field" in message
    with pytest.raises(DataError, match=r"'img'.*data\.images\.image_field"):
        load_images(str(folder), images=ImageSection(image_field="img"))
    with pytest.raises(DataError, match=r"'class'.*data\.images\.label_field"):
        load_images(str(folder), images=ImageSection(label_field="class"))
    with pytest.raises(DataError, match="does not exist"):
        load_images(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no captions"):
        sample_captions(load_images(str(folder)), 2)
    with pytest.raises(DataError, match="label_field"):
        sample_classes(load_images(str(folder)), 2)


# ----------------------------------------------------------------------------------------------- grids


def test_save_grid_pil_and_tensor(tmp_path):
    pil = [Image.new("RGB", (10, 6), (i * 50, 0, 0)) for i in range(5)]
    path = save_grid(pil, tmp_path / "out" / "grid.png", nrow=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (3 * 12 + 2, 2 * 8 + 2)
        assert img.getpixel((2, 2)) == (0, 0, 0) and img.getpixel((2 + 12, 2)) == (50, 0, 0)
    tensor = torch.linspace(-1, 1, 4 * 1 * 5 * 5).reshape(4, 1, 5, 5)
    path = save_grid(tensor, tmp_path / "t.png")
    with Image.open(path) as img:
        assert img.size == (2 * 7 + 2, 2 * 7 + 2) and img.mode == "L"
        assert img.getpixel((2, 2)) == 0 and img.getpixel((2 + 7 + 4, 2 + 7 + 4)) == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.png"]
