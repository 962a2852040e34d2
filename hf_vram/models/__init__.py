"""Model architectures that transformers does not ship, registered with its Auto classes on import.

`import hf_vram.models` makes `model_type: "retnet"` configs loadable by `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` (hence `from_pretrained(dir)` and `pipeline("text-generation", model=dir)`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_vram.models.configuration_retnet import RetNetConfig
from hf_vram.models.modeling_retnet import (
    RetNetCache,
    RetNetForCausalLM,
    RetNetModel,
    RetNetPreTrainedModel,
    retention_decay,
)

# exist_ok: re-importing (e.g. after importlib.reload) re-registers the same classes.
AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)

__all__ = [
    "RetNetCache",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "retention_decay",
]
