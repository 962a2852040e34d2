"""Predict a recipe's peak training memory on a GPU, and its training time, from its config alone.

No weights are loaded: exact parameter counts per kind of tensor come from the config (hf_vram/vram/counts.py: by
hand for the dense Llama-style families, from a meta-device model otherwise); adapter sizes follow peft's layer
shapes. Bytes then follow from how each library
stores them in training (written here because no library predicts this; accelerate's estimate-memory counts
weights and Adam states only):
- bitsandbytes NF4/FP4: 0.5 byte per weight of every Linear in the blocks, plus one absmax per 64 weights
  (fp32, or 8-bit with a second-level fp32 constant per 256 blocks under double quantization). peft's
  prepare_model_for_kbit_training casts everything else (embeddings, norms, lm_head) to fp32.
- LoRA on a quantized base: trl keeps the adapter in bf16; on an unquantized base peft upcasts it to fp32.
- Full fine-tune: fp32 weights, gradients and AdamW states (mixed precision computes in bf16).
- Activations per layer and token, counted tensor by tensor for Llama-style blocks and Mamba's scan, measured
  for GPT-2 and Mixtral (see _layer_elements), in the compute dtype; gradient checkpointing keeps each layer's
  input plus one layer recomputed. LoRA on 3-D expert weights keeps a merged copy of them per layer.
- Loss: trl's SFT computes log-probabilities in chunks of up to 32,768 tokens with the logits in fp32; DPO
  (and a measurement with the model's own loss) keeps the full logits.
- The peak is placed in time (see the end of estimate()), not summed, and checked against measured steps by
  bench/vram_accuracy.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hf_vram.builders.long_context import offloading_on, tiled_mlp_on
from hf_vram.recipe.schema import PAIRED_TASKS, Recipe
from hf_vram.vram.counts import Counts, count_parameters
from hf_vram.vram.gpus import GPU

GiB = 2**30
# What CUDA, cuBLAS and torch take before the first tensor (typically 0.3-0.6 GiB with lazy module loading).
CUDA_CONTEXT = int(0.5 * GiB)
# The caching allocator reserves more than it hands out: block rounding and fragmentation.
ALLOCATOR_OVERHEAD = 0.05
# trl's fused LM head scores this many tokens per chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
LOGPROB_CHUNK = 32768
# Model FLOPs utilisation assumed for time: dense bf16 training reaches 35-45% on one card; bitsandbytes'
# dequantization in every 4-bit matmul costs about a third of that.
MFU = {"full": 0.40, "adapter": 0.35, "qlora": 0.25}
# trl's fused LM head (trl/kernels/chunked_logprob.py, 1.16): tiles of TOKEN_CHUNK_SIZE tokens x
# _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries.
FUSED_TILE_TOKENS = 4096
FUSED_TILE_VOCAB = 32768
# Logit values per chunk of hf-vram's CPU fused head (hf_vram/train/cpu_fused_loss.py's CHUNK_VALUES; the planner does
# not import torch).
CPU_CHUNK_VALUES = 1 << 24
# Model types whose MLPs train/tiled_mlp.py tiles (Llama-style gate_proj, up_proj, down_proj).
# Tasks whose loss runs one way only: trl's DPO, KTO and GRPO trainers always score through their fused LM head; its
# experimental ORPO and CPO (SimPO) trainers always on the full logits. train.fused_loss is no choice for them.
FUSED_ONLY_TASKS = ("dpo", "kto", "grpo")
FULL_LOGITS_TASKS = ("orpo", "simpo")


def trained_sequences(recipe: Recipe) -> int:
    """Sequences per sample that run forward and backward: a pair's chosen and rejected answers (tasks dpo, orpo,
    simpo), else one. KTO's one answer also runs under another prompt of its micro-batch (its KL estimate), and
    DPO's and KTO's references (the base with the adapter off) score every sequence again, but all of those run
    without gradients: nothing of them is kept for backward, and their transient peak stays under a training
    layer's. ORPO and SimPO have no reference pass at all."""
    return 2 if recipe.task in PAIRED_TASKS else 1


def sequence_length(recipe: Recipe) -> int:
    """Tokens of a trained sequence: data.max_length, and for task grpo a prompt of up to data.max_length tokens
    followed by its completion of up to grpo.max_completion_length."""
    return recipe.data.max_length + (recipe.grpo.max_completion_length if recipe.task == "grpo" else 0)


def generation_item(config, recipe: Recipe, act: int) -> Item:
    """task grpo's sampling, before the training steps it feeds: train.micro_batch_size x grad_accum completions
    (groups of grpo.num_generations per prompt) generated at once, with their KV cache at full length (prompt +
    max_completion_length) in the compute dtype, and the fp32 logits of the next token of each, a handful of
    copies (sampling, temperature, softmax). The training step itself scores the completions through trl's fused
    LM head; the old and reference log-probabilities (grpo.beta > 0: the base with the adapter off) run without
    gradients, one micro-batch at a time, under a training layer's peak. No gradients or activations are alive
    while it runs."""
    t, g = recipe.train, recipe.grpo
    seqs, seq = t.micro_batch_size * t.grad_accum, sequence_length(recipe)
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    cache = 2 * config.num_hidden_layers * kv * seqs * seq * act
    logits = 4 * seqs * config.vocab_size * 4
    return Item("generation", int(cache + logits), f"{seqs} completions ({seqs // g.num_generations} prompts x "
                f"{g.num_generations}) sampled at once: KV cache of {seq} tokens each and next-token logits")


# Sampling (task grpo) is bound by memory traffic, not FLOPs: each new token of the generation batch reads every
# weight once (bitsandbytes 0.50 multiplies 4-bit weights without gradients in a fused kernel, gemm_4bit, reading
# them as stored) and the KV cache so far. transformers' generate reaches about DECODE_EFFICIENCY of the card's
# bandwidth, and eager transformers + peft launch about a hundred kernels per block per token (LAUNCH_PER_LAYER
# seconds of a block's launches, what a small model's decoding is bound by). Estimates, not measurements.
DECODE_EFFICIENCY = 0.6
LAUNCH_PER_LAYER = 3e-4


def generation_seconds(config, recipe: Recipe, gpu: GPU, read_bytes: int, n_params: int) -> float:
    """Seconds of sampling in one optimizer step of task grpo: trl generates train.micro_batch_size x grad_accum
    completions in one call per step (steps_per_generation = grad_accum); the prompts' prefill is compute at the
    recipe's MFU, then grpo.max_completion_length decoding steps (every completion run to the limit: an upper bound),
    each reading read_bytes (weights and adapter) and on average half the full KV cache."""
    t, g = recipe.train, recipe.grpo
    seqs = t.micro_batch_size * t.grad_accum
    kind = "qlora" if recipe.quant.bits else "adapter" if recipe.adapter.type != "none" else "full"
    prefill = 2.0 * n_params * seqs * recipe.data.max_length / (gpu.bf16_tflops * 1e12 * MFU[kind])
    cache = generation_item(config, recipe, 2).bytes  # the KV cache at full length (and a few logits)
    per_token = (read_bytes + cache / 2) / (gpu.memory_gbps * 1e9 * DECODE_EFFICIENCY)
    return prefill + g.max_completion_length * (per_token + LAUNCH_PER_LAYER * config.num_hidden_layers)


TILED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "bitnet")
# bitsandbytes' 8-bit AdamW, paged or not.
OPTIMIZERS_8BIT = ("adamw_8bit", "paged_adamw_8bit")
# Model families whose activation count bench/vram_accuracy.py checks against measured steps.
CHECKED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "mixtral", "mamba")


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    items: list[Item]
    gpu: GPU
    params: int
    trainable: int
    settings: dict  # micro_batch_size, grad_accum, max_length, gradient_checkpointing, optimizer
    flops_per_token: float
    tokens_per_step: int
    steps: int | None
    seconds: float | None
    mfu: float
    step_peak: int = 0  # the training step's peak (what a measurement sees), without CUDA context and slack
    peak: int = 0  # step_peak + CUDA context + allocator slack: what the card must hold
    host_bytes: int = 0  # offloaded activations, in pinned CPU memory (not on the card)
    savings: list[str] = field(default_factory=list)  # what each memory saving saves (hf_vram/vram/plan.py)
    notes: list[str] = field(default_factory=list)
    sampling_seconds: float = 0.0  # task grpo: generating the completions, per optimizer step (in seconds already)

    @property
    def total(self) -> int:
        return self.peak

    @property
    def usable(self) -> int:
        return int(self.gpu.memory_gib * GiB)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _layer_elements(config, recipe: Recipe) -> int:
    """Activation elements one decoder layer keeps for backward, per token (Llama / Mistral / Qwen2 blocks;
    GPT-2's block measured)."""
    h = config.hidden_size
    if config.model_type == "mamba":
        # transformers' pure-torch selective scan keeps three (inner x state) tensors per token for backward: the
        # discretized A, dt*B, and the state after every step; they dwarf the projections, convolution, gates and
        # norm (about 12 x inner, measured).
        return 3 * config.intermediate_size * config.state_size + 12 * config.intermediate_size
    if config.model_type == "gpt2":
        # ln_1 in/out, c_attn's q k v, the merged attention output, c_proj, ln_2 in/out, c_fc, gelu in/out: 30 h
        # measured per token (bench/vram_accuracy.py); residual dropout adds outputs and masks (1.5 h measured).
        return 30 * h + (3 * h // 2 if config.resid_pdrop > 0 else 0)
    heads = getattr(config, "num_attention_heads", None) or 1  # attention-free blocks (Mamba, RWKV): no score term
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    i = getattr(config, "intermediate_size", 4 * h)
    # input (residual), norm output, q, k, v, rotated q and k, attention output, residual into the second norm,
    # its output; gate, up, act(gate), act(gate) * up.
    elements = 7 * h + 3 * kv + 4 * i
    experts = getattr(config, "num_local_experts", None)
    if experts:
        # Mixture of experts: each token runs through top-k experts (k MLPs' activations), plus the router's
        # logits and the tokens gathered and scattered per expert (measured).
        k = config.num_experts_per_tok
        elements += 4 * i * (k - 1) + 2 * h * k + experts
    if recipe.adapter.type in ("lora", "dora", "rslora") and recipe.adapter.dropout > 0:
        # LoRA dropout makes a copy of each adapted layer's input: q, k, v, o, gate, up (h each) and down (i).
        elements += 6 * h + i
    return elements


def _attention_scores_bytes(config, recipe: Recipe, micro: int, seq: int, act: int, math_attention: bool = False) -> int:
    """Eager attention keeps the scores and probabilities (heads x seq x seq); sdpa and flash attention do not,
    except sdpa's math kernel (its CPU path) under attention dropout: the probabilities, dropped ones and mask."""
    heads = getattr(config, "num_attention_heads", None) or 1  # attention-free blocks (Mamba, RWKV): no score term
    if recipe.model.attn_implementation == "eager":
        return 2 * heads * seq * seq * micro * act
    if math_attention and getattr(config, "attn_pdrop", getattr(config, "attention_dropout", 0.0)) > 0:
        return int(heads * seq * seq * micro * (2 * act + 1))
    return 0


def unquantized_bytes(recipe: Recipe, compute_dtype: str) -> int:
    """Bytes per weight bitsandbytes leaves unquantized (embeddings, norms, lm_head) of a 4-bit or 8-bit base:
    fp32 after peft's prepare_model_for_kbit_training, or the compute dtype (quant.unquantized_dtype)."""
    return _bytes(compute_dtype) if recipe.quant.unquantized_dtype == "compute" else 4


def weights_item(counts: Counts, recipe: Recipe, compute_dtype: str) -> Item:
    q = recipe.quant
    other = unquantized_bytes(recipe, compute_dtype)
    kept = f"embeddings, norms, lm_head {'fp32' if other == 4 else compute_dtype.replace('bfloat16', 'bf16')}"
    if q.bits == 4:
        # Packed 4-bit values, then absmax per 64: fp32, or 8-bit plus one fp32 constant per 256 blocks.
        scales = counts.block_linear / 64 * (1 + 4 / 256 if q.double_quant else 4)
        b = counts.block_linear * 0.5 + scales + counts.other * other
        note = f"{q.type} 4-bit blocks + absmax ({'double-quantized' if q.double_quant else 'fp32'}); {kept}"
    elif q.bits == 8:
        b = counts.block_linear + counts.block_linear_rows * 4 + counts.other * other
        note = f"int8 weights + a fp32 scale per row; {kept}"
    elif recipe.adapter.type != "none":
        dtype = compute_dtype if recipe.model.dtype == "auto" else recipe.model.dtype
        b = (counts.block_linear + counts.other) * _bytes(dtype)
        note = f"frozen base in {dtype}"
    else:
        b = counts.total * 4
        note = "fp32 master weights (mixed precision computes in bf16)"
    return Item("weights", int(b), note)


def trainable_bytes(recipe: Recipe, compute_dtype: str) -> int:
    """Bytes per trainable parameter (and per gradient)."""
    if recipe.adapter.type == "none":
        return 4
    # trl keeps a quantized model's adapter in the compute dtype; peft upcasts other adapters to fp32.
    return _bytes(compute_dtype) if recipe.quant.bits else 4


def optimizer_bytes(optimizer: str, n: int, param_bytes: int, small: int = 0) -> tuple[int, str]:
    if optimizer in OPTIMIZERS_8BIT:
        # Two 8-bit states plus an fp32 absmax per 256 values each; tensors under 4,096 values keep fp32 states.
        return int((n - small) * (2 + 2 * 4 / 256) + small * 8), "AdamW, two 8-bit states" + (
            " (paged)" if optimizer.startswith("paged") else "")
    if optimizer == "paged_adamw_32bit":
        return n * 8, "AdamW, two fp32 states (paged)"
    # torch's AdamW keeps its two states in the parameter's dtype.
    return 2 * n * param_bytes, f"AdamW, two states in the parameters' dtype ({param_bytes} bytes each)"


@dataclass
class Activations:
    """What the layers keep for backward, in bytes (device memory unless said)."""

    item: Item
    per_layer: int  # one layer's saved tensors (checkpointing: the layer recomputed in backward)
    checkpoints: int  # layer inputs kept on the device (checkpointing; with offloading the ones in flight)
    checkpoint: int  # one layer input (what the last layer's backward still sees)
    host: int  # offloaded to pinned CPU memory
    hidden_grads: int  # the hidden state's gradient, and the one being made
    backward_extra: int  # transient memory of one layer's backward beyond its saved tensors


def _mlp_elements(config, recipe: Recipe) -> int:
    """The part of _layer_elements a tiled MLP keeps for one tile only: gate, up, act(gate), their product, and
    the LoRA dropout copies of gate's, up's and down's inputs."""
    i = getattr(config, "intermediate_size", 4 * config.hidden_size)
    lora_dropout = recipe.adapter.type in ("lora", "dora", "rslora") and recipe.adapter.dropout > 0
    return 4 * i + ((2 * config.hidden_size + i) if lora_dropout else 0)


def _activations(config, recipe: Recipe, counts: Counts, act: int, res: int, math_attention: bool, cuda: bool) -> Activations:
    t, seq = recipe.train, sequence_length(recipe)
    seqs = t.micro_batch_size * trained_sequences(recipe)
    tokens, layers, h = seqs * seq, config.num_hidden_layers, config.hidden_size
    elements = _layer_elements(config, recipe)
    i = getattr(config, "intermediate_size", 4 * h)
    # The MLP's backward makes the gradients of its intermediate (down_proj's input, then act's) beside what is saved.
    mlp_tokens = tokens
    extra = _sliding_window_mask(config, seqs, seq, act, math_attention)
    tiled = tiled_mlp_on(recipe) and config.model_type in TILED_FAMILIES and not getattr(config, "num_local_experts", None)
    if tiled:
        mlp_tokens = min(seq, h) * seqs  # train/tiled_mlp.py: hidden_size tokens of every sequence per tile
        elements -= _mlp_elements(config, recipe)
        # One tile's MLP recomputed in backward, beside the full-length gradient of its input and its output (in
        # the residual stream's dtype).
        extra += _mlp_elements(config, recipe) * mlp_tokens * act + 2 * h * tokens * res
    if config.model_type not in ("mamba", "gpt2") and not getattr(config, "num_local_experts", None):
        extra += 2 * i * mlp_tokens * act
    per_layer = elements * tokens * act + _attention_scores_bytes(config, recipe, seqs, seq, act, math_attention)
    if counts.adapted_expert_values:
        # peft's ParamWrapper materialises W + BA for every expert weight it wraps and the grouped matmul saves
        # it for backward: a copy of the layer's expert weights. Backward then makes each copy's gradient in turn:
        # down_proj's (1/3 of the values) beside both copies, then gate_up_proj's (2/3) once down_proj's copy is
        # freed: a third of the copy above what is saved, either way.
        per_layer += counts.adapted_expert_values * act
        extra += counts.adapted_expert_values * act // 3
    if config.model_type == "mamba":
        # Backward of the pure-torch scan builds full (tokens x inner x state) gradients of the discretized A,
        # dt*B and the states, and sums per-step slices into them: about 4.5 such tensors at once (measured).
        extra = 9 * config.intermediate_size * config.state_size * tokens * act // 2
    offload = offloading_on(recipe, cuda)
    checkpoint = h * tokens * res
    # trl's offloading brings a layer's tensors back while the next one is computed: about two layers' worth on
    # the device at a time.
    in_flight = min(layers, 2)
    micro_note = f"{t.micro_batch_size} x {seq} tokens" + (" x 2 (chosen, rejected)" if trained_sequences(recipe) == 2 else "")
    if t.gradient_checkpointing:
        host = layers * checkpoint if offload else 0
        on_device = in_flight * checkpoint if offload else layers * checkpoint
        how = f"checkpointed: {layers} layer inputs{' in CPU memory' if offload else ''} + 1 layer recomputed"
    else:
        host = (layers - in_flight) * per_layer if offload else 0
        on_device, per_layer_total = 0, (in_flight if offload else layers) * per_layer
        how = f"{layers} layers x {per_layer / 2**20:.0f} MiB" + (", offloaded to CPU memory" if offload else "")
    hidden_grads = 2 * h * tokens * res
    saved = (on_device + per_layer if t.gradient_checkpointing else per_layer_total) + hidden_grads
    if tiled:
        how += f"; MLP tiled ({min(seq, h)} tokens per tile)"
    return Activations(Item("activations", int(saved), f"{how}; {micro_note}"), int(per_layer), int(on_device), int(checkpoint),
                       int(host), int(hidden_grads), int(extra))


def _sliding_window_mask(config, seqs: int, seq: int, act: int, cpu: bool) -> int:
    """A sliding window (Mistral; Qwen2 with use_sliding_window) is not plain causal attention, so transformers
    builds its 4-D mask ([batch, 1, seq, seq] in the compute dtype; fp32 on the CPU) for sdpa instead of passing
    is_causal: at 32k tokens that is 2 GiB in bf16 (measured at 4k on the CPU by bench/vram_accuracy.py)."""
    window = getattr(config, "sliding_window", None)
    if not window or (config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False)):
        return 0
    return seqs * seq * seq * (4 if cpu else act)


def loss_uses_fused_head(config, recipe: Recipe) -> bool:
    """trl's SFT, DPO and KTO trainers score the loss through their fused LM head (DPO and KTO always; the ORPO and
    CPO trainers of tasks orpo and simpo never: they take the model's full logits); pretraining does when
    train.fused_loss says so (auto: a vocabulary wider than one of trl's tiles, whose buffer is 32,768 entries
    wide whatever the vocabulary), except a mixture of experts, whose router statistics come with the model's own
    loss. The runner decides by this function too (hf_vram/train/savings.py)."""
    if recipe.task in FUSED_ONLY_TASKS or recipe.task in FULL_LOGITS_TASKS:
        return recipe.task in FUSED_ONLY_TASKS
    if recipe.task == "pretrain" and getattr(config, "output_router_logits", False):
        return False
    if recipe.train.fused_loss == "auto":
        return recipe.task != "pretrain" or config.vocab_size > FUSED_TILE_VOCAB
    return recipe.train.fused_loss


def _loss_item(config, recipe: Recipe, tokens: int, act: int, fused: bool, cpu: bool) -> Item:
    vocab, h = config.vocab_size, config.hidden_size
    if not fused:
        # Full logits: the logits, their fp32 log-softmax and its gradient (measured: 12 bytes per token and
        # vocabulary entry in fp32 on the CPU).
        return Item("logits and loss", int(tokens * vocab * (act + 4 + 4)),
                    f"{tokens} tokens x {vocab:,} vocabulary: logits, fp32 log-softmax and gradient")
    if cpu:
        # hf_vram/train/cpu_fused_loss.py: a chunk's logits and their log-softmax (fp32) at a time; the flattened
        # hidden states and the fp32 d log p / d hidden of every token, kept for backward, which scales it.
        rows = min(tokens, max(1, CPU_CHUNK_VALUES // vocab))
        b = 2 * rows * vocab * 4 + tokens * h * (act + 4 + 4) + 8 * 4 * tokens
        return Item("logits and loss", int(b), f"fused LM head on the CPU: {rows} tokens x {vocab:,} at a time, never "
                    "the full logits")
    # trl's ChunkedLogProbFunction: one [4,096 tokens x 32,768 vocabulary] tile buffer in the compute dtype (that
    # wide whatever the vocabulary); its input (the hidden states of the scored tokens) saved for backward, whose
    # gradient it accumulates in fp32, and eight fp32 statistics per token.
    rows = min(tokens, FUSED_TILE_TOKENS)
    b = rows * FUSED_TILE_VOCAB * act + tokens * h * (2 * act + 4) + 8 * 4 * tokens
    if recipe.adapter.type == "none":
        b += vocab * h * 4  # a trained head's gradient, accumulated in fp32
    return Item("logits and loss", int(b), f"trl's fused LM head: {rows} tokens x {FUSED_TILE_VOCAB:,} entries per tile "
                f"(vocabulary {vocab:,}), never the full logits")


def _step_peak(recipe: Recipe, counts: Counts, a: Activations, static: int, grads: int, logits: int, pbytes: int,
               layers: int) -> int:
    """The items are not all alive at once. Weights, adapter and optimizer states stay. Without checkpointing the
    peak comes as backward starts: every saved activation and the loss are alive, gradients barely begun; or at
    its end, with all gradients and the logits' gradient (2 of the loss's 3 copies). With checkpointing the loss
    is freed before layers are recomputed, which then run beside the gradients, and about half the loss's
    memory is still held when the gradients are complete. (Fitted to and checked against measured steps by
    bench/vram_accuracy.py.)"""
    if recipe.train.gradient_checkpointing:
        # The recomputed layer's backward: the first one backward reaches (the last layer) runs beside every
        # checkpoint but only the embeddings' and head's gradients; the last one beside one checkpoint and every
        # other layer's gradients (its own come at its end). Between them the sum moves linearly, so one of the
        # two ends is the peak.
        grads_first = counts.other * pbytes if recipe.adapter.type == "none" else 0
        grads_last = grads - (grads - grads_first) / layers
        one_layer = a.per_layer + a.hidden_grads + a.backward_extra
        ck = a.checkpoints
        dynamic = max(ck + logits, ck + grads_first + one_layer, min(ck, a.checkpoint) + grads_last + one_layer,
                      ck + grads + logits / 2)
    else:
        saved = a.item.bytes
        # By the time a layer's backward runs, the loss's tensors are freed.
        dynamic = max(saved + logits, saved + a.backward_extra, grads + 2 * logits / 3)
    return int(static + dynamic)


def estimate(config, recipe: Recipe, gpu: GPU, compute_dtype: str = "bfloat16", samples: int | None = None,
             counts: Counts | None = None, fused_loss: bool | None = None, math_attention: bool = False) -> Plan:
    """The predicted peak of one training step, item by item, and the predicted time of the whole recipe.
    math_attention: planned for the CPU (sdpa's math kernel, torch fallbacks of trl's kernels, nowhere to
    offload to)."""
    t = recipe.train
    counts = counts or count_parameters(config, recipe)
    act = _bytes(compute_dtype)
    # The residual stream follows the embeddings' dtype: fp32 when a quantized base keeps them in fp32.
    res = 4 if recipe.quant.bits and unquantized_bytes(recipe, compute_dtype) == 4 else act
    micro, seq = t.micro_batch_size, sequence_length(recipe)
    tokens = micro * trained_sequences(recipe) * seq

    items = [weights_item(counts, recipe, compute_dtype)]
    pbytes = trainable_bytes(recipe, compute_dtype)
    trainable = counts.trainable
    if recipe.adapter.type != "none":
        items.append(Item("adapter", trainable * pbytes, f"{recipe.adapter.type}: {trainable:,} parameters"))
    items.append(Item("gradients", trainable * pbytes, f"{pbytes} bytes per trainable parameter"))
    opt, note = optimizer_bytes(t.optimizer, trainable, pbytes, counts.trainable_small)
    items.append(Item("optimizer states", opt, note))
    a = _activations(config, recipe, counts, act, res, math_attention, cuda=not math_attention)
    items.append(a.item)
    fused = loss_uses_fused_head(config, recipe) if fused_loss is None else fused_loss
    items.append(_loss_item(config, recipe, tokens, act, fused, cpu=math_attention))
    cast = 0
    if recipe.adapter.type == "none" and act == 2:
        # Mixed precision keeps fp32 weights; autocast makes a bf16 copy of each matmul weight, which the matmul
        # saves for backward, so the copies live from forward to backward.
        h, vocab = config.hidden_size, config.vocab_size
        cast = (counts.block_linear + (vocab * h if not getattr(config, "tie_word_embeddings", False) else 0)) * 2
        items.append(Item("autocast weight copies", cast, "a bf16 copy of every matmul weight, forward to backward"))
    b = {i.name: i.bytes for i in items}
    static = b["weights"] + b.get("adapter", 0) + b["optimizer states"] + cast
    step_peak = _step_peak(recipe, counts, a, static, b["gradients"], b["logits and loss"], pbytes, config.num_hidden_layers)
    if recipe.task == "grpo":
        items.append(generation_item(config, recipe, act))
        step_peak = max(step_peak, static + items[-1].bytes)  # sampling runs between training steps, not during one
    slack = int(ALLOCATOR_OVERHEAD * step_peak)
    items.append(Item("CUDA context + allocator", CUDA_CONTEXT + slack,
                      f"{CUDA_CONTEXT / GiB:.1f} GiB context, {ALLOCATOR_OVERHEAD:.0%} caching-allocator slack"))

    fpt = flops_per_token(config, seq, recipe, counts.total)
    steps = t.max_steps or (math.ceil(t.epochs * samples / (micro * t.grad_accum)) if samples else None)
    kind = "full" if recipe.adapter.type == "none" else ("qlora" if recipe.quant.bits else "adapter")
    mfu = MFU[kind]
    step_tokens = micro * t.grad_accum * seq * trained_sequences(recipe)
    seconds = steps * step_tokens * fpt / (gpu.bf16_tflops * 1e12 * mfu) if steps else None
    sampling = generation_seconds(config, recipe, gpu, b["weights"] + b.get("adapter", 0), counts.total) if recipe.task == "grpo" else 0.0
    seconds = seconds + steps * sampling if seconds is not None else None
    settings = {k: getattr(t, k) for k in ("micro_batch_size", "grad_accum", "gradient_checkpointing", "optimizer")}
    settings["max_length"] = seq
    return Plan(items, gpu, counts.total, trainable, settings, fpt, step_tokens, steps, seconds, mfu,
                step_peak=step_peak, peak=step_peak + CUDA_CONTEXT + slack, notes=_notes(config, recipe, counts, act),
                host_bytes=a.host, sampling_seconds=sampling)


def _notes(config, recipe: Recipe, counts: Counts, act: int) -> list[str]:
    notes = []
    if getattr(config, "num_local_experts", None) and recipe.quant.bits:
        notes.append("bitsandbytes quantizes nn.Linear layers only: the experts' 3-D weights stay unquantized (fp32 "
                     "after peft's prepare_model_for_kbit_training), and they are most of a mixture of experts")
    if counts.adapted_expert_values:
        copy = counts.adapted_expert_values * act / GiB
        notes.append(f"LoRA on the experts: peft adds BA to every expert weight in each forward and keeps the sum for "
                     f"backward ({copy:.2f} GiB per layer); adapters on attention only (adapter.target_modules: "
                     "[q_proj, k_proj, v_proj, o_proj]) avoid that")
    if config.model_type == "mamba":
        notes.append("mamba: transformers' pure-torch scan, which keeps (inner x state) tensors per token; mamba-ssm's "
                     "CUDA kernels, when installed, keep far less, so this is an upper bound there")
    if config.model_type == "bitnet":
        packed = (counts.block_linear / 4 + counts.other * 2) / GiB
        notes.append(f"bitnet: ternary only in the forward; training keeps fp32 master weights, gradients and AdamW "
                     f"states like any full training (the quantised copies of weights and activations not counted). "
                     f"The packed export for inference: {packed:.2f} GiB (2 bits per block weight, the rest bf16)")
    if config.model_type not in CHECKED_FAMILIES:
        notes.append(f"{config.model_type}: activations are counted as for a Llama block; bench/vram_accuracy.py has "
                     f"checked {', '.join(CHECKED_FAMILIES)} only")
    if recipe.train.kernels != "none":
        notes.append("liger-kernel's RMSNorm, RoPE and SwiGLU (train.kernels, on GPUs where it is installed) keep less "
                     "than counted here: the plan is an upper bound with them")
    return notes


def flops_per_token(config, seq: int, recipe: Recipe, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4) plus attention scores
    (12 x layers x hidden x seq, causal masking not discounted), as in nanoGPT and trl's compute_flops_per_token.
    A frozen base skips its weight gradients (4 per weight instead of 6); checkpointing runs the forward twice."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = getattr(config, "num_attention_heads", None) or 1  # attention-free blocks (Mamba, RWKV): no score term
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    i = getattr(config, "intermediate_size", None) or 4 * h
    experts = getattr(config, "num_experts_per_tok", None) or 1
    matmul = layers * (h * (heads * head_dim + 2 * kv) + heads * head_dim * h + 3 * h * i * experts) + config.vocab_size * h
    f = 6.0 * matmul + 12.0 * layers * heads * head_dim * seq
    if getattr(config, "num_attention_heads", None) is None and n_params:
        f = 6.0 * n_params  # attention-free blocks (Mamba, RWKV): 6N, the scan's own FLOPs left out
    if recipe.adapter.type != "none":
        f *= 2 / 3
    if recipe.train.gradient_checkpointing:
        f *= 4 / 3
    return f
