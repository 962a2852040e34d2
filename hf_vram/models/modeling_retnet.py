"""RetNet (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models",
arXiv 2307.08621) as a transformers model, following Microsoft torchscale's
`torchscale/component/multiscale_retention.py` and `torchscale/architecture/retnet.py`.

Multi-scale retention computes, per head with decay gamma (shapes per head, n the query position):

    o_n = sum_{m <= n} (q_n . k_m) * gamma^(n - m) / sqrt(s_n) * v_m,     s_n = sum_{m <= n} gamma^(n - m)

with q, k rotated by position (torchscale's `theta_shift`), then divided by a per-row normaliser, RMS-normed per
head (the "group norm"), gated by silu(g) and projected out. It has three equivalent forms, all implemented here:

* parallel (training): the whole T x T decay mask at once;
* recurrent (generation): a constant-size state S_n = sum_m gamma^(n-m) k_m^T v_m / sqrt(s_n) and its "scale" s_n,
  updated per token exactly as torchscale's `recurrent_forward`;
* chunkwise (long sequences): parallel inside chunks, the recurrent state carried across them.

Deviations from torchscale, each so that the three forms give the same outputs (torchscale's forms agree only up to
the group norm's epsilon, because each normalises differently):

1. Row normaliser. torchscale divides the parallel scores by `clamp(sum_m |score_nm|, 1)`; that sum of absolute
   values needs every past key, so its recurrent form skips it and its chunkwise form uses yet another bound. Here
   every form divides by `max(|sum_m score_nm|, 1)`, the absolute value of the signed row sum, which a recurrent
   state can carry: the values get an extra constant channel of ones, so the state's last column accumulates the
   decayed key sum and `q_n . state` yields the row sum next to the output. As in torchscale, the normaliser is
   detached, and the group norm that follows makes the output nearly invariant to it.
2. Padding. The decay normaliser s_n counts only unmasked tokens (s_n = sum_m gamma^(n-m) mask_m) and masked tokens
   add nothing to the state, so a left-padded row gives the same outputs as the unpadded sequence. Without padding
   s_n is torchscale's `mask.sum(-1)` / "scale" state exactly. Where s_n < 1 (only rows that are padding
   themselves) it is floored at 1 to keep the division finite; every form uses the same floor.
3. Layer norms are RMSNorm (torchscale's current RetNet); the group norm is RMSNorm without affine (torchscale's
   `group_norm`); no DeepNorm / SubLN scaling, no drop-path, no embedding scale (torchscale's defaults).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep

# Relative, not through the package's name: save_pretrained copies this file and the one it imports beside the
# weights, and transformers loads the pair as a package of its own (trust_remote_code), hf-vram not installed.
from .configuration_retnet import RetNetConfig

# ---------------------------------------------------------------------------------------------------------------------
# Decay and rotation (torchscale's RetNetRelPos)
# ---------------------------------------------------------------------------------------------------------------------


def retention_log_decay(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """log(gamma_h) with gamma_h = 1 - 2^(-5 - h): torchscale's `decay = log(1 - 2**(-5 - arange(heads)))`.
    Head 0 forgets fastest (half-life ~22 tokens); each next head remembers about twice as long."""
    return torch.log(1 - 2 ** (-5 - torch.arange(num_heads, dtype=torch.float, device=device)))


def retention_decay(num_heads: int) -> torch.Tensor:
    """The per-head decay gamma_h = 1 - 2^(-5 - h)."""
    return retention_log_decay(num_heads).exp()


def rotation_angles(key_head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """torchscale's `angle = 1 / 10000**linspace(0, 1, d // 2)`, each angle repeated for the pair it rotates."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, key_head_dim // 2, device=device))
    return angle.repeat_interleave(2)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def theta_shift(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` by position-dependent angles (torchscale's xPos-style rotation, no scaling)."""
    return x * cos + rotate_every_two(x) * sin


def decay_mask(log_decay: torch.Tensor, length: int) -> torch.Tensor:
    """(heads, length, length): gamma^(n - m) on and below the diagonal, 0 above; not yet row-normalised."""
    index = torch.arange(length, device=log_decay.device, dtype=log_decay.dtype)
    distance = index[:, None] - index[None, :]
    causal = distance >= 0
    mask = torch.exp(distance.clamp(min=0)[None] * log_decay[:, None, None])
    return mask * causal


# ---------------------------------------------------------------------------------------------------------------------
# The three forms of retention. Shapes: q, k (B, H, T, dk) rotated and scaled; va (B, H, T, dv + 1), the values with
# the ones channel appended and masked tokens zeroed; mask (B, T) float; state = (kv (B, H, dk, dv + 1), scale (B, H)).
# Each returns the un-normalised output (B, H, T, dv + 1), whose last channel is the signed row sum, and the state
# after the last token.
# ---------------------------------------------------------------------------------------------------------------------


def _floor(scale: torch.Tensor) -> torch.Tensor:
    # Only rows that are themselves padding can have a decay sum below 1 (a real token adds 1 to its own row).
    return scale.clamp(min=1.0)


def parallel_retention(q, k, va, log_decay, mask, return_state: bool):
    """Whole-sequence form: scores (q k^T) times the decay mask, each row scaled by 1 / sqrt(s_n)."""
    length = q.shape[-2]
    decay = decay_mask(log_decay, length)  # (H, T, T) float32
    scale = torch.einsum("htm,bm->bht", decay, mask.float())  # s_n over unmasked tokens, (B, H, T)
    inv_sqrt = _floor(scale).rsqrt()
    scores = (q @ k.transpose(-1, -2)) * (decay[None] * inv_sqrt[..., None]).to(q.dtype)
    out = scores @ va
    state = None
    if return_state:
        # The state after token T-1 is its own row of the normalised mask applied to k^T v.
        weights = (decay[None, :, -1, :] * inv_sqrt[..., -1:]).to(va.dtype)  # (B, H, T)
        kv = k.transpose(-1, -2) @ (va * weights[..., None])
        state = (kv, scale[..., -1])
    return out, state


def recurrent_retention(q, k, va, log_decay, mask, state):
    """Token-by-token form with O(1) state, torchscale's `recurrent_forward`:
    s_n = gamma * s_{n-1} + mask_n;  S_n = S_{n-1} * gamma * sqrt(s_{n-1} / s_n) + k_n^T v_n / sqrt(s_n);  o_n = q_n S_n."""
    batch, heads, length, key_dim = q.shape
    gamma = log_decay.exp()[None]  # (1, H)
    if state is None:
        kv = q.new_zeros(batch, heads, key_dim, va.shape[-1])
        scale = torch.zeros(batch, heads, device=q.device, dtype=torch.float)
    else:
        kv, scale = state
    outs = []
    for t in range(length):
        new_scale = scale * gamma + mask[:, t, None].float()
        carry = gamma * (_floor(scale) / _floor(new_scale)).sqrt()
        inv_sqrt = _floor(new_scale).rsqrt()
        update = k[:, :, t, :, None] * va[:, :, t, None, :]  # k_n^T v_n, (B, H, dk, dv + 1)
        kv = kv * carry[..., None, None].to(kv.dtype) + update * inv_sqrt[..., None, None].to(kv.dtype)
        scale = new_scale
        outs.append(q[:, :, t, None, :] @ kv)
    return torch.cat(outs, dim=2), (kv, scale)


def chunkwise_retention(q, k, va, log_decay, mask, state, chunk_size: int):
    """Chunks of `chunk_size` tokens: parallel form inside a chunk, plus the carried state decayed to each position;
    the state is then advanced by a whole chunk at once. The last chunk may be shorter."""
    batch, heads, length, key_dim = q.shape
    size = min(chunk_size, length)
    decay = decay_mask(log_decay, size)  # (H, C, C); a shorter chunk uses its top-left block
    steps = torch.arange(1, size + 1, device=q.device, dtype=torch.float)
    powers = torch.exp(log_decay[:, None] * steps)  # gamma^(i+1), (H, C)
    if state is None:
        kv = q.new_zeros(batch, heads, key_dim, va.shape[-1])
        scale = torch.zeros(batch, heads, device=q.device, dtype=torch.float)
    else:
        kv, scale = state
    outs = []
    for start in range(0, length, size):
        end = min(start + size, length)
        n = end - start
        d = decay[:, :n, :n]
        inner_scale = torch.einsum("hij,bj->bhi", d, mask[:, start:end].float())
        row_scale = powers[None, :, :n] * scale[..., None] + inner_scale  # s_i, continuing the carried sum
        inv_sqrt = _floor(row_scale).rsqrt()
        # gamma^(i+1) * sqrt(s_p / s_i): how much of the carried (normalised) state reaches row i.
        carry = powers[None, :, :n] * (_floor(scale)[..., None] / _floor(row_scale)).sqrt()
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], va[:, :, start:end]
        inner = ((qc @ kc.transpose(-1, -2)) * (d[None] * inv_sqrt[..., None]).to(q.dtype)) @ vc
        cross = (qc @ kv) * carry[..., None].to(q.dtype)
        outs.append(inner + cross)
        weights = (d[None, :, -1, :] * inv_sqrt[..., -1:]).to(vc.dtype)
        kv = kv * carry[..., -1, None, None].to(kv.dtype) + kc.transpose(-1, -2) @ (vc * weights[..., None])
        scale = row_scale[..., -1]
    return torch.cat(outs, dim=2), (kv, scale)


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


class RetNetCacheLayer(LinearAttentionCacheLayerMixin):
    """One block's recurrent state. Its size depends on batch, heads and head dims only, never on the number of
    tokens seen. States: 0 the normalised key-value state (B, H, dk, dv + 1), whose last column is the decayed key
    sum behind the row normaliser; 1 torchscale's "scale", the decay sum s_n (B, H), float32; 2 the next rotation
    position of each row (B,), i.e. how many unmasked tokens it has seen.

    Subclassing the linear-attention mixin marks the cache as recurrent to `generate` (no KV slicing, no attention
    masks) and brings reset / beam reordering of the states."""

    KV, SCALE, POSITION = 0, 1, 2
    # The update assigns new tensors rather than copying into fixed buffers, so no static addresses for cudagraphs.
    is_compileable = False

    def __init__(self):
        super().__init__(number_of_states=3)

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        if recurrent_states is not None:
            if self.device is None:
                self.device, self.dtype = recurrent_states.device, recurrent_states.dtype
            self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states, state_idx: int = 0, **kwargs):
        raise NotImplementedError("RetNet keeps no convolution state")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i, value in self.recurrent_states.items():
            if value is not None:
                self.recurrent_states[i] = value.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for i, value in self.recurrent_states.items():
            if value is not None:
                self.recurrent_states[i] = value[indices, ...]


class RetNetCache(Cache):
    """The recurrent states of all blocks, passed through `generate` as `cache` like any transformers cache.

    Because the state already summarises the past, a forward with a non-empty cache must receive only the new
    tokens (as `generate` does at every decoding step)."""

    def __init__(self, config: RetNetConfig):
        super().__init__(layers=[RetNetCacheLayer() for _ in range(config.num_hidden_layers)])

    def get_retention_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        layer = self.layers[layer_idx]
        if not layer.has_previous_state[RetNetCacheLayer.KV]:
            return None
        return layer.recurrent_states[RetNetCacheLayer.KV], layer.recurrent_states[RetNetCacheLayer.SCALE]

    def update_retention_state(self, layer_idx: int, kv: torch.Tensor, scale: torch.Tensor) -> None:
        self.update_recurrent_state(kv, layer_idx, state_idx=RetNetCacheLayer.KV)
        self.update_recurrent_state(scale, layer_idx, state_idx=RetNetCacheLayer.SCALE)

    def get_positions(self) -> torch.Tensor | None:
        """Next rotation position of each row, or None before the first forward."""
        layer = self.layers[0]
        if not layer.has_previous_state[RetNetCacheLayer.POSITION]:
            return None
        return layer.recurrent_states[RetNetCacheLayer.POSITION]

    def set_positions(self, positions: torch.Tensor) -> None:
        # Kept in every layer so that beam reordering and batch selection, which act per layer, move it too.
        for layer_idx in range(len(self.layers)):
            self.update_recurrent_state(positions, layer_idx, state_idx=RetNetCacheLayer.POSITION)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unmasked tokens absorbed by the longest row (the base class refuses for recurrent-only caches)."""
        positions = self.get_positions()
        return 0 if positions is None else int(positions.max())

    def state_nbytes(self) -> int:
        """Bytes held by all states: constant once the first forward has run, however many tokens follow."""
        return sum(
            value.numel() * value.element_size()
            for layer in self.layers
            for value in layer.recurrent_states.values()
            if value is not None
        )


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


class RetNetRMSNorm(nn.Module):
    """RMSNorm in float32, as torchscale's; without affine weight it is retention's per-head group norm."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        out = out.type_as(x)
        return out * self.weight if self.weight is not None else out


class RetNetMultiScaleRetention(nn.Module):
    """torchscale's MultiScaleRetention: q/k of width d (key head dim d / H), v/g of width value_factor * d."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.key_dim = config.hidden_size // self.num_heads
        self.head_dim = config.value_dim // self.num_heads
        self.scaling = self.key_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.value_dim, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, config.value_dim, bias=False)
        self.out_proj = nn.Linear(config.value_dim, config.hidden_size, bias=False)
        # torchscale's MultiScaleRetention.reset_parameters, applied by RetNetPreTrainedModel._init_weights.
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            proj.xavier_gain = 2**-2.5
        self.out_proj.xavier_gain = 2**-1
        self.group_norm = RetNetRMSNorm(self.head_dim, eps=config.layer_norm_eps, elementwise_affine=False)

    @property
    def decay(self) -> torch.Tensor:
        """Per-head gamma, recomputed rather than stored: it is fixed, so it needs no checkpoint entry."""
        return retention_decay(self.num_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        token_mask: torch.Tensor,
        mode: str,
        chunk_size: int,
        cache: RetNetCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        sin, cos = rotation
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.key_dim).transpose(1, 2)
        k = self.k_proj(hidden_states) * self.scaling
        k = k.view(batch, length, self.num_heads, self.key_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        g = self.g_proj(hidden_states)
        q, k = theta_shift(q, sin, cos), theta_shift(k, sin, cos)
        # The ones channel carries the row sums of the scores through every form (see the module docstring);
        # masking it and v drops padded tokens from outputs and state alike.
        va = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) * token_mask[:, None, :, None].to(v.dtype)

        log_decay = retention_log_decay(self.num_heads, device=q.device)
        state = cache.get_retention_state(self.layer_idx) if cache is not None else None
        if mode == "recurrent":
            out, state = recurrent_retention(q, k, va, log_decay, token_mask, state)
        elif mode == "chunkwise":
            out, state = chunkwise_retention(q, k, va, log_decay, token_mask, state, chunk_size)
        else:
            out, state = parallel_retention(q, k, va, log_decay, token_mask, return_state=cache is not None)
        if cache is not None:
            cache.update_retention_state(self.layer_idx, *state)

        out = out[..., :-1] / out[..., -1:].detach().abs().clamp(min=1.0)
        out = self.group_norm(out).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(nn.functional.silu(g) * out)


class RetNetGLU(nn.Module):
    """torchscale's GLU feed-forward: fc2(act(fc1(x)) * gate(x)), no biases."""

    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x)) * self.gate(x)))


class RetNetDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + retention(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.retention_layer_norm = RetNetRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.retention = RetNetMultiScaleRetention(config, layer_idx)
        self.final_layer_norm = RetNetRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = RetNetGLU(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        token_mask: torch.Tensor,
        mode: str = "parallel",
        chunk_size: int = 512,
        cache: RetNetCache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.retention(
            self.retention_layer_norm(hidden_states), rotation, token_mask, mode, chunk_size, cache=cache
        )
        hidden_states = residual + self.dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.ffn(self.final_layer_norm(hidden_states))
        return residual + self.dropout(hidden_states)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class RetNetPreTrainedModel(PreTrainedModel):
    config: RetNetConfig
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetDecoderLayer"]
    # The state cannot be rolled back to an earlier token, which assisted generation would need.
    _is_stateful = True

    def _init_weights(self, module):
        # The gain sits on the Linear itself: transformers skips `_init_weights` for modules that hold no parameters
        # of their own (such as the retention module) when the model is not part of the library.
        gain = getattr(module, "xavier_gain", None)
        if gain is not None:
            init.xavier_uniform_(module.weight, gain=gain)
        else:
            super()._init_weights(module)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """save_pretrained, with `auto_map` naming both model classes of the copied modeling file: transformers 5.24's
        `custom_object_save` writes only the saved class's own entry, so a causal LM output would load with
        AutoModelForCausalLM but not with AutoModel where hf-vram is not installed.
        tests/test_retnet_remote_code.py::test_transformers_still_maps_only_the_class_being_saved fails once
        transformers writes more than that entry itself."""
        if self.is_remote_code():
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP_MODELS}
        return super().save_pretrained(save_directory, *args, **kwargs)


class RetNetModel(RetNetPreTrainedModel):
    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RetNetDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.layer_norm = RetNetRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rotation(self, position_ids: torch.Tensor, dtype: torch.dtype):
        key_dim = self.config.hidden_size // self.config.num_attention_heads
        angle = rotation_angles(key_dim, device=position_ids.device)
        phase = position_ids[:, None, :, None].float() * angle  # (B, 1, T, dk), broadcast over heads
        return phase.sin().to(dtype), phase.cos().to(dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, past + T)` or `(batch, T)`, *optional*):
            1 for real tokens, 0 for padding (left padding: a padded row gives the outputs of the unpadded one).
        position_ids (`torch.LongTensor` of shape `(batch, T)`, *optional*):
            Rotation positions; by default counted over unmasked tokens, continuing from the cache.
        cache (`RetNetCache`, *optional*):
            Recurrent state from earlier calls; with it, pass only the new tokens. One token is processed in the
            recurrent form, several in the chunkwise form; without a state, `config.forward_impl` decides.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        use_cache, cache = self._cache_for_call(use_cache, cache)

        length = inputs_embeds.shape[1]
        token_mask = self._token_mask(attention_mask, inputs_embeds)
        past_positions = cache.get_positions() if cache is not None else None
        if position_ids is None:
            position_ids = self._default_positions(token_mask, past_positions)
        rotation = self._rotation(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)
        mode = self._mode(cache is not None and past_positions is not None, length)
        hidden_states, all_hidden_states = self._run_layers(
            inputs_embeds, rotation, token_mask, mode, cache, output_hidden_states
        )
        if cache is not None:
            cache.set_positions(position_ids[:, -1].to(inputs_embeds.device) + 1)
        kept_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, kept_cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=kept_cache, hidden_states=all_hidden_states)

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def _cache_for_call(self, use_cache: bool | None, cache) -> tuple[bool, RetNetCache | None]:
        """(use_cache, the state this call reads and advances): a new one when the call keeps a cache and has none."""
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The checkpointed blocks run again in backward; a cache would be advanced twice.
            use_cache, cache = False, None
        if cache is not None and not isinstance(cache, RetNetCache):
            raise TypeError(f"RetNet needs a RetNetCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = RetNetCache(self.config)
        return use_cache, cache

    @staticmethod
    def _token_mask(attention_mask, inputs_embeds) -> torch.Tensor:
        """1 for the real tokens of this call, 0 for padding (the mask may also cover the cached tokens)."""
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is not None:
            return attention_mask[:, -length:].to(inputs_embeds.device)
        return torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)

    @staticmethod
    def _default_positions(token_mask: torch.Tensor, past_positions) -> torch.Tensor:
        """Positions counted over unmasked tokens, continuing from the cached ones."""
        position_ids = (token_mask.long().cumsum(-1) - 1).clamp(min=0)
        if past_positions is not None:
            position_ids = position_ids + past_positions[:, None]
        return position_ids

    def _mode(self, has_state: bool, length: int) -> str:
        """One new token on a state: the recurrent form; several: chunkwise; no state: config.forward_impl."""
        if has_state:
            return "recurrent" if length == 1 else "chunkwise"
        return self.config.forward_impl

    def _run_layers(self, hidden_states, rotation, token_mask, mode: str, cache, output_hidden_states: bool):
        """(final normed hidden states, every layer's input and the final output when output_hidden_states)."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, rotation, token_mask, mode=mode, chunk_size=self.config.chunk_size, cache=cache
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return hidden_states, all_hidden_states


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `generate` would otherwise build a DynamicCache of KV layers; the model creates its RetNetCache on the
        # first forward and `generate` carries it from step to step through `outputs.cache`.
        return False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, T)`, *optional*):
            Targets for next-token loss; shifted inside (labels = input_ids is right), -100 is ignored.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return (loss, *output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


# Registered here rather than in the package's __init__.py so that the classes are registered wherever this file
# runs, also as a copy loaded by trust_remote_code: save_pretrained then writes `auto_map` into config.json and copies
# this file and configuration_retnet.py beside the weights, so an output loads with transformers and torch alone.
RetNetModel.register_for_auto_class("AutoModel")
RetNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# The entries of both model classes, by the name the copied file has beside the weights (modeling_retnet).
_MODULE = __name__.rsplit(".", 1)[-1]
AUTO_MAP_MODELS = {"AutoModel": f"{_MODULE}.RetNetModel", "AutoModelForCausalLM": f"{_MODULE}.RetNetForCausalLM"}

__all__ = [
    "AUTO_MAP_MODELS",
    "RetNetCache",
    "RetNetCacheLayer",
    "RetNetForCausalLM",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "chunkwise_retention",
    "parallel_retention",
    "recurrent_retention",
    "retention_decay",
    "retention_log_decay",
]
