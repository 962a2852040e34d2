"""tokenizer section -> a transformers tokenizer: loaded, or trained offline with `tokenizers`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_bpe(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on the recipe's own text; transformers has no trainer for a
    tokenizer from nothing, so this is the `tokenizers` library's trainer wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIALS)


def train_char(texts: Iterable[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """One token per distinct character, as nanoGPT's shakespeare_char: the specials first, then the characters
    in sorted order (so the ids do not depend on the order the text is read in). Unseen characters map to <unk>.

    `tokenizers` has no character-level model or trainer, so the vocabulary is counted here and given to a
    WordLevel model: a pre-tokenizer isolates every character (newlines included) into its own word and the Fuse
    decoder joins tokens back without the spaces a WordLevel decoder would put between words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(SPECIALS.values())}
    for ch in sorted(chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk_token"]))
    # [\s\S] matches any one character, line breaks too (Oniguruma's "." stops at "\n").
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # No normalizer and no clean-up on decode: every character, spacing included, must come back as it was.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, clean_up_tokenization_spaces=False, **SPECIALS
    )


def load_tokenizer(recipe: Any, tokenizer_path: str | None, texts: Iterable[str] | None = None):
    """The recipe's tokenizer, with a pad token (causal LMs often lack one; EOS is the usual stand-in).

    `recipe` is read by attribute only (a validated recipe, or any object of that shape):
    recipe.tokenizer.train, .kind ("char", else BPE), .vocab_size, and recipe.data.max_length."""
    if recipe.tokenizer.train:
        if texts is None:
            raise ValueError("training a tokenizer needs the training texts")
        if recipe.tokenizer.kind == "char":
            tok = train_char(texts, recipe.data.max_length)
        else:
            tok = train_bpe(texts, recipe.tokenizer.vocab_size, recipe.data.max_length)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
