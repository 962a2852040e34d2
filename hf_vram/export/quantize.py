"""The GGUF types `export --gguf` offers, and which tool writes each.

f32/f16/bf16/q8_0 are written by the gguf package's own quantizers (gguf_file.py). The gguf package has no
quantizer for the K-quants (gguf 0.19: quants.py raises NotImplementedError for Q4_K and the others), so those are
made by llama.cpp's own llama_model_quantize, through llama-cpp-python (the optional `llama-cpp` extra, which
builds llama.cpp from source), from a 16-bit GGUF written first: what `llama-quantize` does from the command line.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from hf_vram.errors import UserError, did_you_mean
from hf_vram.export.gguf_file import WRITTEN_TYPES

# llama.cpp's file type for each K-quant (llama_ftype in llama.h, LLAMA_FTYPE_MOSTLY_*).
LLAMA_CPP_TYPES = {
    "q2_k": "Q2_K",
    "q3_k_m": "Q3_K_M",
    "q4_k_s": "Q4_K_S",
    "q4_k_m": "Q4_K_M",
    "q5_k_s": "Q5_K_S",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}
KINDS = (*WRITTEN_TYPES, *LLAMA_CPP_TYPES)
LLAMA_CPP_HINT = "pip install 'hf-vram[llama-cpp]' (llama-cpp-python, which builds llama.cpp from source)"


def check_kinds(kinds: list[str]) -> list[str]:
    """The requested types, lower-cased, each known, and the K-quants only where llama.cpp can be imported."""
    out = []
    for kind in kinds:
        key = kind.lower()
        if key not in KINDS:
            raise UserError(f"--gguf {kind}: unknown GGUF type{did_you_mean(key, KINDS)}; known: {', '.join(KINDS)}")
        if key in LLAMA_CPP_TYPES and not llama_cpp_available():
            raise UserError(
                f"--gguf {kind}: a K-quant, made by llama.cpp's quantizer, which is not installed: {LLAMA_CPP_HINT}. "
                f"Without it: {', '.join(WRITTEN_TYPES)}"
            )
        out.append(key)
    return list(dict.fromkeys(out))


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):  # OSError: the package is there but its shared library does not load
        return False
    return True


def llama_cpp_quantize(source: Path, dest: Path, kind: str) -> None:
    """llama.cpp's quantization of a 16-bit GGUF; it falls back to other types for rows that do not fill blocks."""
    import logging

    import llama_cpp

    # llama-cpp-python (0.3) prints every llama.cpp log line, one per tensor here, unless its logger is raised;
    # the types it chose are reported from the written file instead.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_CPP_TYPES[kind]}")
    partial = dest.with_name(f".{dest.name}.partial")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize {source} to {kind} (llama_model_quantize returned {rc})")
    partial.replace(dest)
