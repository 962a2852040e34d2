"""Which transformers architectures become which llama.cpp architecture, and how their tensors change on the way.

The tensor names come from the gguf package's own map (gguf.tensor_mapping, the one llama.cpp's converter uses);
what is kept here is the little that map does not say: the llama.cpp architecture of each model_type, and the
two value transforms llama.cpp's convert_hf_to_gguf.py applies to these families (and transformers' GGUF loader
undoes): the q/k row permutation of the Llama graph and Gemma's norm offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from hf_vram.errors import UserError


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    # llama.cpp's llama graph rotates interleaved pairs (RoPE "normal" mode) where transformers rotates the two
    # halves of each head, so the converter permutes the q and k rows; the other families here use NEOX mode.
    permute_qk: bool = False
    # Gemma's RMSNorm scales by (1 + w); llama.cpp's graph scales by w, so the converter stores 1 + w.
    norm_offset: float = 0.0
    # Gemma 2's logit soft-capping and sliding window are read by llama.cpp from the metadata.
    gemma2: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    # llama.cpp converts MistralForCausalLM through its Llama class: the same graph, with a sliding window.
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3),
    "gemma2": Family(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, gemma2=True),
}

# Why the others are refused, where there is more to say than "not listed".
REFUSED = {
    "retnet": "llama.cpp has no retention (RetNet) graph",
    "bitnet": "hf-vram's BitNet b1.58 layers have no llama.cpp tensor layout here (llama.cpp's TQ types expect "
    "its own BitNet export)",
    "mamba": "hf-vram exports attention decoders only; llama.cpp's Mamba tensors are not mapped here",
    "gemma": "transformers cannot load a Gemma (1) GGUF back, so the round trip that checks an export cannot run",
    "gemma3": "Gemma 3's interleaved local/global RoPE bases are not mapped here; export Gemma 2 or a Llama/Qwen",
}


def family_of(config: dict, where: str) -> Family:
    model_type = config.get("model_type", "?")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = REFUSED.get(model_type, "its tensors are not mapped to a llama.cpp architecture here")
    raise UserError(
        f"{where}: a {model_type} model cannot be exported as GGUF: {why}. Supported: {', '.join(FAMILIES)}"
    )
