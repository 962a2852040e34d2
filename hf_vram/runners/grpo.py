"""Task grpo: trl's GRPOTrainer on prompts with answers. Completions are sampled in groups of
grpo.num_generations per prompt, scored by the recipe's reward functions (hf_vram/train/rewards.py), and each
is pushed up or down by how its reward compares with its group's. Everything else (model, output, card, the
held-out score of builtin data) is the language-model runner's.

grpo.init_adapter continues from a trained adapter (an SFT run's output, recipe:NAME or a folder): it is loaded
onto the base as the trainable adapter, so that GRPO improves a model that already answers in the layout."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.chat import install_chat_template
from data_prep.formats import CHAT_FORMATS
from data_prep.grpo import grpo_dataset, grpo_examples
from data_prep.tokenizer import load_tokenizer
from hf_vram.errors import UserError
from hf_vram.runners.lm import LMRunner, first_and_last
from hf_vram.runners.lm_data import LMData
from hf_vram.train.rewards import reward_functions
from hf_vram.train.trainers import GuardedGRPOTrainer


class GRPORunner(LMRunner):
    trainer_class = GuardedGRPOTrainer

    def data(self, args) -> LMData:
        recipe = self.recipe
        with args.main_process_first(local=False, desc="dataset"):
            train = grpo_examples(recipe.data, recipe.grpo, recipe.train.seed)
        tokenizer = load_tokenizer(recipe, self.refs.tokenizer)
        added = install_chat_template(tokenizer, recipe.data.chat_template) if recipe.data.format in CHAT_FORMATS else []
        dataset, counts = grpo_dataset(train, recipe.data)
        return LMData(tokenizer, dataset, None, counts, tokenizer.convert_tokens_to_ids(added))

    def trainer_kwargs(self, peft_config) -> dict:
        # trl's keyword for the reward functions; their weights are in the config (reward_weights).
        return {"reward_funcs": reward_functions(self.recipe.grpo, self.loaded.path.parent)}

    def task_metrics(self) -> dict:
        history = self.trainer.state.log_history
        out = first_and_last(history, "reward", "reward")
        for name in (r.builtin or r.function.rpartition(":")[2] for r in self.recipe.grpo.rewards):
            out.update(first_and_last(history, f"rewards/{name}/mean", f"reward_{name}"))
        return out

    def setup(self) -> None:
        super().setup()
        if self.recipe.grpo.init_adapter:
            path = init_adapter_path(self.loaded)
            load_adapter_weights(self.trainer.model, path)
            self.summary["init_adapter"] = str(path)


def init_adapter_path(loaded) -> Path:
    """grpo.init_adapter as a folder: recipe:NAME's output (it must have finished), or a path relative to the
    recipe file."""
    from hf_vram.recipe.references import dependency

    ref = loaded.recipe.grpo.init_adapter
    dep = dependency(loaded, ref)
    path = dep.output_dir if dep is not None else loaded.path.parent / Path(ref).expanduser()
    if dep is not None and not (path / "train_summary.json").is_file():
        raise UserError(f"grpo.init_adapter: {ref} has not finished training ({path}): run `hf-vram train "
                        f"{dep.name}` first")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"grpo.init_adapter: {path} holds no adapter (adapter_config.json)")
    return path


def load_adapter_weights(model, path: Path) -> None:
    """Copy a saved adapter's weights into the model's (untrained) adapter of the same shape, in place: the
    trainer's optimizer, made when training starts, then trains them from there."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = json.loads((path / "adapter_config.json").read_text())
    config = model.peft_config["default"]
    ours = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    theirs = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
              "target_modules": sorted(saved.get("target_modules") or [])}
    if ours != theirs:
        raise UserError(f"grpo.init_adapter: {path}'s adapter ({theirs}) does not match the recipe's adapter "
                        f"({ours}): give adapter the settings it was trained with")
    result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise UserError(f"grpo.init_adapter: {path}: weights the model has no place for: {result.unexpected_keys[:3]}")
