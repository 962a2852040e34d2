"""tokenizer section -> a transformers tokenizer: loaded, or trained offline with `tokenizers`."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_vram.recipe.schema import Recipe

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


def load_tokenizer(recipe: Recipe, tokenizer_path: str | None, texts: Iterable[str] | None = None):
    """The recipe's tokenizer, with a pad token (causal LMs often lack one; EOS is the usual stand-in)."""
    if recipe.tokenizer.train:
        if texts is None:
            raise ValueError("training a tokenizer needs the training texts")
        tok = train_bpe(texts, recipe.tokenizer.vocab_size, recipe.data.max_length)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
