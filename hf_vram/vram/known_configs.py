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

# The frozen parts the shipped diffusion recipes name (their config.json on the Hub), so that the plan of a
# diffusion recipe answers offline: the VAE's latent shape and size, and the text encoders' size.
KNOWN_VAE_CONFIGS = {
    "stabilityai/sd-vae-ft-mse": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
        act_fn="silu", sample_size=256, scaling_factor=0.18215),
}
_T5_V1_1 = dict(model_type="t5", vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
KNOWN_TEXT_ENCODER_CONFIGS = {
    "openai/clip-vit-base-patch32": dict(model_type="clip_text_model", vocab_size=49408, hidden_size=512,
                                         intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                                         max_position_embeddings=77),
    "openai/clip-vit-large-patch14": dict(model_type="clip_text_model", vocab_size=49408, hidden_size=768,
                                          intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                          max_position_embeddings=77),
    "google/t5-v1_1-small": dict(_T5_V1_1, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "google/t5-v1_1-base": dict(_T5_V1_1, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "google/t5-v1_1-xxl": dict(_T5_V1_1, d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}
KNOWN_DATASET_SIZES.update({
    ("huggan/smithsonian_butterflies_subset", "train"): 1000,
    ("uoft-cs/cifar10", "train"): 50000,
    ("lambdalabs/naruto-blip-captions", "train"): 1221,
})
# Llama-3.1-8B: Llama-3-8B's shapes, trained to 128k positions (llama3 RoPE scaling).
KNOWN_CONFIGS["unsloth/Meta-Llama-3.1-8B-Instruct"] = KNOWN_CONFIGS["NousResearch/Meta-Llama-3-8B-Instruct"]
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"] = KNOWN_CONFIGS["NousResearch/Meta-Llama-3-8B-Instruct"]
KNOWN_DATASET_SIZES[("Yukang/LongAlpaca-12k", "train")] = 12000
