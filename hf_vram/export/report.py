"""What `hf-vram export` and `merge --gguf` print: each file with its types, the Modelfile, and round trips."""

from __future__ import annotations

import json

from hf_vram.export.check import RoundTrip
from hf_vram.export.export import Exported


def _round_trip_line(c: RoundTrip) -> str:
    # Answers as JSON strings: one line each, newlines shown as \n.
    llama = f", llama.cpp {json.dumps(c.llama_cpp_answer)}" if c.llama_cpp_answer is not None else ""
    verdict = "same answer" if c.same_answer and c.tokens_equal else "DIFFERENT"
    return (
        f"round trip {c.gguf}: {verdict}: tokens {'equal' if c.tokens_equal else 'DIFFER'}, max |logit diff| "
        f"{c.max_abs_logit_diff:.4g} (largest logit {c.max_abs_logit:.3g}); greedy: full model {json.dumps(c.answer)}, "
        f"transformers on the GGUF {json.dumps(c.gguf_answer)}{llama}" + "".join(f"; {n}" for n in c.notes)
    )


def report(exported: Exported) -> int:
    """Print the export; exit code 1 when a round trip disagrees (the files are kept for inspection)."""
    for f in exported.files:
        types = ", ".join(f"{k} x{n}" for k, n in f.types.items())
        print(f"wrote {f.path} ({f.path.stat().st_size / 2**20:.1f} MiB; tensors {types})")
    print(f"wrote {exported.modelfile} (Ollama: ollama create NAME -f {exported.modelfile})")
    for c in exported.checks:
        print(_round_trip_line(c))
    return 0 if all(c.same_answer and c.tokens_equal for c in exported.checks) else 1
