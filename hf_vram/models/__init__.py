"""Model architectures that transformers does not ship, registered with its Auto classes on import.

`import hf_vram.models` makes `model_type: "retnet"` configs loadable by `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` (hence `from_pretrained(dir)` and `pipeline("text-generation", model=dir)`).

Without hf-vram, a saved RetNet loads with `trust_remote_code=True`: the classes are also registered for the Auto
classes (`register_for_auto_class`, in configuration_retnet.py and modeling_retnet.py), so `save_pretrained` writes
`auto_map` into config.json and copies those two files, which import only torch, transformers and each other, beside
the weights. In this process the registration below wins: transformers prefers a registered local class.
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
