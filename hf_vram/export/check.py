"""The round trip that checks an export: transformers loads the GGUF (`gguf_file=`) and must give the full model's
greedy answer with close logits; where llama-cpp-python is installed, llama.cpp's greedy tokens must equal
transformers' on the same prompt ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RoundTrip:
    gguf: str
    tokens_equal: bool  # the GGUF's tokenizer (rebuilt by transformers from the metadata) encodes the prompt alike
    max_abs_logit_diff: float  # over every position of the prompt, against the full model in float32
    max_abs_logit: float
    answer: str  # the full model's greedy answer
    gguf_answer: str  # transformers on the GGUF
    llama_cpp_answer: str | None = None  # llama.cpp on the GGUF, when installed
    notes: list[str] = field(default_factory=list)

    @property
    def same_answer(self) -> bool:
        return self.answer == self.gguf_answer and self.llama_cpp_answer in (None, self.answer)


def _greedy(model, ids, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def llama_cpp_greedy(gguf_path: Path, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of token ids (no sampling: top_k 1 at temperature 0)."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(len(ids) + n, 32), verbose=False, seed=0)
    out: list[int] = []
    try:
        for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in eos or len(out) >= n:
                break
            out.append(token)
    finally:
        model.close()  # now, not in __del__ at interpreter exit, where llama-cpp-python 0.3 raises on its freed library
    return out


@dataclass
class Reference:
    """The full model's side of every round trip, computed once: its tokens, logits and greedy answer."""

    tokenizer: object
    prompt: str
    ids: list[int]
    logits: object  # torch.Tensor, float32
    answer: list[int]
    eos: set[int]
    max_new_tokens: int


def reference(model_dir: Path, prompt: str, max_new_tokens: int) -> Reference:
    """The full model in float32 on the prompt; the model itself is let go before any GGUF loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    answer = _until_eos(_greedy(model, ids, max_new_tokens), eos)
    return Reference(tokenizer, prompt, ids, logits, answer, eos, max_new_tokens)


def round_trip(ref: Reference, gguf_path: Path) -> RoundTrip:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_vram.export.quantize import llama_cpp_available

    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(torch.tensor([ref.ids])).logits
    decode = ref.tokenizer.decode
    result = RoundTrip(
        gguf=name,
        tokens_equal=gguf_tokenizer(ref.prompt)["input_ids"] == ref.ids,
        max_abs_logit_diff=float((ref.logits - logits).abs().max()),
        max_abs_logit=float(ref.logits.abs().max()),
        answer=decode(ref.answer),
        gguf_answer=decode(_until_eos(_greedy(loaded, ref.ids, ref.max_new_tokens), ref.eos)),
    )
    if llama_cpp_available():
        result.llama_cpp_answer = decode(llama_cpp_greedy(Path(gguf_path), ref.ids, ref.max_new_tokens, ref.eos))
    else:
        result.notes.append("llama.cpp not checked: llama-cpp-python is not installed")
    return result
