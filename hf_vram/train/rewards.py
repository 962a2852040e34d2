"""The reward functions of task grpo (trl's GRPOTrainer calls each as f(prompts, completions, **columns) and
sums their lists of floats with the recipe's weights): verifiable rewards built in, and a user's own function
named `path/to/file.py:name` in the recipe (grpo.rewards), read relative to the recipe file.

Completions arrive as text, or as a list of messages for conversational prompts; the record's answer arrives as
the `answer` column (data_prep/grpo.py)."""

from __future__ import annotations

import importlib.util
import re
from fractions import Fraction
from pathlib import Path

from hf_vram.errors import UserError

# A number as people write it: an optional sign, digits with optional thousands commas, an optional decimal part.
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# What may stand before the final answer on its line (GSM8K's `#### 72`, "The answer is 72", "Answer: 72").
ANSWER_PREFIX = re.compile(r"^(?:####|(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*:?)?\s*", re.IGNORECASE)


def completion_text(completion) -> str:
    """The generated text: as it is, or the content of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def parse_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number in a text, exactly (1,000 = 1000.0 = 1000)."""
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def answer_number(answer: str) -> Fraction | None:
    """A record's answer as a number: what follows GSM8K's `####` when there is one, else its last number."""
    return last_number(answer.rsplit("####", 1)[1] if "####" in answer else answer)


def exact_number(prompts, completions, answer, **_) -> list[float]:
    """1.0 where the completion's last number equals the answer's number, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        expected, got = answer_number(str(a)), last_number(completion_text(c))
        out.append(1.0 if expected is not None and got == expected else 0.0)
    return out


def answer_format(prompts, completions, **_) -> list[float]:
    """1.0 where the completion ends in a line that is just a number (after an optional `####` or "The answer
    is"), so that the answer can be read off it; else 0.0."""
    out = []
    for c in completions:
        lines = [line.strip() for line in completion_text(c).strip().splitlines() if line.strip()]
        last = ANSWER_PREFIX.sub("", lines[-1]).rstrip(".") if lines else ""
        out.append(1.0 if NUMBER.fullmatch(last) else 0.0)
    return out


def length_penalty(max_tokens: int):
    """-(completion tokens / max_tokens): 0 for an empty completion, -1 for one cut at the length limit."""

    def length(prompts, completions, completion_ids=None, **_) -> list[float]:
        if completion_ids is None:  # called without token ids: words stand in for tokens
            completion_ids = [completion_text(c).split() for c in completions]
        return [-min(1.0, len(ids) / max_tokens) for ids in completion_ids]

    return length


def load_user_reward(spec: str, base_dir: Path, key: str):
    """The function `name` of the Python file in `path/to/file.py:name` (relative to base_dir): an error naming
    the recipe key when the file or the function is missing."""
    file, _, name = spec.rpartition(":")
    path = (base_dir / file).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: file '{file}' does not exist (read relative to the recipe: {path})")
    module_spec = importlib.util.spec_from_file_location(f"hf_vram_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a user's file: whatever it raises is theirs to fix
        raise UserError(f"{key}: importing '{file}' failed: {type(e).__name__}: {e}") from None
    func = getattr(module, name, None)
    if not callable(func):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"{key}: '{file}' defines no function '{name}' (it defines: {', '.join(defined) or 'none'})")
    return func


def reward_functions(grpo, base_dir: Path) -> list:
    """The recipe's reward functions in the order of grpo.rewards (their weights go to trl's reward_weights)."""
    builtin = {"exact_number": exact_number, "answer_format": answer_format,
               "length": length_penalty(grpo.max_completion_length)}
    return [builtin[r.builtin] if r.builtin else load_user_reward(r.function, base_dir, f"grpo.rewards.{i}.function")
            for i, r in enumerate(grpo.rewards)]
