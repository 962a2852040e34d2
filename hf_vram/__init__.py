"""hf-vram: train and fine-tune models on one consumer GPU through the Hugging Face stack."""

__version__ = "0.1.0"
