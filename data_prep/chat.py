"""Chat templates, and conversations -> text segments marked trained or not.

The mask comes from the template itself, whatever it is: for each assistant turn k the conversation is
rendered up to turn k with the generation prompt, then through turn k; the text between the two renders is
the answer (content plus the template's end-of-turn marker), and every such stretch is trained. This needs
no `{% generation %}` markers, so stock templates (Llama-3, Qwen2.5, Mistral) train every assistant turn
as they are. Tokenizers without a template get one supplied here, saved with the output so that inference
(`pipeline` with chat messages) uses the layout the model was trained on.

Tool calls and reasoning go to the template as transformers documents them: `tools=` beside the messages, an
assistant message's `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]), role `tool` for a
result, `reasoning_content` (or `thinking`, whichever the template reads) for a turn's reasoning. A template whose
source never mentions `tools` (plain, chatml, most base-model templates) gets the tool layout of Hermes / Qwen2.5
instead, as text:
  tools        appended to the system turn (one made when there is none): "# Tools" and a <tools></tools> block
               holding one JSON schema a line
  a call       the assistant's text, then <tool_call>{"name": ..., "arguments": {...}}</tool_call> (one a line)
  a result     a user turn <tool_response>...</tool_response> (results in a row share one turn)
Reasoning has no such fallback: a template that does not render it would drop it, so it is refused.
"""

from __future__ import annotations

import json

from data_prep.errors import DataError
from data_prep.formats import Turn

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


TOOLS_HEADER = "# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n"


def _template_reads(tokenizer, *names: str) -> str | None:
    """The first of names that the tokenizer's chat template source mentions (the feature test used here)."""
    source = str(getattr(tokenizer, "chat_template", None) or "")
    return next((n for n in names if n in source), None)


def _message(turn, reasoning_key: str | None) -> dict:
    role, text = turn
    message = {"role": role, "content": text}
    if getattr(turn, "calls", ()):
        message["tool_calls"] = [
            {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}, **({"id": c["id"]} if "id" in c else {})}
            for c in turn.calls
        ]
    if getattr(turn, "reasoning", ""):
        message[reasoning_key] = turn.reasoning
    for key, attr in (("name", "name"), ("tool_call_id", "call_id")):
        if getattr(turn, attr, None):
            message[key] = getattr(turn, attr)
    return message


def _as_text(turns: list, tools: list | None) -> list[Turn]:
    """The Hermes-style text layout of tool calls, results and schemas, for templates that know no tools."""
    out: list[Turn] = []
    after_result = False
    for turn in turns:
        role, text = turn
        if getattr(turn, "calls", ()):
            calls = [{"name": c["name"], "arguments": c["arguments"]} for c in turn.calls]
            blocks = [f"<tool_call>{json.dumps(c, ensure_ascii=False)}</tool_call>" for c in calls]
            text = "\n".join([text, *blocks] if text else blocks)
        if role == "tool":
            text, role = f"<tool_response>{text}</tool_response>", "user"
            if after_result:  # the results of one round of calls share a turn
                text = out.pop()[1] + "\n" + text
        after_result = turn[0] == "tool"
        out.append(Turn(role, text, reasoning=getattr(turn, "reasoning", ""), train=getattr(turn, "train", None)))
    if tools:
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = f"{TOOLS_HEADER}<tools>\n{schemas}\n</tools>"
        if out[0][0] == "system":
            out[0] = Turn("system", f"{out[0][1]}\n\n{block}")
        else:
            out.insert(0, Turn("system", block))
    return out


def _prepare(tokenizer, turns: list, where: str) -> tuple[list, list | None, str | None]:
    """(turns as the template will take them, tools for apply_chat_template, the key reasoning goes under)."""
    tools = turns[0].tools if turns and turns[0][0] == "tools" else None
    turns = turns[1:] if tools else list(turns)
    reasoned = next((t for t in turns if getattr(t, "reasoning", "")), None)
    key = _template_reads(tokenizer, "reasoning_content", "thinking")
    if reasoned is not None and key is None:
        raise DataError(
            f"{where}: field '{reasoned.where}' holds reasoning, which this chat template does not render (its "
            "source mentions neither reasoning_content nor thinking); use a model whose template renders it "
            "(Qwen3, DeepSeek-R1), give data.chat_template one that does, or drop the field from the records"
        )
    uses_tools = tools or any(getattr(t, "calls", ()) or t[0] == "tool" for t in turns)
    if uses_tools and not _template_reads(tokenizer, "tools"):
        return _as_text(turns, tools), None, key
    return turns, tools, key


def _render(tokenizer, turns, add_generation_prompt: bool, where: str, tools=None, reasoning_key=None) -> str:
    messages = [_message(t, reasoning_key) for t in turns]
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception(...)
        raise DataError(
            f"{where}: the chat template refuses this conversation ({type(e).__name__}: {e}); fix the record, or set "
            "data.chat_template: plain or chatml (some model templates require alternating user/assistant turns)"
        ) from None


def render_chat(tokenizer, turns: list[tuple[str, str]], where: str) -> list[tuple[str, bool]]:
    """A conversation as (text, trained) segments: every assistant turn trained (but those whose loss_weight / train
    masks them), the rest not."""
    turns, tools, key = _prepare(tokenizer, turns, where)

    def render(upto: int, prompt: bool) -> str:
        return _render(tokenizer, turns[:upto], prompt, where, tools, key)

    segments: list[tuple[str, bool]] = []
    done = ""
    for k, turn in enumerate(turns):
        # An answer with nothing before it (a conversation opened by the assistant) has no prompt to learn from:
        # it stays as untrained context.
        if turn[0] != "assistant" or k == 0:
            continue
        prompt, full = render(k, True), render(k + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                f"{where}: the chat template does not render this conversation turn by turn (turn {k} changes the "
                "text before it), so the answers cannot be located; set data.chat_template: plain or chatml"
            )
        answer = full[len(prompt) :]
        # The template's separator after the end-of-turn marker is layout, not part of the answer.
        body = answer.rstrip()
        trained = getattr(turn, "train", None) is not False
        segments += [(prompt[len(done) :], False), (body, trained), (answer[len(body) :], False)]
        done = full
    rest = render(len(turns), False)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [s for s in segments if s[0]]
