"""The model config a recipe trains, without weights: from a local folder or the Hub (config.json only), from the
recipe itself for a model built from scratch, or from hf-vram's table of known bases when offline.

Planning only reads a config's shape fields, and importing transformers' config classes costs more than a second
(configuration_utils imports torch), so resolve_config(..., light=True) gives the dense families hf-vram counts by
hand (Llama, Mistral, Qwen2) as a DenseConfig read from config.json; callers that build a model need the default,
a transformers config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_vram.errors import UserError
from hf_vram.recipe.load import LoadedRecipe

# Seconds `hf-vram plan` waits for the Hub to answer for a config.json it does not have in the cache, before it
# falls back to a known config (HF_HUB_ETAG_TIMEOUT, when set, is used instead).
HUB_TIMEOUT = 1.5

# transformers 5.24's defaults of the fields a DenseConfig carries (the dataclass fields of LlamaConfig,
# MistralConfig and Qwen2Config; DenseConfig applies their __post_init__ rules). tests/test_plan_speed.py checks
# them against the classes.
DENSE_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  attention_dropout=0.0, mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096, attention_dropout=0.0),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, attention_dropout=0.0),
}


class ConfigUnavailable(UserError):
    """The model's config cannot be read (offline, not a known base): nothing can be planned."""


class DenseConfig:
    """The shape fields of a Llama, Mistral or Qwen2 config as transformers would fill them in (its defaults for
    fields the file leaves out), for planning. Any other field of config.json is kept as given."""

    def __init__(self, fields: dict):
        f = {**DENSE_DEFAULTS[fields["model_type"]], **fields}
        if f["num_key_value_heads"] is None:
            f["num_key_value_heads"] = f["num_attention_heads"]
        if "head_dim" in DENSE_DEFAULTS[f["model_type"]] and f["head_dim"] is None:  # Qwen2Config has no head_dim
            f["head_dim"] = f["hidden_size"] // f["num_attention_heads"]
        if "use_sliding_window" in f and not f["use_sliding_window"]:
            f["sliding_window"] = None
        self.__dict__.update(f)

    def __repr__(self) -> str:
        return f"DenseConfig({self.__dict__})"


def is_dense(fields: dict) -> bool:
    """A config.json hf-vram can plan as a DenseConfig: a dense family, and no remote code of its own."""
    return fields.get("model_type") in DENSE_DEFAULTS and "auto_map" not in fields


def resolve_config(loaded: LoadedRecipe, light: bool = False):
    """The model config of a recipe, with no weights: from the local output or Hub (config.json only), from the
    recipe itself for a model built from scratch, or from hf-vram's table of known bases when offline. light: a
    DenseConfig where the family allows (planning only: a model cannot be built from it)."""
    r = loaded.recipe
    if r.model.arch:
        fields = {"model_type": r.model.arch, **r.model.config}
        if not (light and is_dense(fields)):
            import hf_vram.models  # noqa: F401  (architectures hf-vram adds, RetNet, register with AutoConfig)
        config = _from_fields(fields, light)
        if r.tokenizer.train:
            # A char-level vocabulary is the text's distinct characters (65 for Shakespeare): 256 stand for them.
            config.vocab_size = r.tokenizer.vocab_size if r.tokenizer.kind == "bpe" else 256
        elif r.tokenizer.name_or_path:
            config.vocab_size = _tokenizer_size(r.tokenizer.name_or_path, config.vocab_size)
        return config
    if r.task == "assemble":
        from hf_vram.moe.assemble import mixtral_config

        # mixtral_config copies fields a DenseConfig does not carry (rope, token ids): the transformers config.
        return mixtral_config(_config_of(loaded, r.model.name_or_path), len(r.moe.experts), r.moe.experts_per_token)
    return _config_of(loaded, r.model.name_or_path, light)


def _from_fields(fields: dict, light: bool):
    """A config from its fields (model_type among them): a DenseConfig when light allows, else transformers'."""
    if light and is_dense(fields):
        return DenseConfig(fields)
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _config_of(loaded: LoadedRecipe, ref: str, light: bool = False):
    """The config of a pretrained model reference: a local folder or Hub id, hf-vram's table of known bases when
    the Hub does not give it, or another recipe's output (planned from that recipe when it is not trained yet)."""
    from hf_vram.vram.known_configs import KNOWN_CONFIGS

    if ref.startswith("recipe:"):
        from hf_vram.recipe.load import find_recipe, load_recipe

        dep = load_recipe(find_recipe(ref.removeprefix("recipe:"), relative_to=loaded.path.parent))
        if (dep.output_dir / "config.json").is_file():
            return _read_config(dep.output_dir / "config.json", light)
        return resolve_config(dep, light)
    if Path(ref).expanduser().is_dir():
        file, why = Path(ref).expanduser() / "config.json", f"{ref} has no config.json"
        file = file if file.is_file() else None
    else:
        file, why = hub_config_file(ref)
    if file is not None:
        try:
            return _read_config(file, light)
        except (OSError, ValueError) as e:
            why = f"{ref}'s config.json cannot be read ({e})"
    if ref in KNOWN_CONFIGS:
        if why:
            print(f"[hf-vram] {why}: planning {ref} from hf-vram's known config", file=sys.stderr, flush=True)
        return _from_fields(KNOWN_CONFIGS[ref], light)
    raise ConfigUnavailable(f"model.name_or_path: cannot read the config of '{ref}' ({why or 'offline: HF_HUB_OFFLINE'}, "
                            "and not a known base); download it once or give a local path")


def _read_config(file: Path | str, light: bool):
    """The config in a config.json (a local folder's, or a Hub repository's in the HF cache): a DenseConfig where
    light allows, else transformers' read from that very folder (no Hub request)."""
    if light:
        fields = json.loads(Path(file).read_text())
        if is_dense(fields):
            return DenseConfig(fields)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(Path(file).parent)


def hub_config_file(ref: str, filename: str = "config.json") -> tuple[str | None, str]:
    """(path of a Hub repository's file, ""), from the HF cache or fetched; or (None, why not).

    huggingface_hub 2.4's hf_hub_download, when nothing is cached and a request fails, asks again with retries
    (1+2+4+8+8 s of backoff, 60 s timeouts): 23 s or more before it gives up, minutes where DNS hangs. So the Hub
    is asked first with one HEAD request, no retries, under a deadline, and only downloaded from once it answers.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(ref, filename)
    except HFValidationError:
        return None, f"'{ref}' is neither a local folder nor a Hub id"
    if isinstance(cached, str):
        return cached, ""
    if constants.is_offline_mode():
        return None, ""  # asked for by HF_HUB_OFFLINE: no notice
    why = hub_answers(ref, filename)
    if why:
        return None, why
    try:
        return hf_hub_download(ref, filename), ""
    except Exception as e:  # any failure of the download leaves the known config
        return None, f"the Hub did not give {ref}'s {filename} ({type(e).__name__})"


# Hub hosts that gave no HTTP answer at all (a stalled or absent network, not a missing file) -> (when, why): for
# HUB_SILENCE_SECONDS they are not asked again, so that `hf-vram table` or validating a folder of recipes pays the
# deadline once, not once per recipe.
_SILENT_HUBS: dict[str, tuple[float, str]] = {}
HUB_SILENCE_SECONDS = 60.0


def hub_answers(ref: str, filename: str) -> str:
    """"" when the Hub answers a HEAD request for the file within the timeout, else why not. The request runs in a
    thread joined with that deadline: httpx's timeouts do not cover name resolution (httpcore2's sync backend
    calls socket.create_connection, whose getaddrinfo no timeout bounds)."""
    import time
    from urllib.parse import urlparse

    from huggingface_hub import hf_hub_url

    url = hf_hub_url(ref, filename)
    host = urlparse(url).netloc
    silent = _SILENT_HUBS.get(host)
    if silent is not None and time.monotonic() - silent[0] < HUB_SILENCE_SECONDS:
        return f"{silent[1]} (asked {time.monotonic() - silent[0]:.0f} s ago; not asked again for {HUB_SILENCE_SECONDS:g} s)"
    why = _ask_hub(url, ref, filename)
    if why.startswith("the Hub did not answer"):
        _SILENT_HUBS[host] = (time.monotonic(), why)
    return why


def _ask_hub(url: str, ref: str, filename: str) -> str:
    """hub_answers' one HEAD request (for ref's filename at url), under the deadline."""
    import threading

    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError

    timeout = HUB_TIMEOUT
    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:  # the user's own setting
        timeout = constants.HF_HUB_ETAG_TIMEOUT
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            get_hf_file_metadata(url, timeout=timeout)  # retry_on_errors=False: one request
            outcome.append(None)
        except Exception as e:  # reported to the caller
            outcome.append(e)

    thread = threading.Thread(target=ask, name="hf-vram-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"the Hub did not answer in {timeout:g} s"
    e = outcome[0]
    if e is None:
        return ""
    code = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
    if code is None:  # no HTTP answer: refused connection, unknown host, timeout
        return f"the Hub did not answer in {timeout:g} s"
    if code < 500:
        return f"the Hub refused {ref}'s {filename} (HTTP {code}: not found, gated or private)"
    return f"the Hub answered HTTP {code}"


def _tokenizer_size(ref: str, default: int) -> int:
    """len() of a named tokenizer, which sizes a model built from scratch: from a local folder, the table of known
    Hub tokenizers, or the config's own default when neither has it."""
    from hf_vram.vram.known_configs import KNOWN_TOKENIZER_SIZES

    if Path(ref).expanduser().is_dir():
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(ref))
    return KNOWN_TOKENIZER_SIZES.get(ref, default)
