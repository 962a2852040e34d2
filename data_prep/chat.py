"""Chat templates, and conversations -> text segments marked trained or not.

The mask comes from the template itself, whatever it is: for each assistant turn k the conversation is
rendered up to turn k with the generation prompt, then through turn k; the text between the two renders is
the answer (content plus the template's end-of-turn marker), and every such stretch is trained. This needs
no `{% generation %}` markers, so stock templates (Llama-3, Qwen2.5, Mistral) train every assistant turn
as they are. Tokenizers without a template get one supplied here, saved with the output so that inference
(`pipeline` with chat messages) uses the layout the model was trained on.
"""

from __future__ import annotations

from data_prep.errors import DataError

# "### User:" / "### Assistant:" turns, each answer ended by EOS: needs no new tokens, stops generation at the
# end of an answer. The generation markers let transformers' return_assistant_tokens_mask work with it too.
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    # (transformers renders templates with trim_blocks: a newline right after a block tag is dropped, hence '\n\n'
    # as an expression here.)
    "{% else %}### Assistant:\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def install_chat_template(tokenizer, choice: str) -> list[str]:
    """Give the tokenizer the recipe's chat template; returns the tokens added to its vocabulary (chatml on a
    vocabulary without <|im_start|>/<|im_end|>): the caller resizes the model's embeddings for them."""
    if choice == "auto":
        if getattr(tokenizer, "chat_template", None):
            return []
        choice = "plain"
    if choice == "plain":
        tokenizer.chat_template = PLAIN_TEMPLATE
        return []
    if choice != "chatml":  # a template given in the recipe
        tokenizer.chat_template = choice
        return []
    vocab = tokenizer.get_vocab()
    added = [t for t in CHATML_TOKENS if t not in vocab]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return added


def _render(tokenizer, turns, add_generation_prompt: bool, where: str) -> str:
    messages = [{"role": r, "content": c} for r, c in turns]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception(...)
        raise DataError(
            f"{where}: the chat template refuses this conversation ({type(e).__name__}: {e}); fix the record, or set "
            "data.chat_template: plain or chatml (some model templates require alternating user/assistant turns)"
        ) from None


def render_chat(tokenizer, turns: list[tuple[str, str]], where: str) -> list[tuple[str, bool]]:
    """A conversation as (text, trained) segments: every assistant turn trained, the rest not."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, (role, _) in enumerate(turns):
        # An answer with nothing before it (a conversation opened by the assistant) has no prompt to learn from:
        # it stays as untrained context.
        if role != "assistant" or k == 0:
            continue
        prompt = _render(tokenizer, turns[:k], True, where)
        full = _render(tokenizer, turns[: k + 1], False, where)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn (turn {k} changes the "
                "text before it), so the answers cannot be located; set data.chat_template: plain or chatml"
            )
        answer = full[len(prompt) :]
        # The template's separator after the end-of-turn marker is layout, not part of the answer.
        body = answer.rstrip()
        segments += [(prompt[len(done) :], False), (body, True), (answer[len(body) :], False)]
        done = full
    rest = _render(tokenizer, turns, False, where)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [s for s in segments if s[0]]
