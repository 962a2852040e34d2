"""A language-model recipe's tokenizer and tokenized data (data_prep does the work), the same on every rank."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from data_prep.chat import install_chat_template
from data_prep.formats import CHAT_FORMATS
from data_prep.prepare import Prepared, example_texts, load_examples, prepare_dataset
from data_prep.tokenizer import load_tokenizer
from hf_vram.recipe.load import LoadedRecipe


@dataclass
class LMData:
    tokenizer: object
    train: object
    eval: object | None
    counts: dict
    added_token_ids: list[int]  # tokens the chat template added to the vocabulary


def prepare_data(loaded: LoadedRecipe, tokenizer_path: str | None, args=None) -> tuple[object, Prepared, list[int]]:
    """The recipe's tokenizer (chat template installed), its tokenized, cached data, and the ids of tokens the
    chat template added to the vocabulary. Under a launcher the main process trains the tokenizer and fills the
    cache while the others wait, then they load the same files, so every rank has the same vocabulary and a
    resumed run keeps the one its checkpoints were trained with."""
    recipe, out = loaded.recipe, loaded.output_dir
    if recipe.data.streaming:
        from hf_vram.errors import UserError

        raise UserError("data.streaming: streamed records are tokenized as training reads them, so there is no "
                        "preparation to cache; `hf-vram train` reads the stream")
    out.mkdir(parents=True, exist_ok=True)

    def first(desc):
        return args.main_process_first(local=False, desc=desc) if args is not None else nullcontext()

    examples = load_examples(recipe.data, recipe.train.seed)
    tokenizer_dir = out / "tokenizer-trained"
    with first("tokenizer"):
        if recipe.tokenizer.train and (tokenizer_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            tokenizer = load_tokenizer(recipe, tokenizer_path, example_texts(examples.train))
            if recipe.tokenizer.train:
                tokenizer.save_pretrained(tokenizer_dir)
    added: list[str] = []
    if recipe.data.format in (*CHAT_FORMATS, "preference", "unpaired"):
        added = install_chat_template(tokenizer, recipe.data.chat_template)
    with first("dataset"):
        prepared = prepare_dataset(examples, tokenizer, recipe.data, out / "prepared")
    if examples.sources:
        # A mixture's samples per source and split: printed by `hf-vram prepare`, kept in train_summary.json's
        # data counts, and listed in the model card.
        prepared.counts["sources"] = examples.sources
    return tokenizer, prepared, tokenizer.convert_tokens_to_ids(added)


def refuse_corpus_mixture(recipe) -> None:
    """Token shards are cut from one corpus: a mixture (data.sources) is read by task sft only."""
    if recipe.data.sources:
        from hf_vram.errors import UserError

        raise UserError("data.sources: task pretrain reads one corpus (data.source); mixtures are for task sft")


def examples_data(loaded: LoadedRecipe, tokenizer_path: str | None, args) -> LMData:
    """Instructions, chats or preference pairs (sft, dpo); streamed records (data.streaming)."""
    if loaded.recipe.data.streaming:
        return streamed_data(loaded, tokenizer_path)
    tokenizer, prepared, added = prepare_data(loaded, tokenizer_path, args)
    return LMData(tokenizer, prepared.train, prepared.eval, prepared.counts, added)


def streamed_data(loaded: LoadedRecipe, tokenizer_path: str | None) -> LMData:
    """The recipe's tokenizer and its records as IterableDatasets, tokenized as training reads them
    (data_prep/streaming.py). Every rank reads the stream itself: there is no cache to fill first. The tokenizer is
    a named one (the schema refuses tokenizer.train with streaming), so every rank loads the same vocabulary."""
    from data_prep.streaming import tokenized_stream

    recipe = loaded.recipe
    tokenizer = load_tokenizer(recipe, tokenizer_path)
    added: list[str] = []
    if recipe.data.format in CHAT_FORMATS:
        added = install_chat_template(tokenizer, recipe.data.chat_template)
    train = tokenized_stream(recipe.data, tokenizer, recipe.train.seed)
    # Held-out samples are evaluated in the source's order: the same ones before and after training.
    held = (tokenized_stream(recipe.data, tokenizer, recipe.train.seed, recipe.data.eval_split, shuffle=False)
            if recipe.data.eval_split else None)
    # No counts: they would take a pass over the whole stream.
    counts = {"streaming": True, "shuffle_buffer": recipe.data.shuffle_buffer}
    return LMData(tokenizer, train, held, counts, tokenizer.convert_tokens_to_ids(added))


def corpus_data(loaded: LoadedRecipe, tokenizer_path: str | None, args) -> LMData:
    """Token shards of a pretraining corpus, written by the main process while the others wait."""
    from data_prep.corpus import prepare_corpus

    refuse_corpus_mixture(loaded.recipe)
    corpus = prepare_corpus(loaded.recipe, loaded.output_dir, tokenizer_path,
                            lambda desc: args.main_process_first(local=False, desc=desc))
    return LMData(corpus.tokenizer, corpus.train, corpus.eval, corpus.counts, [])
