"""Architecture fields of the shipped recipes' base models, so that `hf-vram plan` answers offline.

A config found locally or on the Hub always wins; these are the fields of each model's config.json on the Hub
(the only ones the estimate reads), used when the Hub cannot be reached.
"""

from __future__ import annotations

_LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
_MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)

KNOWN_CONFIGS = {
    "NousResearch/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "HuggingFaceH4/mistral-7b-sft-beta": _MISTRAL_7B,
    "openlm-research/open_llama_3b_v2": dict(
        model_type="llama", hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "NousResearch/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B-Instruct"] = KNOWN_CONFIGS["NousResearch/Meta-Llama-3-8B-Instruct"]

# Records in the shipped recipes' Hub datasets (their dataset cards), for the time estimate when offline.
KNOWN_DATASET_SIZES = {
    ("tatsu-lab/alpaca", "train"): 52002,
    ("philschmid/guanaco-sharegpt-style", "train"): 9033,
    ("mlabonne/FineTome-100k", "train"): 100000,
    ("HuggingFaceH4/ultrachat_200k", "train_sft"): 207865,
    ("HuggingFaceH4/no_robots", "train"): 9500,
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61135,
}

# Vocabulary sizes (len(tokenizer)) of the Hub tokenizers that shipped from-scratch recipes name: a model built from
# scratch is sized to its tokenizer, and its plan must not need the network for that.
KNOWN_TOKENIZER_SIZES = {
    "openai-community/gpt2": 50257,
    "gpt2": 50257,
    "EleutherAI/gpt-neox-20b": 50277,
    "NousResearch/Llama-2-7b-hf": 32000,
}
