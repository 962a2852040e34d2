"""A saved transformers model (config.json, safetensors, tokenizer) written as one GGUF file.

Written on the gguf package (the writer, tensor names, quantizers and token metadata of llama.cpp's own
convert_hf_to_gguf.py). That converter is a script in llama.cpp's repository, not part of any package on the
registry, so the little it adds per architecture is restated here: the hyperparameter keys, the value transforms
of families.py, the Llama 3 RoPE factors, and which tensors stay in float32. K-quants (q4_k_m ...) have no
quantizer in the gguf package; quantize.py hands those to llama.cpp.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from hf_vram.errors import UserError
from hf_vram.export.families import Family, family_of
from hf_vram.export.gguf_vocab import add_tokenizer

# What the gguf package itself writes: the file's type (llama.cpp's "ftype") and the type of its 2-D tensors.
WRITTEN_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


@dataclass
class Written:
    path: Path
    types: dict[str, int] = field(default_factory=dict)  # tensor type name -> how many tensors have it


def _rope(config: dict) -> dict:
    # transformers 5 keeps theta and scaling in rope_parameters; configs saved by 4.x have rope_theta/rope_scaling.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_rope(writer: gguf.GGUFWriter, config: dict, where: str) -> None:
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3's scaling travels as the rope_freqs tensor
        raise UserError(f"{where}/config.json: RoPE type {kind!r} has no GGUF form here (default, linear, yarn, llama3)")


def _add_hparams(writer: gguf.GGUFWriter, config: dict, family: Family, ftype: int, name: str, where: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // config["num_attention_heads"] or family.gemma2:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_rope(writer, config, where)
    if family.gemma2:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3.1's frequency scaling as llama.cpp reads it: one divisor per rotated pair (the rope_freqs tensor)."""
    rope = _rope(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute: each head's two halves become interleaved pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model_dir: Path):
    """(name, float32 array) of every saved weight, one at a time (bf16 has no numpy type, so through torch)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors weights to export")
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def _transform(name: str, w: np.ndarray, config: dict, family: Family) -> np.ndarray:
    if family.permute_qk and name.endswith("q_proj.weight"):
        return _permute(w, config["num_attention_heads"])
    if family.permute_qk and name.endswith("k_proj.weight"):
        return _permute(w, config.get("num_key_value_heads") or config["num_attention_heads"])
    if family.norm_offset and name.endswith("norm.weight"):
        return w + family.norm_offset
    return w


def _add_tensor(writer: gguf.GGUFWriter, out: Written, name: str, w: np.ndarray, qtype) -> None:
    # llama.cpp keeps 1-D tensors (norms, biases, RoPE factors) in float32, and a row that does not fill whole
    # quantization blocks in float16, as its converter does.
    if w.ndim < 2:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
    data = gguf.quants.quantize(w, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    out.types[qtype.name] = out.types.get(qtype.name, 0) + 1


def write_gguf(model_dir: Path, dest: Path, kind: str, name: str | None = None) -> Written:
    """Write model_dir (a full transformers model) to dest as GGUF of kind (f32, f16, bf16, q8_0), named `name`
    (general.name; the folder's name by default); atomic."""
    model_dir, dest = Path(model_dir), Path(dest)
    config = json.loads((model_dir / "config.json").read_text())
    family = family_of(config, str(model_dir))
    ftype, qtype = WRITTEN_TYPES[kind]
    names = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    # use_temp_file: each tensor goes to a spooled file as it is converted, not into memory until the end (an 8B
    # model in f16 would hold 16 GB).
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[family.arch], use_temp_file=True)
    out = Written(dest)
    try:
        _add_hparams(writer, config, family, ftype, name or model_dir.name, str(model_dir))
        add_tokenizer(writer, model_dir, config["vocab_size"])
        if (factors := llama3_rope_factors(config)) is not None:
            _add_tensor(writer, out, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors, qtype)
        for key, w in _tensors(model_dir):
            if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue  # llama.cpp reads a missing output.weight as tied to token_embd
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"{model_dir}: tensor {key} has no GGUF name for {family.arch.name.lower()}")
            _add_tensor(writer, out, gguf_name, _transform(key, w, config, family), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(dest)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out
