"""The end of every run: the model card, then the summary (last: its presence means the run finished); the runner
then reports, and pushes to the Hub when the recipe names a repository."""

from __future__ import annotations

from pathlib import Path

from data_prep.atomic import atomic_write_text
from hf_vram.errors import UserError
from hf_vram.output.summary import write_summary


def log(text: str) -> None:
    print(f"[hf-vram] {text}", flush=True)


def publish(out: Path, card_text: str, summary: dict) -> None:
    """Write README.md, then train_summary.json, into `out`."""
    atomic_write_text(Path(out) / "README.md", card_text)
    write_summary(out, summary)


def push_finished(out: Path, repo_id: str, private: bool | None) -> None:
    """Push a finished output; a failed upload must not make the run look unfinished, so the error says the output
    is saved and how to push it later."""
    from hf_vram.hub import push_output

    try:
        log(f"pushed to {push_output(out, repo_id, private)}")
    except UserError as e:
        raise UserError(f"{e}\nThe trained output is saved in {out}; push it later with `hf-vram push {out}`") from None
