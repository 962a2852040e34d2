"""Datasets for hf-vram: sources (local files, Hub ids, builtin generated data) and record formats."""

from data_prep.formats import ALPACA_TEMPLATES, alpaca_prompt, to_training_rows
from data_prep.sources import load_training_dataset, read_records

__all__ = ["ALPACA_TEMPLATES", "alpaca_prompt", "load_training_dataset", "read_records", "to_training_rows"]
