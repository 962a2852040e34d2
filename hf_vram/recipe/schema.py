"""The recipe schema: small nested sections with strict keys. Each field's comment is its documentation.

Defaults suit a 12 GB card. An unknown key anywhere is an error (extra="forbid"), never a silent no-op.
Types are checked in pydantic's lax mode so that YAML's `lr: 1e-4` (a string to YAML 1.1) and
command-line overrides (`train.lr=1e-4`) still read as numbers; two things lax mode lets through are refused:
a boolean where a number goes (`adapter.r: true` would be r 1) and a float that is inf or nan.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hf_vram.builders.diffusion_archs import ARCHS, conditioning_problem

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Upper bounds of sizes that need no model to check: far above any real run, low enough that a typo (an extra
# group of zeros, a number pasted under the wrong key) is caught here instead of as an out-of-memory error or a
# plan of a model that cannot exist. Sizes that depend on the model (a LoRA rank against the layer widths, the
# sequence length against a position table) are checked against its config in model_checks.py.
# 65,536: LoRA ranks, micro-batches, gradient accumulation and prompt lengths (the widest layers of released
# models are under 65,536 wide; a micro-batch that large holds more sequences than any GPU can).
MAX_COUNT = 65536
# 2**24 = 16,777,216 tokens: sequence lengths and generated tokens (above the longest contexts of released
# models, 10M tokens).
MAX_TOKENS = 2**24
# 2**21 = 2,097,152: a trained tokenizer's vocabulary (released vocabularies stop at 262,144).
MAX_VOCAB = 2**21


def _leaves(annotation: Any) -> list[Any]:
    """The members of a field type, unions and Literals flattened (`Literal[4, 8] | None` -> [4, 8, NoneType])."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [annotation]


def _number_not_bool(annotation: Any) -> bool:
    """A field type that takes numbers (int, float, or Literal numbers) and has no place for a boolean."""
    leaves = _leaves(annotation)
    if any(leaf is bool or leaf is Any or isinstance(leaf, bool) for leaf in leaves):
        return False
    return any(leaf in (int, float) or type(leaf) in (int, float) for leaf in leaves)


def _non_finite(value: Any, path: str, parents: tuple[int, ...] = ()) -> str | None:
    """The key path of the first inf or nan float inside a nested value (model.config), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if not isinstance(value, dict | list):
        return None
    if id(value) in parents:
        raise ValueError(f"{path}: holds itself (a recursive YAML alias, `&a {{x: *a}}`): write the values out")
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        found = _non_finite(item, f"{path}.{key}", (*parents, id(value)))
        if found:
            return found
    return None


class Section(BaseModel):
    # allow_inf_nan=False: no float field takes inf or nan (YAML's .inf and .nan, an override's train.lr=inf):
    # a learning rate, a dropout or a warmup that is not a number trains to nan or never ends.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax mode reads true as 1 and false as 0 for an int, float or Literal[1, 3] field (adapter.r: true would
        # train at rank 1), and YAML reads an override's `adapter.r=true` as a boolean too.
        if isinstance(value, bool) and _number_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"got {str(value).lower()}, a boolean where a number goes (true and false are not read "
                             "as 1 and 0): write the number")
        return value


class ModelSection(Section):
    # Pretrained weights: a Hub id, a local directory, or `recipe:NAME` (that recipe's output, trained first
    # when missing). Leave empty to build a new model from `arch` + `config`.
    name_or_path: str | None = None
    # From scratch: a transformers model_type (llama, gpt2, mistral, mixtral, mamba, ...).
    arch: str | None = None
    # From scratch: fields of that model type's config class (unknown fields are an error).
    config: dict[str, Any] = Field(default_factory=dict)
    # Dtype of a pretrained base loaded without quantization under an adapter; auto = bf16 on GPUs that have it,
    # else fp32. Weights trained in full stay fp32 (mixed precision runs the matmuls in bf16/fp16).
    dtype: Dtype = "auto"
    # Attention kernel; sdpa is torch's fused attention and works everywhere.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"

    @field_validator("config")
    @classmethod
    def _finite_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Its values are free-form (checked by the config class later), so allow_inf_nan does not reach them.
        found = _non_finite(value, "model.config")
        if found:
            raise ValueError(f"{found}: not a finite number (inf and nan are not allowed): write a number")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if bool(self.name_or_path) == bool(self.arch):
            raise ValueError("model.name_or_path: set exactly one of name_or_path (pretrained) or arch (from scratch)")
        if self.config and not self.arch:
            raise ValueError("model.config: applies only to a model built from scratch (model.arch)")
        return self


class TokenizerSection(Section):
    # Where to load the tokenizer from; empty = the model's own (model.name_or_path).
    name_or_path: str | None = None
    # Train a new byte-level BPE tokenizer on the recipe's training text (offline, with `tokenizers`).
    train: bool = False
    # Kind of trained tokenizer: bpe = byte-level BPE (GPT-2's scheme); char = one token per character
    # (nanoGPT's shakespeare_char; vocab_size is then the number of distinct characters).
    kind: Literal["bpe", "char"] = "bpe"
    # Vocabulary size of a trained BPE tokenizer (special tokens included).
    vocab_size: int = Field(8000, ge=260, le=MAX_VOCAB)
    # task pretrain: documents of the training data the tokenizer is trained on (the first ones).
    train_documents: int = Field(20000, ge=1)


class QuantSection(Section):
    # Load the base quantized by bitsandbytes: 4 (QLoRA) or 8 bits; empty = no quantization.
    bits: Literal[4, 8] | None = None
    # 4-bit data type: nf4 (normal float, the QLoRA paper's) or fp4.
    type: Literal["nf4", "fp4"] = "nf4"
    # Quantize the 4-bit block scales too (saves about 0.4 bit per parameter).
    double_quant: bool = True
    # Dtype of the matmuls on dequantized weights; auto = bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Dtype of the weights bitsandbytes leaves unquantized (embeddings, lm_head, norms): compute = compute_dtype
    # (bf16 on GPUs: half the memory of a 128k-vocabulary head); float32 = peft's prepare_model_for_kbit_training default.
    unquantized_dtype: Literal["compute", "float32"] = "compute"


class AdapterSection(Section):
    # What is trained (peft): none = every weight (full fine-tune); lora = low-rank adapters; dora = LoRA with a
    # learned magnitude per output (DoRA); rslora = LoRA scaled by alpha/sqrt(r), steadier at high ranks;
    # llama-adapter = learned prompts with zero-init gates in the top layers (peft's adaption prompt, Llama/Mistral).
    type: Literal["none", "lora", "dora", "rslora", "llama-adapter"] = "none"
    # LoRA rank.
    r: int = Field(16, ge=1, le=MAX_COUNT)
    # LoRA scaling numerator (scale = alpha / r).
    alpha: int = Field(32, ge=1)
    # Dropout on the adapter input.
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Which linear layers get an adapter: all-linear, or a list of module names (q_proj, v_proj, ...).
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # llama-adapter: learned prompt tokens per adapted layer.
    prompt_length: int = Field(10, ge=1, le=MAX_COUNT)
    # llama-adapter: how many of the top layers get a prompt.
    prompt_layers: int = Field(30, ge=1)


class ImageSection(Section):
    # task diffusion: images are resized so that their short side is `resolution`, then cropped square.
    resolution: int = Field(64, ge=8)
    # Crop the centre (else a random square, a mild augmentation).
    center_crop: bool = True
    # Flip half of the images left-right (augmentation; off for digits and text, whose mirror images differ).
    random_flip: bool = False
    # Colour channels the model sees: 3 (RGB) or 1 (grayscale).
    channels: Literal[1, 3] = 3
    # Column holding the image (Hub datasets and imagefolder: "image"; CIFAR-10 on the Hub: "img").
    image_field: str = "image"
    # Column holding a caption (text-to-image); empty = none.
    caption_field: str | None = None
    # Column holding an integer class label (class-conditional models); empty = none.
    label_field: str | None = None


class DataSourceSection(Section):
    # One dataset of a mixture (data.sources, task sft): a local file, a Hub dataset id or builtin:NAME, as data.source.
    source: str
    # Its record layout, checked record by record (data.format's layouts for task sft).
    format: Literal["text", "alpaca", "sharegpt", "messages", "prompt_completion"] = "text"
    # Configuration of a Hub dataset that has several.
    subset: str | None = None
    # Its split to train on (Hub datasets and builtin sources).
    split: str = "train"
    # Use only its first N records; empty = all.
    max_samples: int | None = Field(None, ge=1)
    # Share of the mixture: samples are drawn from the sources in proportion to their weights (set on every
    # source or on none; none = the sources concatenated in order).
    weight: float | None = Field(None, gt=0)
    # format text: the field holding the text.
    text_field: str = "text"
    # format alpaca in a mixture without chat sources: the prompt layout (alpaca or alpaca-short).
    template: Literal["alpaca", "alpaca-short"] = "alpaca"


# What a mixture sets per source (data.sources[i].KEY) and not once for all: key -> its single-source default.
_PER_SOURCE_KEYS = {"subset": None, "split": "train", "max_samples": None, "text_field": "text", "template": "alpaca",
                    "eval_split": None, "images": None}


class DataSection(Section):
    # A local file (.json, .jsonl, .csv, .parquet, .txt), a Hub dataset id, or builtin:NAME
    # (data the project generates; see `hf-vram recipes`). Empty when data.sources is given.
    source: str = ""
    # task sft: a mixture of several datasets instead of data.source, each entry a dataset of its own format
    # (source, format, split, max_samples, weight, ...). With weights, samples are interleaved at random in those
    # proportions (datasets.interleave_datasets, seeded by train.seed); without, the sources are concatenated.
    # When any source is a chat format (sharegpt, messages), every instruction record (alpaca, prompt_completion)
    # becomes a user turn and its answer an assistant turn, so that all of them go through one chat template;
    # text sources stay whole texts, every token trained. data.val_size is held out of each source before mixing.
    # data.format is then set from the sources: their format when they share one, messages when any is a chat.
    sources: list[DataSourceSection] | None = None
    # Mixture with weights: first_exhausted = stop when a source runs out (no sample repeated, the proportions hold
    # to the end); all_exhausted = go on, repeating the sources that ran out, until every sample of every source
    # has been drawn (a small source is oversampled).
    mix_stopping: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    # Record layout: text (one text field: pretraining), alpaca (instruction/input/output), sharegpt
    # (conversations of from/value), messages (role/content), prompt_completion (prompt/completion), or
    # preference (chosen/rejected pairs, for task: dpo, orpo or simpo), or unpaired (one answer judged desirable or
    # not: prompt/completion/label, or messages with label or kto_tag, for task: kto). A record that does not fit is
    # an error.
    # images (task diffusion): an image folder (the imagefolder convention: captions/labels in metadata.jsonl), a Hub
    # image dataset, or builtin:digits (scikit-learn's 1,797 handwritten digits, offline).
    format: Literal["text", "alpaca", "sharegpt", "messages", "prompt_completion", "preference", "unpaired",
                    "images"] = "text"
    # format images: how images are read, sized and labelled.
    images: ImageSection | None = None
    # Configuration of a Hub dataset that has several (load_dataset's second argument, e.g. smoltalk's "all").
    subset: str | None = None
    # Dataset split to train on (Hub datasets and builtin sources).
    split: str = "train"
    # Held-out evaluation: a split name of the source (Hub, builtin), or empty to hold out val_size of the records.
    eval_split: str | None = None
    # Fraction of the records held out for evaluation when eval_split is empty (0 = no evaluation). task pretrain:
    # documents held out by a stable hash of their index; a single .txt file gives its last val_size of tokens.
    val_size: float = Field(0.0, ge=0.0, lt=1.0)
    # Field holding the text, for format: text in json/jsonl/csv/parquet files.
    text_field: str = "text"
    # Prompt layout for alpaca records: alpaca (Stanford Alpaca's preamble) or alpaca-short (no preamble).
    template: Literal["alpaca", "alpaca-short"] = "alpaca"
    # Conversation layout for sharegpt / messages / preference records: auto = the tokenizer's chat template when
    # it has one, else plain; plain = "### User:" / "### Assistant:" turns, each answer ended by EOS (no new
    # tokens); chatml = <|im_start|>role ... <|im_end|> (the two tokens are added when the vocabulary lacks them);
    # or a Jinja chat template of your own (a model's template that its tokenizer does not ship).
    chat_template: str = "auto"
    # Text put in place of {{key}} placeholders in every field (e.g. name: MyBot for LLaMA-Factory's identity data).
    placeholders: dict[str, str] = Field(default_factory=dict)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value not in ("auto", "plain", "chatml") and "{{" not in value and "{%" not in value:
            raise ValueError(f"got '{value}', expected auto, plain, chatml, or a Jinja chat template ({{% for message in messages %}}...)")
        return value
    # Longest sequence in tokens; longer samples are truncated.
    max_length: int = Field(512, ge=8, le=MAX_TOKENS)
    # task pretrain: a training sequence starts every block_stride tokens of the corpus; empty = max_length (each
    # token read once per epoch). 1 = every offset, as nanoGPT's random windows: for small corpora seen many times.
    block_stride: int | None = Field(None, ge=1, le=MAX_TOKENS)
    # Pack several samples into each sequence (no padding waste).
    packing: bool = False
    # Also train on prompt and user tokens; by default only responses (every assistant turn) and EOS are trained.
    train_on_prompt: bool = False
    # Use only the first N records (task pretrain: documents) (quick trials); empty = all.
    max_samples: int | None = Field(None, ge=1)
    # task sft: read the records as a stream (datasets' streaming), checked and tokenized as training draws them,
    # never held whole nor cached: for corpora larger than memory. Needs train.max_steps (a stream has no length);
    # one data.source (no mixture); held-out data from data.eval_split only (a fraction of a stream of unknown length
    # cannot be taken). A resumed run reads the stream again up to where its checkpoint stopped.
    streaming: bool = False
    # streaming: samples are drawn at random from a buffer of this many (seeded by train.seed, reseeded each pass
    # over the stream); 0 = the source's order. Not read without streaming (cached data is shuffled whole).
    shuffle_buffer: int = Field(10000, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _streaming_keys(self) -> DataSection:
        if not self.streaming:
            return self
        if self.sources:
            raise ValueError("data.streaming: streams one dataset (data.source); a mixture (data.sources) is prepared "
                             "and cached: drop data.streaming, or stream one source")
        if self.val_size:
            raise ValueError("data.val_size: a stream has no length, so a fraction of it cannot be held out; with "
                             "data.streaming name a split of the source as data.eval_split, or leave val_size out")
        return self

    def check_streaming(self, task: str, max_steps: int | None, trains_tokenizer: bool) -> None:
        """The streaming checks that need other sections (called by the recipe)."""
        if not self.streaming:
            return
        if task != "sft":
            raise ValueError(f"data.streaming: streams records for task sft only (this recipe is task {task})")
        if max_steps is None:
            raise ValueError("train.max_steps: required with data.streaming: a stream has no length, so train.epochs "
                             "cannot be counted; set the number of optimizer steps")
        if trains_tokenizer:
            raise ValueError("tokenizer.train: a new vocabulary is trained on the whole data, which a stream never "
                             "holds; name a tokenizer (tokenizer.name_or_path) or drop data.streaming")

    @model_validator(mode="after")
    def _one_source_or_a_mixture(self) -> DataSection:
        if self.sources is None:
            if not self.source:
                raise ValueError("data.source: required key is missing: a file, a Hub dataset id or builtin:NAME "
                                 "(or data.sources, a mixture of several)")
            return self
        if self.source:
            raise ValueError("data.sources: set data.source (one dataset) or data.sources (a mixture), not both")
        if not self.sources:
            raise ValueError("data.sources: the list is empty; give one entry per dataset (source, format, ...)")
        for key, default in _PER_SOURCE_KEYS.items():
            if getattr(self, key) != default:
                raise ValueError(f"data.{key}: a mixture sets this per source (data.sources[i].{key}), not for all"
                                 + (" (data.val_size holds out part of each source)" if key == "eval_split" else ""))
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = weighted.index(False)
            raise ValueError(f"data.sources.{missing}.weight: weights are set on some sources but not this one: give "
                             "every source a weight (mixed in those proportions) or none (concatenated)")
        formats = {s.format for s in self.sources}
        mixed = formats.pop() if len(formats) == 1 else (
            "messages" if formats & {"sharegpt", "messages"} else next(s.format for s in self.sources if s.format != "text"))
        if "format" in self.model_fields_set and self.format != mixed:
            raise ValueError(f"data.format: a mixture takes each source's format (data.sources[i].format); leave "
                             f"data.format out (it reads '{mixed}' for these sources)")
        # Set without validate_assignment (which would run this validator again): readers of data.format (the
        # chat template, the card, generation) see the layout the samples are rendered in.
        self.__dict__["format"] = mixed
        return self


class TrainSection(Section):
    # Where the output goes; empty = outputs/<recipe name>.
    output_dir: str | None = None
    # Sequences per forward pass on each device.
    micro_batch_size: int = Field(4, ge=1, le=MAX_COUNT)
    # Micro-batches summed before each optimizer step (global batch = micro x accum x devices).
    grad_accum: int = Field(1, ge=1, le=MAX_COUNT)
    # Passes over the data (ignored when max_steps is set).
    epochs: float = Field(1.0, gt=0)
    # Stop after this many optimizer steps; empty = run `epochs`.
    max_steps: int | None = Field(None, ge=1)
    # Peak learning rate.
    lr: float = Field(2e-4, gt=0)
    # Learning-rate schedule after warmup.
    # two_stage = BitNet b1.58's: cosine, then at mid-training a drop to 0.3 of the peak and a second cosine, with
    # weight decay switched off for the second half (hf_vram/models/bitnet.py gives the sources).
    lr_scheduler: Literal["cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup", "two_stage"] = "cosine"
    # cosine_with_min_lr: the learning rate the decay ends at (nanoGPT and llm.c decay to a tenth of the peak).
    min_lr: float | None = Field(None, ge=0)
    # AdamW's beta2: 0.999 by default; small-data and large-batch recipes use 0.99 (nanoGPT) or 0.95 (llm.c, GPT-3).
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    # Warmup: a fraction of all steps when below 1, else a number of steps.
    warmup: float = Field(0.03, ge=0)
    # Decoupled weight decay (AdamW).
    weight_decay: float = Field(0.0, ge=0)
    # Gradient clipping by global norm; 0 = off.
    max_grad_norm: float = Field(1.0, ge=0)
    # Optimizer: paged_adamw_8bit keeps states in 8 bits and pages them out under memory pressure.
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        "adamw_torch"
    )
    # Recompute activations in the backward pass: much less memory, about 30% more compute.
    gradient_checkpointing: bool = False
    # Loss scored in tiles of tokens x vocabulary (trl's fused LM head: Triton on GPUs, torch tiles on CPU) so the full
    # [tokens x vocabulary] logits never exist; false = the model's own loss on full logits (trl's DPO is always fused);
    # auto = fused for sft and dpo (trl's default), and for pretrain when the vocabulary is wider than trl's tile
    # (32,768: the tile's buffer is that wide, more than a small vocabulary's full logits).
    fused_loss: bool | Literal["auto"] = "auto"
    # Move checkpointed layer inputs to pinned CPU memory in forward, back for backward, overlapped on a side stream
    # (trl's OffloadActivations on GPUs); auto = on from data.max_length 8,192 with gradient checkpointing on a GPU.
    activation_offloading: bool | Literal["auto"] = "auto"
    # Run each MLP over tiles of the sequence (hidden_size tokens each), recomputed tile by tile in backward, so its
    # activations exist for one tile at a time (ALST's TiledMLP); auto = on from data.max_length 16,384.
    tiled_mlp: bool | Literal["auto"] = "auto"
    # Fused RMSNorm, RoPE and SwiGLU kernels: liger = liger-kernel's (a GPU and `pip install liger-kernel`);
    # auto = liger's where both are there, else none (the models' own); none = the models' own.
    kernels: Literal["auto", "liger", "none"] = "auto"
    # Mixed precision: auto = bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Seed for weights, data order and dropout.
    seed: int = 42
    # Log loss and learning rate every N steps.
    logging_steps: int = Field(10, ge=1)
    # Evaluate on the held-out data (loss, perplexity) every N steps and at the end; empty = at the end only.
    eval_steps: int | None = Field(None, ge=1)
    # Write a resumable checkpoint every N steps.
    save_steps: int = Field(200, ge=1)
    # Keep this many complete checkpoints (older ones are removed after a newer one is complete).
    save_total_limit: int = Field(2, ge=1)
    # Loggers: tensorboard, wandb, trackio, ... or an empty list.
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    # Compile the model with torch.compile.
    torch_compile: bool = False
    # On a GPU the recipe is planned first (hf-vram plan); one predicted not to fit is refused, or, with auto_fit,
    # changed until it fits (micro-batch with the global batch kept, then checkpointing, then an 8-bit optimizer).
    auto_fit: bool = False


class EvalSection(Section):
    # For builtin tasks that can be scored: held-out prompts scored before and after training (0 = off).
    score_samples: int = Field(0, ge=0)
    # Prompts generated from the saved output through transformers.pipeline after training.
    sample_prompts: list[str] = Field(default_factory=list)
    # Also generate from sample_prompts at every held-out evaluation (train.eval_steps), logged and written to
    # OUTPUT_DIR/samples.jsonl: a model trained from scratch shows what it has learned as it goes.
    sample_during_training: bool = False
    # Tokens generated per prompt (scoring and samples).
    max_new_tokens: int = Field(32, ge=1, le=MAX_TOKENS)
    # lm-evaluation-harness tasks run on the trained model after training, into train_summary.json and the card's
    # model-index: arithmetic = hf-vram's held-out arithmetic (offline, as score_samples scores it), any other name
    # an lm-eval task, group or tag (data from the Hub). `hf-vram eval OUTPUT_DIR --tasks ...` runs them later.
    tasks: list[str] = Field(default_factory=list)
    # Also run eval.tasks on the starting model before training: the summary and the card show before and after.
    tasks_before: bool = False

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str]) -> list[str]:
        # Whether lm-eval knows a name is checked when the run starts (its index takes seconds to build).
        for name in value:
            if not name.strip() or "," in name:
                raise ValueError(f"eval.tasks: {name!r} is not a task name: give one name per list entry, e.g. "
                                 "tasks: [arithmetic]")
        if len(set(value)) < len(value):
            raise ValueError(f"eval.tasks: {value} names a task twice: name each once")
        return value

    @model_validator(mode="after")
    def _before_needs_tasks(self) -> EvalSection:
        if self.tasks_before and not self.tasks:
            raise ValueError("eval.tasks_before: evaluates eval.tasks before training, and eval.tasks is empty: "
                             "name the tasks, e.g. eval.tasks: [arithmetic]")
        return self


# Tasks that train on chosen/rejected pairs (format preference).
PAIRED_TASKS = ("dpo", "orpo", "simpo")
# Layouts task grpo takes its prompts and answers from (data_prep/grpo.py).
GRPO_FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")


class DPOSection(Section):
    # Strength of the pull towards the reference model (DPO's beta): lower lets the policy move further.
    beta: float = Field(0.1, gt=0)
    # DPO loss (trl's loss_type): sigmoid (the DPO paper's), ipo, hinge, robust, ... (exo_pair needs label
    # smoothing, which recipes do not set, so it is not offered).
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ] = "sigmoid"


class ORPOSection(Section):
    # task orpo (Hong et al., arXiv 2403.07691): weight of the odds-ratio term beside the chosen answers' language-
    # modelling loss (the paper's lambda, trl's beta; 0.1 as there and in trl). No reference model.
    beta: float = Field(0.1, gt=0)


class SimPOSection(Section):
    # task simpo (Meng et al., arXiv 2405.14734): scale of the length-normalised log-probability reward. The paper
    # uses 2.0 to 2.5 (trl's 0.1 is CPO's default, far too weak for a normalised reward). No reference model.
    beta: float = Field(2.0, gt=0)
    # Target margin between chosen and rejected rewards (trl's simpo_gamma; the paper's gamma/beta is 0.1 to 0.8).
    gamma: float = Field(0.5, ge=0)
    # Weight of an added language-modelling loss on the chosen answers (trl's cpo_alpha): 0 is SimPO as published;
    # 1 is CPO's behaviour-cloning term.
    cpo_alpha: float = Field(0.0, ge=0)


class KTOSection(Section):
    # task kto (Ethayarajh et al., arXiv 2402.01306): strength of the pull towards the reference model (the base
    # with the adapter off); 0.1 as the paper and trl.
    beta: float = Field(0.1, gt=0)
    # Weight of the desirable answers' loss, and below the undesirable ones': the paper keeps
    # desirable_weight x desirable count / (undesirable_weight x undesirable count) between 1 and 4/3.
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


# Builtin verifiable rewards of task grpo (hf_vram/train/rewards.py): exact_number = 1 when the completion's last
# number equals the record's answer (GSM8K's answers end in `#### N`); answer_format = 1 when the completion ends
# in a line that is just the answer; length = a penalty from 0 to -1 growing with the completion's length.
BUILTIN_REWARDS = ("exact_number", "answer_format", "length")


class RewardSection(Section):
    # One of builtin (a name of BUILTIN_REWARDS) or function ("path/to/file.py:name", the path read relative to the
    # recipe file; trl calls it as name(prompts, completions, answer=[...], **other columns) -> list of floats).
    builtin: Literal["exact_number", "answer_format", "length"] | None = None
    function: str | None = None
    # Its weight in the summed reward (trl's reward_weights); negative weights turn a reward into a penalty.
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_kind(self) -> RewardSection:
        if (self.builtin is None) == (self.function is None):
            raise ValueError("set exactly one of builtin (exact_number, answer_format, length) or function "
                             "(path/to/file.py:name)")
        if self.function is not None and not re.fullmatch(r".+\.py:[A-Za-z_]\w*", self.function):
            raise ValueError(f"function: got '{self.function}', expected path/to/file.py:function_name")
        return self


class GRPOSection(Section):
    # task grpo (Shao et al., arXiv 2402.03300; trl's GRPOTrainer): completions sampled per prompt; their rewards
    # are compared within the group (at least 2). train.micro_batch_size x grad_accum counts completions and must
    # be a multiple of it.
    num_generations: int = Field(8, ge=2, le=MAX_COUNT)
    # Longest completion in tokens (the prompt's limit is data.max_length).
    max_completion_length: int = Field(512, ge=1, le=MAX_TOKENS)
    # KL pull towards the reference (the base with the adapter off); 0 = none and no reference pass (trl's default).
    beta: float = Field(0.0, ge=0)
    # Sampling temperature of the completions.
    temperature: float = Field(1.0, gt=0, le=10)
    # trl's loss_type: dapo (tokens of the whole accumulated batch, trl's default), grpo (per-sequence means, the
    # paper's), dr_grpo (a constant: max_completion_length), bnpo (tokens of the micro-batch), cispo, sapo.
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"] = "dapo"
    # The rewards, summed with their weights (trl's reward_funcs and reward_weights).
    rewards: list[RewardSection] = Field(default_factory=lambda: [RewardSection(builtin="exact_number")], min_length=1)
    # Records of another layout (GSM8K's question/answer): the field holding the prompt and the one holding the
    # answer; each record then becomes a user turn and an answer (data.format messages or prompt_completion).
    prompt_field: str | None = None
    answer_field: str | None = None
    # Continue from a trained adapter (an SFT run): recipe:NAME (that recipe's finished output) or a folder, relative
    # to the recipe file; its weights start the recipe's adapter, whose type, rank, alpha and targets must match.
    init_adapter: str | None = None


class HubSection(Section):
    # Hub repository (owner/name): the output is pushed there when training ends, and named in the model card.
    repo_id: str | None = None
    # Create the repository as private when it is pushed.
    private: bool = True

    @field_validator("repo_id")
    @classmethod
    def _owner_name(cls, value: str | None) -> str | None:
        # Checked here, not at push time: a typo must not surface only after hours of training.
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", value):
            raise ValueError(f"got '{value}', expected owner/name (e.g. my-user/my-model)")
        return value


class DiffusionSection(Section):
    # What the model is conditioned on: none (unconditional), class (data.images.label_field), text (captions).
    conditioning: Literal["none", "class", "text"] = "none"
    # Classes of a class-conditional model; empty = read from the data.
    num_classes: int | None = Field(None, ge=2)
    # Frozen pretrained text encoder (Hub id or folder, e.g. openai/clip-vit-base-patch32, google/t5-v1_1-small);
    # empty with conditioning text = a small CLIP text encoder trained from scratch with the model.
    text_encoder: str | None = None
    # Longest caption in tokens.
    max_caption_length: int = Field(32, ge=4)
    # Frozen pretrained VAE (Hub id or folder, e.g. stabilityai/sd-vae-ft-mse): the model learns in its latent space;
    # empty = pixel space.
    vae: str | None = None
    # Precompute the frozen VAE's latents, and a frozen text encoder's caption embeddings, once before training, and
    # train from that cache (OUTPUT_DIR/prepared/latents/): no encoder runs per step; random_flip is kept.
    cache_latents: bool = False
    # Noise schedule of training (diffusers' DDPMScheduler): linear (DDPM's), squaredcos_cap_v2 (cosine), scaled_linear.
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    # Diffusion steps of the noise schedule.
    num_train_timesteps: int = Field(1000, ge=10)
    # What the model predicts: the noise (epsilon, DDPM's) or v (v-prediction, better at high noise).
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # Min-SNR loss weighting (Hang et al. 2023) with this gamma (5 is the paper's); empty = plain MSE.
    snr_gamma: float | None = Field(None, gt=0)
    # Scheduler of the saved pipeline and of sampling: ddpm (1000 steps by default) or ddim (few steps).
    sampler: Literal["ddpm", "ddim"] = "ddim"
    # Denoising steps when sampling.
    inference_steps: int = Field(50, ge=1)
    # Classifier-free guidance: conditions dropped this often in training ...
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # ... and this guidance scale when sampling (1 = none).
    guidance_scale: float = Field(3.0, ge=1.0)
    # Keep an exponential moving average of the weights (saved as the pipeline's model).
    ema: bool = True
    # Its decay per step.
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    # Write a grid of samples (PNG) every N steps and at the end; empty = at the end only.
    sample_every: int | None = Field(None, ge=1)
    # Images in the grid (classes or prompts cycle through it).
    num_samples: int = Field(16, ge=1)
    # Prompts of the sample grid (text conditioning).
    sample_prompts: list[str] = Field(default_factory=list)


class ExpertSection(Section):
    # A dense checkpoint of the base's architecture whose MLPs become one expert: Hub id, local directory, or
    # recipe:NAME (that recipe's output, trained first when missing).
    source_model: str
    # Prompts this expert should handle: with gate_mode hidden or cheap_embed they set its router rows.
    positive_prompts: list[str] = Field(default_factory=list)
    # Prompts it should not handle (subtracted, as mergekit-moe does).
    negative_prompts: list[str] = Field(default_factory=list)


class MoESection(Section):
    # task assemble: a Mixtral-style mixture of experts from dense checkpoints of one Llama/Mistral architecture
    # (mergekit-moe's job): attention, norms and embeddings from model.name_or_path, expert i's MLP from
    # experts[i].source_model. `hf-vram assemble` also reads mergekit-moe's own YAML.
    experts: list[ExpertSection] = Field(min_length=2)
    # Router initialisation: hidden = each expert's positive prompts' hidden states per layer (the base model's);
    # cheap_embed = their token embeddings only; random = random rows (to be trained).
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    # Experts each token is routed to.
    experts_per_token: int = Field(2, ge=1)
    # Dtype the assembled weights are saved in.
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class Recipe(Section):
    # One line shown by `hf-vram recipes` and in the model card.
    description: str = ""
    # Kind of training: sft = causal language modelling on text, instructions or chats (trl's SFTTrainer);
    # dpo = preference optimisation on chosen/rejected pairs (trl's DPOTrainer); pretrain = next-token prediction
    # on a corpus tokenized once into memory-mapped token shards (data_prep/shards.py; transformers' Trainer);
    # assemble = no training: a mixture of experts built from dense checkpoints (section moe).
    # diffusion = images from noise (diffusers models and schedulers, an Accelerate loop; section diffusion).
    # orpo and simpo = preference optimisation on chosen/rejected pairs without a reference model (trl's ORPOTrainer,
    # and CPOTrainer's SimPO loss; sections orpo, simpo); kto = KTO on answers judged one by one (format unpaired;
    # trl's KTOTrainer; section kto); grpo = reinforcement learning from verifiable rewards on prompts with answers
    # (trl's GRPOTrainer; section grpo).
    task: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo", "pretrain", "assemble", "diffusion"] = "sft"
    model: ModelSection
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    # What to train on (every task but assemble).
    data: DataSection | None = None
    moe: MoESection | None = None
    diffusion: DiffusionSection | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    orpo: ORPOSection = Field(default_factory=ORPOSection)
    simpo: SimPOSection = Field(default_factory=SimPOSection)
    kto: KTOSection = Field(default_factory=KTOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    hub: HubSection = Field(default_factory=HubSection)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.eval.tasks and self.task in ("assemble", "diffusion"):
            raise ValueError(f"eval.tasks: lm-evaluation-harness tasks run after a language model's training; task "
                             f"{self.task} does not run them (for an assembled model: `hf-vram eval OUTPUT_DIR --tasks ...`)"
                             if self.task == "assemble" else
                             "eval.tasks: lm-evaluation-harness evaluates language models, not task diffusion")
        if self.task == "assemble":
            return self._consistent_assemble()
        self._sections_fit_task()
        self.data.check_streaming(self.task, self.train.max_steps, self.tokenizer.train)
        if self.task == "diffusion":
            return self._consistent_diffusion()
        self._consistent_language_model()
        return self

    def _consistent_assemble(self) -> Recipe:
        if self.moe is None or not self.model.name_or_path:
            raise ValueError("moe: task assemble needs a moe section (experts) and model.name_or_path (the base)")
        if self.data is not None or self.quant.bits or self.adapter.type != "none":
            raise ValueError("task: assemble trains nothing: leave out data, quant and adapter (fine-tune the "
                             "assembled model in a recipe with model.name_or_path: recipe:NAME)")
        return self

    def _sections_fit_task(self) -> None:
        """The sections every training task needs (data), and those that belong to another task (moe, diffusion)."""
        if self.moe is not None:
            raise ValueError("moe: the moe section is for task: assemble")
        if (self.task == "diffusion") != (self.diffusion is not None):
            raise ValueError("diffusion: task diffusion needs a diffusion section, and the section is for that task only")
        if self.task == "diffusion" and (self.data is None or self.data.format != "images"):
            raise ValueError("data.format: task diffusion trains on format images")
        if self.data is None:
            raise ValueError(f"data: task {self.task} needs a data section (data.source at least)")
        if self.data.sources and self.task != "sft":
            raise ValueError(f"data.sources: a mixture of datasets is for task sft (this recipe is task {self.task}); "
                             "name one data.source")

    def _consistent_language_model(self) -> None:
        """task sft, dpo and pretrain (data is there: _sections_fit_task)."""
        self._check_quant()
        self._check_dpo()
        if self.tokenizer.train and not self.model.arch:
            raise ValueError("tokenizer.train: a new vocabulary is only for a model built from scratch (model.arch)")
        self._check_min_lr()
        self._check_pretrain()
        self._check_grpo()
        if self.model.arch and not self.tokenizer.train and not self.tokenizer.name_or_path:
            raise ValueError("tokenizer.train: a model built from scratch needs a tokenizer: set tokenizer.train: true or tokenizer.name_or_path")

    def _check_quant(self) -> None:
        if self.quant.bits and self.adapter.type == "none":
            raise ValueError("quant.bits: a quantized base cannot be trained in full: set adapter.type: lora (QLoRA)")
        if self.quant.bits and self.model.arch:
            raise ValueError("quant.bits: quantization applies to pretrained weights (model.name_or_path), not to a model built from scratch")

    def _check_dpo(self) -> None:
        """The preference tasks: each its data layout, and the loss path its trl trainer has."""
        task, fmt = self.task, self.data.format
        if (task in PAIRED_TASKS) != (fmt == "preference"):
            raise ValueError(f"data.format: task {task} cannot train on format {fmt}: tasks dpo, orpo and simpo train "
                             "on format preference, and format preference needs one of them")
        if (task == "kto") != (fmt == "unpaired"):
            raise ValueError(f"data.format: task {task} cannot train on format {fmt}: task kto trains on format "
                             "unpaired, and format unpaired needs task: kto")
        if task in ("dpo", "kto") and self.train.fused_loss is False:
            raise ValueError(f"train.fused_loss: trl's {task.upper()}Trainer always scores its log-probabilities in "
                             "tiles; fused_loss: false is for task sft and pretrain")
        if task in ("orpo", "simpo") and self.train.fused_loss is True:
            raise ValueError(f"train.fused_loss: trl's {'ORPO' if task == 'orpo' else 'CPO'}Trainer scores the full "
                             "logits and has no fused LM head; leave fused_loss at auto")
        if task == "kto" and self.train.micro_batch_size < 2:
            raise ValueError("train.micro_batch_size: task kto needs at least 2: trl's KTOTrainer estimates its KL "
                             "reference point from each answer paired with another prompt of the same micro-batch")

    def _check_grpo(self) -> None:
        """task grpo: prompts with answers, and whole groups of completions per optimizer step."""
        if self.task != "grpo":
            return
        g, t, fmt = self.grpo, self.train, self.data.format
        if fmt not in GRPO_FORMATS:
            raise ValueError(f"data.format: task grpo reads prompts with answers ({', '.join(GRPO_FORMATS)}), not '{fmt}'")
        if (g.prompt_field is None) != (g.answer_field is None):
            raise ValueError("grpo.prompt_field: set it together with grpo.answer_field (and only then)")
        if g.prompt_field and fmt not in ("messages", "prompt_completion"):
            raise ValueError("grpo.prompt_field: mapped records are read as format messages or prompt_completion")
        if (t.micro_batch_size * t.grad_accum) % g.num_generations:
            raise ValueError(f"train.micro_batch_size: micro_batch_size x grad_accum ({t.micro_batch_size} x "
                             f"{t.grad_accum}) counts completions and must be a multiple of grpo.num_generations "
                             f"({g.num_generations}): trl's GRPOTrainer compares whole groups")
        if g.init_adapter and self.adapter.type not in ("lora", "dora", "rslora"):
            raise ValueError("grpo.init_adapter: continues a LoRA adapter: set adapter.type to the one it was trained with")
        if self.data.eval_split or self.data.val_size:
            raise ValueError("data.val_size: task grpo trains on prompts only and evaluates no held-out loss; leave "
                             "data.eval_split and data.val_size out")
        if t.fused_loss is False:
            raise ValueError("train.fused_loss: trl's GRPOTrainer always scores its log-probabilities in tiles; "
                             "fused_loss: false is for task sft and pretrain")

    def _check_min_lr(self) -> None:
        if (self.train.lr_scheduler == "cosine_with_min_lr") != (self.train.min_lr is not None):
            raise ValueError("train.min_lr: set it together with train.lr_scheduler: cosine_with_min_lr (and only then)")

    def _check_pretrain(self) -> None:
        if self.task != "pretrain":
            return
        if self.data.format != "text":
            raise ValueError(f"data.format: task pretrain reads plain text (format: text), not '{self.data.format}'")
        if self.data.eval_split:
            raise ValueError("data.eval_split: task pretrain holds out data.val_size of the documents instead")
        if self.data.source.startswith("builtin:"):
            raise ValueError("data.source: task pretrain reads a file, a URL or a Hub dataset; builtin sources are for task sft")

    def _consistent_diffusion(self) -> Recipe:
        d, arch = self.diffusion, self.model.arch
        if not arch:
            raise ValueError(f"model.arch: task diffusion builds its model from model.arch + model.config "
                             f"({', '.join(ARCHS)}); fine-tuning a pretrained pipeline is not supported yet")
        if self.quant.bits or self.adapter.type != "none":
            raise ValueError("adapter.type: task diffusion trains every weight of a model built from scratch: leave out "
                             "quant and adapter")
        if self.train.lr_scheduler == "two_stage":
            raise ValueError("train.lr_scheduler: two_stage is BitNet's language-model schedule")
        if (self.train.lr_scheduler == "cosine_with_min_lr") != (self.train.min_lr is not None):
            raise ValueError("train.min_lr: set it together with train.lr_scheduler: cosine_with_min_lr (and only then)")
        # The architectures' table says which conditioning each takes and which needs a VAE.
        if (problem := conditioning_problem(arch, d.conditioning, d.vae)) is not None:
            raise ValueError(problem)
        if d.cache_latents and not d.vae:
            raise ValueError("diffusion.cache_latents: caches the latents of a frozen VAE, and a pixel-space model "
                             "(no diffusion.vae) has none: name diffusion.vae or set cache_latents: false")
        return self
