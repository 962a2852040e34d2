"""Assemble a Mixtral mixture-of-experts from dense Llama/Mistral models: the job of mergekit-moe.

The base model gives the MoE everything but the MLPs (embeddings, attention, norms, LM head); expert i's MLP in
every layer is copied from expert i's source model, and each layer's router gets one row per expert. The rows
are set the way mergekit-moe sets them (gate_mode):

- hidden: the base model reads each expert's positive prompts; the row for layer L is the mean over prompts of
  the vector that reaches layer L's MLP at the prompt's last token, minus the same mean over the negative
  prompts, scaled to unit length. A token is then sent to the experts whose prompts' states it most resembles.
- cheap_embed: the same without running the model: the sum of the prompts' token embeddings, in every layer.
- random: seeded random directions, for a router that is going to be trained.

Hand-written because no installed library does this: mergekit is not a dependency, and its MoE code is a
command-line program (no library API) that writes safetensors shards itself. Building a transformers
`MixtralForCausalLM` in memory and filling its tensors instead lets transformers own the checkpoint layout, so
the output is whatever `from_pretrained` and `pipeline` load.

Memory: the base, the MoE and one expert at a time are in memory together (experts are loaded one by one and
dropped once their MLPs are copied).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from hf_vram.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch

GATE_MODES = ("hidden", "cheap_embed", "random")
DTYPES = ("float32", "bfloat16", "float16")
# Dense families whose decoder layer is Mixtral's with a single SwiGLU MLP in place of the sparse block.
DENSE_TYPES = ("llama", "mistral")
# What every model must share with the base: one attention and embedding serve all experts, and each expert's
# MLP must have the shapes (and activation) of the fused expert tensors.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
)

# mergekit-moe's YAML (its MoEMergeConfig), as far as a Mixtral output uses it.
YAML_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "seed")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts")
UNSUPPORTED_KEYS = {
    "shared_experts": "shared experts belong to the Qwen2-MoE/DeepSeek layouts; a Mixtral has none. Remove the key",
    "tokenizer_source": "the tokenizer is the base model's; give another one as the assembly's tokenizer_source "
    "instead of in this file",
    "tokenizer": "the tokenizer is the base model's; give another one as the assembly's tokenizer_source "
    "instead of in this file",
}
# Expert keys mergekit accepts that change the expert's weights; only their no-op values are accepted.
NEUTRAL_EXPERT_KEYS = {"noise_scale": (None, 0, 0.0), "residual_scale": (None, 1, 1.0)}


@dataclass
class ExpertSpec:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)


@dataclass
class AssembleSpec:
    base_model: str
    experts: list[ExpertSpec]
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    experts_per_token: int = 2
    # Used by gate_mode random only (mergekit-moe's --random-seed).
    seed: int = 0


def read_mergekit_yaml(path: str | Path) -> AssembleSpec:
    """A mergekit-moe config file as an AssembleSpec. Relative local paths are taken relative to the file;
    names that are no local path stay as they are (Hub ids). Every problem in the file is reported at once."""
    path = Path(path)
    data = _read_yaml_mapping(path)
    problems = _top_level_key_problems(data)
    base = _read_base(data, path.parent, problems)
    experts = _read_experts(data, path.parent, problems)
    if problems:
        raise _invalid(f"mergekit-moe config {path}", problems)

    spec = AssembleSpec(base_model=base, experts=experts)
    for key in ("gate_mode", "dtype", "experts_per_token", "seed"):
        if data.get(key) is not None:
            setattr(spec, key, data[key])
    _check_spec(spec, source=f"mergekit-moe config {path}")
    return spec


def _read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a mergekit-moe YAML config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with base_model and experts, found {type(data).__name__}")
    return data


def _top_level_key_problems(data: dict) -> list[str]:
    """Keys of the file that a Mixtral output cannot honour, or that mergekit-moe does not know."""
    problems: list[str] = []
    for key, value in data.items():
        if key in UNSUPPORTED_KEYS:
            problems.append(f"{key}: not supported: {UNSUPPORTED_KEYS[key]}")
        elif key == "architecture":
            if str(value).lower() != "mixtral":
                problems.append(
                    f"architecture: '{value}' is not supported: only a Mixtral is built; set mixtral or remove the key"
                )
        elif key not in YAML_KEYS:
            problems.append(f"{key}: unknown key{did_you_mean(key, YAML_KEYS)}; the keys are {', '.join(YAML_KEYS)}")
    return problems


def _read_base(data: dict, root: Path, problems: list[str]):
    base = data.get("base_model")
    if not isinstance(base, str) or not base:
        problems.append("base_model: required: the model whose attention, embeddings and norms the MoE keeps")
        return base
    return _resolve_model_path(base, root, "base_model", problems)


def _read_experts(data: dict, root: Path, problems: list[str]) -> list[ExpertSpec]:
    experts_data = data.get("experts")
    if not isinstance(experts_data, list) or not experts_data:
        problems.append("experts: required: a list of {source_model, positive_prompts, negative_prompts}")
        return []
    experts = [_read_expert(item, f"experts[{i}]", root, problems) for i, item in enumerate(experts_data)]
    return [e for e in experts if e is not None]


def assemble(spec: AssembleSpec, output_dir: str | Path, tokenizer_source: str | Path | None = None) -> Path:
    """Build the MoE described by spec and save it (weights, config, tokenizer, generation config, and
    assembly.json with the spec) to output_dir, which must not exist or be empty. The files are written to a
    temporary folder beside output_dir and renamed into place at the end, so a failure leaves no output."""
    import torch

    _check_spec(spec, source="assembly spec")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{output_dir}: already exists and is not an empty folder; remove it or choose another output")
    dtype = getattr(torch, spec.dtype)

    # Configs first: a wrong path or a misfit expert is reported before any weights are read.
    base_config = _checked_configs(spec)
    tokenizer_ref = str(tokenizer_source) if tokenizer_source is not None else spec.base_model
    tokenizer = _load_tokenizer(tokenizer_ref, base_config.vocab_size)
    moe = _build_moe(spec, base_config, tokenizer, dtype)
    record = {"spec": asdict(spec), "tokenizer_source": tokenizer_ref, "architecture": "MixtralForCausalLM"}
    _save_atomically(moe, tokenizer, record, output_dir)
    return output_dir


def _checked_configs(spec: AssembleSpec):
    """The base's config, once it and every expert's are dense models of one shape."""
    from transformers import AutoConfig

    base_config = _load_config(AutoConfig, spec.base_model, "base_model")
    _check_dense(base_config, "base_model", spec.base_model)
    for i, expert in enumerate(spec.experts):
        config = _load_config(AutoConfig, expert.source_model, f"experts[{i}]")
        _check_dense(config, f"experts[{i}]", expert.source_model)
        _check_same_shape(config, base_config, i, expert.source_model, spec.base_model)
    return base_config


def _load_tokenizer(ref: str, vocab_size: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {ref}: cannot be loaded ({e}); give a folder or Hub id with a tokenizer") from e
    if len(tokenizer) > vocab_size:
        raise UserError(
            f"tokenizer {ref}: {len(tokenizer)} tokens, more than the models' vocab_size "
            f"{vocab_size}; use the tokenizer the models were trained with"
        )
    return tokenizer


def _build_moe(spec: AssembleSpec, base_config, tokenizer, dtype):
    """The Mixtral in memory: the base's shared tensors, the routers' rows, each expert's MLPs in its slot."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    base = _load_model(AutoModelForCausalLM, spec.base_model, "base_model", dtype)
    rows = _router_rows(spec, base, tokenizer)  # (layers, experts, hidden), float32
    moe = MixtralForCausalLM._from_config(mixtral_config(base_config, len(spec.experts), spec.experts_per_token), dtype=dtype)
    filled = _copy_shared(base, moe)
    del base
    layers = moe.model.layers
    for layer, layer_rows in zip(layers, rows):
        layer.mlp.gate.weight.data.copy_(layer_rows)
    filled |= {n for n, _ in moe.named_parameters() if ".mlp.gate." in n}
    for i, expert in enumerate(spec.experts):
        source = _load_model(AutoModelForCausalLM, expert.source_model, f"experts[{i}]", dtype)
        for layer, dense in zip(layers, source.model.layers):
            _copy_mlp(dense.mlp, layer.mlp.experts, i)
        del source
    filled |= {n for n, _ in moe.named_parameters() if ".mlp.experts." in n}
    # Router and expert tensors were written slot by slot above; every other tensor must have come from the base.
    # A layout change in transformers that added one would otherwise be saved with its random initial values.
    missed = sorted({n for n, _ in moe.named_parameters()} - filled)
    if missed:
        raise RuntimeError(f"the Mixtral has tensors no source model filled: {missed[:5]}")
    moe.generation_config = _generation_config(spec.base_model, moe.config, tokenizer)
    moe.eval()
    return moe


def _save_atomically(moe, tokenizer, record: dict, output_dir: Path) -> None:
    """Everything into a staging folder beside output_dir, flushed to disk, then renamed into place."""
    staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        moe.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "assembly.json").write_text(json.dumps(record, indent=2) + "\n")
        from data_prep.atomic import fsync_tree

        fsync_tree(staging)
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_expert(item, where: str, root: Path, problems: list[str]) -> ExpertSpec | None:
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a mapping with source_model and positive_prompts, found {item!r}")
        return None
    for key, value in item.items():
        if key in NEUTRAL_EXPERT_KEYS:
            if value not in NEUTRAL_EXPERT_KEYS[key]:
                problems.append(f"{where}.{key}: not supported (it alters the expert's weights); remove it")
        elif key not in EXPERT_KEYS:
            problems.append(
                f"{where}.{key}: unknown key{did_you_mean(key, EXPERT_KEYS)}; the keys are {', '.join(EXPERT_KEYS)}"
            )
    source = item.get("source_model")
    if not isinstance(source, str) or not source:
        problems.append(f"{where}.source_model: required: the dense model whose MLPs become this expert")
        return None
    prompts = {}
    for key in ("positive_prompts", "negative_prompts"):
        value = item.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            problems.append(f"{where}.{key}: expected a list of strings")
            value = []
        prompts[key] = value
    return ExpertSpec(_resolve_model_path(source, root, f"{where}.source_model", problems), **prompts)


def _resolve_model_path(ref: str, root: Path, where: str, problems: list[str]) -> str:
    """A path relative to the YAML file's folder if it is one there; otherwise a Hub id (or an absolute path)."""
    if "+" in ref:
        problems.append(
            f"{where}: '{ref}': model+LoRA references are not supported; merge the adapter first (hf-vram merge)"
        )
        return ref
    local = Path(ref).expanduser()
    if not local.is_absolute():
        local = root / local
    if local.exists():
        return str(local.resolve())
    if ref.startswith((".", "/", "~")):
        problems.append(f"{where}: {local} does not exist; paths are relative to the YAML file's folder")
    return ref


def _check_spec(spec: AssembleSpec, source: str) -> None:
    problems = []
    if spec.gate_mode not in GATE_MODES:
        hint = "; use random" if spec.gate_mode == "uniform_random" else did_you_mean(spec.gate_mode, GATE_MODES)
        problems.append(f"gate_mode: '{spec.gate_mode}' is not one of {', '.join(GATE_MODES)}{hint}")
    if spec.dtype not in DTYPES:
        problems.append(f"dtype: '{spec.dtype}' is not one of {', '.join(DTYPES)}{did_you_mean(spec.dtype, DTYPES)}")
    if not spec.experts:
        problems.append("experts: at least one expert is needed")
    k = spec.experts_per_token
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(len(spec.experts), 1):
        problems.append(
            f"experts_per_token: {k!r} must be a whole number from 1 to the number of experts ({len(spec.experts)})"
        )
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        problems.append(f"seed: {spec.seed!r} must be a whole number")
    if spec.gate_mode in ("hidden", "cheap_embed"):
        for i, expert in enumerate(spec.experts):
            if not expert.positive_prompts:
                problems.append(
                    f"experts[{i}] '{expert.source_model}': gate_mode {spec.gate_mode} sets the router from the "
                    "expert's positive_prompts; give some, or use gate_mode random"
                )
    if problems:
        raise _invalid(source, problems)


def _invalid(source: str, problems: list[str]) -> UserError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return UserError(f"invalid {source}:\n{lines}")


def _load_config(auto_config, ref: str, who: str):
    # transformers reports a missing folder as a malformed Hub id; a name that cannot be a Hub id (a Hub id
    # is "name" or "owner/name") is said to be the missing folder it is.
    if not Path(ref).expanduser().exists() and (ref.startswith(("/", ".", "~")) or ref.count("/") > 1):
        raise UserError(f"{who} '{ref}': no such folder; give a model folder or a Hub id")
    try:
        return auto_config.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise UserError(f"{who} '{ref}': cannot be loaded ({e}); give a model folder or a Hub id") from e


def _load_model(auto_model, ref: str, who: str, dtype: torch.dtype):
    from safetensors import SafetensorError

    try:
        model = auto_model.from_pretrained(ref, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or corrupt weights files
        raise UserError(f"{who} '{ref}': the weights cannot be loaded ({type(e).__name__}: {e})") from e
    return model.eval()


def _check_dense(config, who: str, ref: str) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in DENSE_TYPES:
        raise UserError(
            f"{who} '{ref}' is a '{kind}' model; a Mixtral is assembled from {' or '.join(DENSE_TYPES)} models"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UserError(f"{who} '{ref}' has {flag}: true; Mixtral layers have no biases, so it cannot be copied")


def _check_same_shape(config, base_config, i: int, ref: str, base_ref: str) -> None:
    for name in SHAPE_FIELDS:
        mine, theirs = _field(config, name), _field(base_config, name)
        if mine != theirs:
            raise UserError(
                f"experts[{i}] '{ref}': {name} is {mine} but the base model '{base_ref}' has {theirs}; every expert "
                "must have the base's shape (fine-tunes of the base, or of one model with its dimensions)"
            )


def _field(config, name: str):
    if name == "head_dim":  # derived when a config leaves it out
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, name, None)


def mixtral_config(base_config, experts: int, experts_per_token: int):
    """The Mixtral config of `experts` copies of a dense Llama/Mistral block, `experts_per_token` per token (also
    what `hf-vram plan` sizes an assembly by before it is built)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=base_config.vocab_size,
        hidden_size=base_config.hidden_size,
        intermediate_size=base_config.intermediate_size,
        num_hidden_layers=base_config.num_hidden_layers,
        num_attention_heads=base_config.num_attention_heads,
        num_key_value_heads=base_config.num_key_value_heads,
        head_dim=_field(base_config, "head_dim"),
        hidden_act=base_config.hidden_act,
        max_position_embeddings=base_config.max_position_embeddings,
        initializer_range=base_config.initializer_range,
        rms_norm_eps=base_config.rms_norm_eps,
        pad_token_id=base_config.pad_token_id,
        bos_token_id=base_config.bos_token_id,
        eos_token_id=base_config.eos_token_id,
        tie_word_embeddings=base_config.tie_word_embeddings,
        # Mixtral's default rope_theta (1e6) is not Llama's (1e4): the base's rope must be copied whole.
        rope_parameters=dict(base_config.rope_parameters),
        attention_dropout=base_config.attention_dropout,
        # A Llama has no sliding window (None); a Mistral's own window is kept so attention stays the base's
        # (mergekit-moe always clears it, which changes a Mistral v0.1 base on inputs longer than the window).
        sliding_window=getattr(base_config, "sliding_window", None),
        num_local_experts=experts,
        num_experts_per_tok=experts_per_token,
    )


def _copy_shared(base, moe) -> set[str]:
    """Copy everything but the MLPs from the base; Llama, Mistral and Mixtral name these tensors alike."""
    targets = dict(moe.named_parameters())
    filled = set()
    for name, tensor in base.named_parameters():
        if ".mlp." in name:
            continue
        if name not in targets:
            raise RuntimeError(f"the base's tensor {name} has no place in the Mixtral")
        targets[name].data.copy_(tensor.data)
        filled.add(name)
    return filled


def _copy_mlp(dense_mlp, experts, i: int) -> None:
    """One dense SwiGLU MLP into slot i of Mixtral's fused expert tensors. MixtralExperts computes
    `gate, up = linear(x, gate_up_proj[i]).chunk(2, dim=-1)`: gate_proj's rows first, then up_proj's
    (the order transformers' own conversion of per-expert w1/w3 checkpoints uses)."""
    import torch

    experts.gate_up_proj.data[i].copy_(
        torch.cat([dense_mlp.gate_proj.weight.data, dense_mlp.up_proj.weight.data], dim=0)
    )
    experts.down_proj.data[i].copy_(dense_mlp.down_proj.weight.data)


def _router_rows(spec: AssembleSpec, base, tokenizer) -> torch.Tensor:
    """Router weights for every layer: (layers, experts, hidden) in float32, each row of unit length."""
    import torch

    layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    if spec.gate_mode == "random":
        generator = torch.Generator().manual_seed(spec.seed)
        rows = torch.randn(layers, len(spec.experts), hidden, generator=generator)
        # Unit rows give random directions at the logit scale of the other modes; mergekit leaves them at
        # norm ~sqrt(hidden), which makes the router's softmax nearly one-hot before training starts.
        return _unit(rows)
    states = _mlp_inputs if spec.gate_mode == "hidden" else _embedding_sum
    per_expert = []
    for expert in spec.experts:
        row = states(base, tokenizer, expert.positive_prompts)
        if expert.negative_prompts:
            row = row - states(base, tokenizer, expert.negative_prompts)
        per_expert.append(_unit(row))
    return torch.stack(per_expert, dim=1)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    # As mergekit: the BOS token (where the tokenizer has one) then the prompt, no other special tokens.
    text = (tokenizer.bos_token or "") + prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _mlp_inputs(base, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(layers, hidden): per layer, the mean over prompts of the vector entering that layer's MLP at the last
    token. mergekit-moe takes each decoder layer's input (output_hidden_states) instead; the MLP's input, after
    the attention and the post-attention norm, is what the router multiplies by, so the rows are matched to it
    (on the tests' four experts this sent 96% of held-out prompts' last tokens to their own expert, the layer
    input 87%). Prompts run one at a time so that no padding token can be taken for a last token."""
    import torch

    captured: list[torch.Tensor] = []

    def keep_last_token(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        captured.append(x[0, -1].float())

    hooks = [layer.mlp.register_forward_pre_hook(keep_last_token, with_kwargs=True) for layer in base.model.layers]
    total = None
    try:
        with torch.no_grad():
            for prompt in prompts:
                captured.clear()
                base(input_ids=_prompt_ids(tokenizer, prompt), use_cache=False)
                states = torch.stack(captured)
                total = states if total is None else total + states
    finally:
        for hook in hooks:
            hook.remove()
    return total / len(prompts)


def _embedding_sum(base, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(layers, hidden): mergekit's cheap_embed: the prompts' token embeddings summed, scaled to unit length,
    and the same in every layer (no forward pass, so no per-layer information)."""
    import torch

    embed = base.get_input_embeddings().weight.detach().float()
    total = torch.stack([embed[_prompt_ids(tokenizer, p)[0]].sum(dim=0) for p in prompts]).sum(dim=0)
    return _unit(total).expand(base.config.num_hidden_layers, -1).clone()


def _generation_config(base_ref: str, model_config, tokenizer):
    """The base's generation settings (its stop tokens, sampling defaults) where it has them; otherwise the
    model config's, stopping at the tokenizer's EOS (as hf-vram merge does)."""
    from transformers import GenerationConfig

    from hf_vram.builders.model import set_stop_tokens

    try:
        return GenerationConfig.from_pretrained(base_ref)
    except OSError:
        config = GenerationConfig.from_model_config(model_config)
    set_stop_tokens(config, tokenizer)
    return config
