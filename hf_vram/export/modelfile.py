"""An Ollama Modelfile beside the GGUF: FROM, the prompt TEMPLATE the model was trained with, its stop tokens.

Ollama's templates are Go templates; a Hugging Face chat template is Jinja. No package translates one into the
other, and Ollama only recognises a list of well-known chat templates by itself, so a fine-tune's template is
translated here by rendering it: the chat template renders one exchange whose system, user and assistant texts are
sentinels, and the text between them becomes the Go template around {{ .System }}, {{ .Prompt }} and
{{ .Response }} (Ollama's single-turn form, which it repeats for every turn of a conversation).
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_vram.errors import UserError

# The longest num_ctx written (the model's own context when shorter).
MAX_NUM_CTX = 8192
SYSTEM, PROMPT, RESPONSE = "\x00SYSTEM\x00", "\x00PROMPT\x00", "\x00RESPONSE\x00"


def _go_literal(text: str) -> str:
    # "{{" opens an action in Go templates; a literal one is written as an action that prints it.
    return text.replace("{{", '{{ "{{" }}')


def _render(tokenizer, system: bool) -> str:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    messages += [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def chat_template_as_go(tokenizer) -> str:
    """The chat template of `tokenizer` as an Ollama TEMPLATE (one exchange: system, prompt, response)."""
    plain = _render(tokenizer, system=False)
    try:
        with_system = _render(tokenizer, system=True)
    except Exception:  # templates that refuse a system role (Gemma's raise) render the exchange without one
        with_system = None
    head, rest = plain.split(PROMPT)
    between, tail = rest.split(RESPONSE)
    body = f"{{{{ .Prompt }}}}{_go_literal(between)}{{{{ .Response }}}}{_go_literal(tail)}"
    if with_system is None or SYSTEM not in with_system:
        return _go_literal(head) + body
    system_head, system_rest = with_system.split(PROMPT)
    if system_rest != rest:
        raise UserError("the chat template renders the user and assistant turns differently after a system message; "
                        "it has no single Ollama TEMPLATE")
    system_head = _go_literal(system_head).replace(SYSTEM, "{{ .System }}")
    return f"{{{{ if .System }}}}{system_head}{{{{ else }}}}{_go_literal(head)}{{{{ end }}}}{body}"


def _template(model_dir: Path, tokenizer) -> str | None:
    """The prompt layout of training: the recipe's Alpaca template, or the saved chat template; None for text.
    The Alpaca layout comes from the same place `hf-vram generate` wraps its prompts (generate.prompt_for)."""
    from hf_vram.generate import prompt_for

    laid_out = prompt_for(model_dir, PROMPT)
    if isinstance(laid_out, str) and laid_out != PROMPT:
        return _go_literal(laid_out).replace(PROMPT, "{{ .Prompt }}") + "{{ .Response }}"
    if tokenizer.chat_template:
        return chat_template_as_go(tokenizer)
    return None


def stop_texts(model_dir: Path, tokenizer) -> list[str]:
    """The texts of the tokens generation stops at: generation_config's EOS ids (end-of-turn included) and EOS."""
    config = Path(model_dir) / "generation_config.json"
    ids = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    ids = ids if isinstance(ids, list) else [ids]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    return list(dict.fromkeys(tokenizer.decode([i]) for i in ids))


def modelfile_text(gguf_name: str, model_dir: Path, context_length: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    template = _template(model_dir, tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_texts(model_dir, tokenizer)]
    # Ollama allocates the KV cache of num_ctx tokens up front, so the model's whole context (128k for Llama 3.1)
    # would not fit a 12 GB card beside the weights; 8192 tokens of an 8B Llama 3 is 1 GiB in f16.
    lines.append(f"PARAMETER num_ctx {min(context_length, MAX_NUM_CTX)}")
    return "\n".join(lines) + "\n"
