"""RetNet configuration: the hyper-parameters of torchscale's `RetNetConfig`, under transformers' usual names.

Name map to torchscale (`torchscale/architecture/config.py`):
    hidden_size            <- decoder_embed_dim
    num_hidden_layers      <- decoder_layers
    num_attention_heads    <- decoder_retention_heads
    value_factor           <- decoder_value_embed_dim / decoder_embed_dim (the paper uses 2)
    intermediate_size      <- decoder_ffn_embed_dim
    hidden_act             <- activation_fn (applied inside the GLU feed-forward, torchscale's `use_glu=True`)
    layer_norm_eps         <- layernorm_eps
    hidden_dropout         <- dropout
    activation_dropout     <- activation_dropout
    chunk_size             <- recurrent_chunk_size
    forward_impl           <- chunkwise_recurrent (False -> "parallel", True -> "chunkwise")
    tie_word_embeddings    <- share_decoder_input_output_embed
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

FORWARD_IMPLS = ("parallel", "chunkwise")


@strict
class RetNetConfig(PreTrainedConfig):
    r"""
    vocab_size (`int`): size of the token vocabulary.
    hidden_size (`int`): model width d; also the query/key width of retention (key head dim = d / heads).
    num_hidden_layers (`int`): number of RetNet blocks.
    num_attention_heads (`int`): number of retention heads; head h decays with gamma_h = 1 - 2^(-5 - h).
    value_factor (`int | float`): value (and gate) width of retention = value_factor * hidden_size. RetNet uses 2,
        which is what makes a retention block cost about as much as a 4d-wide attention block.
    intermediate_size (`int`, *optional*): width of the GLU feed-forward; defaults to 2 * hidden_size, the paper's
        FFN size (RetNet moves parameters from the FFN into the wider values).
    hidden_act (`str`): activation inside the GLU feed-forward, `act(fc1(x)) * gate(x)`. torchscale's default is
        "gelu"; "silu" gives the SwiGLU variant.
    max_position_embeddings (`int`): nominal context length (retention has no learned positions; kept for tools
        that read it, e.g. pipelines choosing a default max length).
    layer_norm_eps (`float`): epsilon of the RMS norms (block pre-norms, final norm and per-head group norm).
    hidden_dropout (`float`): dropout on the retention and FFN outputs before the residual add.
    activation_dropout (`float`): dropout inside the FFN, after the gated activation.
    initializer_range (`float`): std of the normal init of embeddings, FFN and LM head.
    chunk_size (`int`): chunk length of the chunkwise form; also used whenever several tokens are fed on top of
        a cached state.
    forward_impl (`str`): "parallel" (whole T x T decay mask, fastest for training lengths) or "chunkwise"
        (memory linear in T, for long sequences). Both give the same outputs; read at every forward, so setting
        `model.config.forward_impl` switches a live model.
    use_cache (`bool`): whether forward returns the recurrent state by default (not in training mode).
    """

    model_type = "retnet"

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    value_factor: int | float = 2
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-6
    hidden_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    initializer_range: float = 0.02
    chunk_size: int = 512
    forward_impl: str = "parallel"
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        super().__post_init__(**kwargs)

    @property
    def value_dim(self) -> int:
        return int(self.value_factor * self.hidden_size)

    def validate_architecture(self):
        """Part of `@strict` validation: the head split must be exact and the rotation needs an even key head."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the key head dim (hidden_size / num_attention_heads) must be even for the rotation")
        if self.value_dim % self.num_attention_heads:
            raise ValueError(f"value dim {self.value_dim} is not divisible by {self.num_attention_heads} heads")
        if self.forward_impl not in FORWARD_IMPLS:
            raise ValueError(f"forward_impl must be one of {FORWARD_IMPLS}, got {self.forward_impl!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# config.save_pretrained then writes `auto_map["AutoConfig"]` and copies this file beside config.json, so the config
# loads without hf-vram (trust_remote_code=True). Here, not in the package's __init__.py: the copy registers too.
RetNetConfig.register_for_auto_class()

__all__ = ["RetNetConfig"]
