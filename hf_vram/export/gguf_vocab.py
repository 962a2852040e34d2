"""The tokenizer as GGUF metadata: tokens and their types, merges, special ids, the chat template, the pre-tokenizer.

gguf's SpecialVocab reads the merges, special token ids and chat template from the saved tokenizer files, as
llama.cpp's converter does. What it leaves to the converter is written here: the token list with its types, the
name of the pre-tokenizer (llama.cpp's converter recognises it by hashing sample encodings against a table of
known models; a fine-tune keeps its base's regex, so it is matched here by the regex itself), and whether BOS/EOS
are added, measured on the tokenizer rather than guessed from its files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from hf_vram.errors import UserError

# llama.cpp's names for the byte-level BPE pre-tokenizers of the supported families; the regexes are read from
# transformers' GGUF loader (the side that has to split text the same way when the file is loaded back).
PRE_TOKENIZER_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


def _split_regexes() -> dict[str, str]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return {GGUF_PRE_TOKENIZER_SPLITS[name]: name for name in reversed(PRE_TOKENIZER_NAMES)}


def pre_tokenizer_name(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"  # GPT-2's own regex, inside the ByteLevel step
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _split_regexes():
            return _split_regexes()[regex]
    raise UserError(
        f"{where}/tokenizer.json: its pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp names here "
        f"(GPT-2's, or the regex of {', '.join(PRE_TOKENIZER_NAMES)}), so llama.cpp would split text differently "
        "from training"
    )


def _token_list(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    ids: dict[int, str] = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in ids}
    for added in tokenizer_json.get("added_tokens", []):
        ids[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(ids) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(ids)} but the model only {vocab_size} embedding rows")
    # Rows past the tokenizer (a vocabulary padded to a multiple) get placeholders, as llama.cpp's converter writes.
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return tokens, kinds


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id and len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"])


def _spm_style(tokenizer_json: dict) -> bool:
    """A SentencePiece vocabulary as transformers saves it (Llama 2, Mistral 7B, Gemma): BPE with byte fallback, spaces
    as the "▁" piece marker (written by a Metaspace pre-tokenizer, or by the normalizer of older files)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    normalizer = json.dumps(tokenizer_json.get("normalizer") or {}, ensure_ascii=False)
    return bool(tokenizer_json["model"].get("byte_fallback")) and (pre.get("type") == "Metaspace" or "▁" in normalizer)


def _spm_prefix(tokenizer_json: dict) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return "Prepend" in json.dumps(tokenizer_json.get("normalizer") or {})


def _add_spm(writer: gguf.GGUFWriter, tokenizer_json: dict, vocab_size: int) -> None:
    """llama.cpp's SentencePiece tokenizer ("llama"): it merges the pair whose result scores highest, where
    transformers' BPE takes the merge listed first. SentencePiece's BPE scores fall with the piece id, and the
    merges transformers saves are in that order, so the score written is minus the id (the file's own
    tokenizer.model scores, which llama.cpp's converter reads, are not saved by transformers 5)."""
    tokens, kinds = _token_list(tokenizer_json, vocab_size)
    unk = tokenizer_json["model"].get("unk_token")
    for i, token in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kinds[i] = int(gguf.TokenType.BYTE)
        elif token == unk:
            kinds[i] = int(gguf.TokenType.UNKNOWN)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0 if k != gguf.TokenType.NORMAL else -float(i) for i, k in enumerate(kinds)])
    writer.add_token_types(kinds)
    writer.add_add_space_prefix(_spm_prefix(tokenizer_json))


def _add_byte_level(writer: gguf.GGUFWriter, tokenizer_json: dict, vocab_size: int, where: str) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json, where))
    tokens, kinds = _token_list(tokenizer_json, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json, which the GGUF export reads the vocabulary from")
    tokenizer_json = json.loads(path.read_text())
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} tokenizer: the GGUF export reads BPE tokenizers (byte-level, as "
                        "Llama 3, Qwen and GPT-2's; or SentencePiece's, as Llama 2 and Mistral 7B's)")
    if _spm_style(tokenizer_json):
        _add_spm(writer, tokenizer_json, vocab_size)
    elif model.get("byte_fallback"):
        raise UserError(f"{path}: BPE with byte fallback but without SentencePiece's space marker: no llama.cpp form")
    else:
        _add_byte_level(writer, tokenizer_json, vocab_size, str(model_dir))
    # Merges too for SentencePiece: llama.cpp reads the scores, transformers' GGUF loader the merges.
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special.add_special_token = {
        "bos": _adds(tokenizer, tokenizer.bos_token_id, first=True),
        "eos": _adds(tokenizer, tokenizer.eos_token_id, first=False),
    }
    special.add_to_gguf(writer, quiet=True)
