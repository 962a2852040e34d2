"""Data the project generates itself, so the default demo runs offline with nothing downloaded.

`arithmetic`: sums of two numbers from 0 to 9. As `format: text` it is a pretraining corpus stating every
sum in several phrasings, questions and answers among them (the knowledge); as `format: alpaca` it is
instructions ("What is 3 + 4?" -> "7") on a fixed 80% of the sums, with the other 20% held out for scoring.
The Alpaca prompt layout never occurs in the corpus, so a base model does not answer in it; a model that
learned the facts in pretraining and the layout in fine-tuning answers the held-out questions. The score is
exact match.
"""

from __future__ import annotations

import random
from collections.abc import Callable

MAX_OPERAND = 9
PHRASINGS = (
    "{a} + {b} = {c}",
    "{a} plus {b} is {c}.",
    "the sum of {a} and {b} is {c}.",
    "Q: What is {a} + {b}?\nA: {c}",
    "What is {a} + {b}?\n{c}",
    "question: what is {a} plus {b}?\nanswer:\n{c}",
    "### {q}:\nWhat is {a} + {b}?\n\n### {r}:\n{c}",
)
# Markdown headings of the question/answer documents. The instruction template's "### Instruction:" and
# "### Response:" are not among them: the base never sees that layout, the fine-tune teaches it.
HEADINGS = (("Question", "Answer"), ("Query", "Reply"), ("Problem", "Solution"), ("Input", "Output"), ("Task", "Result"))
QUESTIONS = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.")


def _facts() -> list[tuple[int, int, int]]:
    return [(a, b, a + b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def _split_facts() -> dict[str, list[tuple[int, int, int]]]:
    facts = _facts()
    random.Random(1234).shuffle(facts)
    n_test = len(facts) // 5
    return {"test": sorted(facts[:n_test]), "train": sorted(facts[n_test:])}


class ArithmeticTask:
    description = "sums of two numbers 0-9: a pretraining text corpus, or alpaca instructions with a held-out test split"

    def records(self, fmt: str, split: str = "train", n_docs: int = 12000, seed: int = 0) -> list[dict]:
        if fmt == "text":
            # Knowledge of every sum, train and test alike: the fine-tune must only teach the answer format.
            # One statement per document, so that an answer is followed by end-of-text as in the fine-tune.
            rng = random.Random(seed)
            sentences = [
                p.format(a=a, b=b, c=c, q=q, r=r) for a, b, c in _facts() for p in PHRASINGS for q, r in HEADINGS
            ]
            return [{"text": rng.choice(sentences)} for _ in range(n_docs)]
        if fmt == "alpaca":
            facts = _split_facts()[split] if split in ("train", "test") else None
            if facts is None:
                raise ValueError(f"builtin:arithmetic has splits train and test, not '{split}'")
            questions = QUESTIONS if split == "train" else QUESTIONS[:1]
            return [
                {"instruction": q.format(a=a, b=b), "input": "", "output": str(c)}
                for a, b, c in facts
                for q in questions
            ]
        raise ValueError(f"builtin:arithmetic supports format text or alpaca, not '{fmt}'")

    def score(self, generate: Callable[[list[str]], list[str]], prompt_of: Callable[[dict], str], n: int) -> dict:
        """Exact-match accuracy of the first line generated for n held-out questions."""
        tests = self.records("alpaca", "test")[:n]
        answers = generate([prompt_of(r) for r in tests])
        correct = sum(ans.strip().split("\n")[0].strip() == r["output"] for ans, r in zip(answers, tests))
        return {"accuracy": correct / len(tests), "correct": correct, "total": len(tests)}


class SkillText:
    """A small generated corpus of one skill (format: text only), in a few phrasings: the tiny dense experts of
    the MoE assembly demo each learn one, so that a router has something to tell apart."""

    def __init__(self, description: str, make: Callable[[int, int], list[str]]):
        self.description = description
        self._make = make

    def records(self, fmt: str, split: str = "train", n_docs: int = 4000, seed: int = 0) -> list[dict]:
        if fmt != "text":
            raise ValueError(f"this builtin source supports format text only, not '{fmt}'")
        rng = random.Random(seed)
        sentences = [t for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) for t in self._make(a, b)]
        return [{"text": rng.choice(sentences)} for _ in range(n_docs)]


BUILTIN_SOURCES = {
    "arithmetic": ArithmeticTask(),
    "products": SkillText("products of two numbers 0-9 as text",
                          lambda a, b: [f"{a} times {b} is {a * b}.", f"{a} * {b} = {a * b}"]),
    "differences": SkillText("differences of two numbers 0-9 as text",
                             lambda a, b: [f"{a + b} minus {b} is {a}.", f"{a + b} - {b} = {a}"]),
    "counting": SkillText("counting up from a number as text",
                          lambda a, b: [f"count from {a}: " + " ".join(str(a + i) for i in range(2 + b % 5)) + "."]),
}
