"""What every model card shares: Hub ids for the metadata, the front matter, the training table, durations and
memory in words."""

from __future__ import annotations

from pathlib import Path

import yaml

GIB = 2**30


def hub_id(ref: str | None) -> str | None:
    """A Hub id for card metadata, or None for local paths, recipe dependencies and builtin data."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from data_prep.sources import LOADERS

    # A data source ending in a loader's extension is a local file, not a Hub dataset.
    if not ref or ref.startswith(("recipe:", "builtin:", ".", "/", "~")) or ref.endswith(tuple(LOADERS)):
        return None
    if Path(ref).expanduser().exists():
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def table(rows: list[tuple[str, object]], head: tuple[str, str] = ("setting", "value")) -> str:
    header = "|" + "|".join(f" {h} " if h else " " for h in head) + "|"
    return header + "\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def duration_text(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def peak_memory_text(summary: dict) -> str | None:
    if "cuda_max_allocated_bytes" in summary:
        text = f"{summary['cuda_max_allocated_bytes'] / GIB:.2f} GiB of GPU memory allocated by tensors"
        if "cuda_max_reserved_bytes" in summary:
            text += f" ({summary['cuda_max_reserved_bytes'] / GIB:.2f} GiB reserved by PyTorch's allocator)"
        return text
    if "cpu_process_max_rss_bytes" in summary:
        return f"{summary['cpu_process_max_rss_bytes'] / GIB:.2f} GiB resident memory of the training process (CPU run)"
    return None


def num(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
