"""Datasets for hf-vram: sources (local files, Hub ids, builtin generated data), record formats, chat
templates, tokenization with loss masks, and the cached preparation of a recipe's data."""

from data_prep.formats import ALPACA_TEMPLATES, CHAT_FORMATS, Pair, alpaca_prompt, to_examples
from data_prep.prepare import load_examples, prepare_dataset
from data_prep.sources import read_records

__all__ = ["ALPACA_TEMPLATES", "CHAT_FORMATS", "Pair", "alpaca_prompt", "load_examples", "prepare_dataset", "read_records", "to_examples"]
