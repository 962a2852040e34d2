"""train + data sections -> trl.SFTConfig, trl.DPOConfig, trl.KTOConfig, trl.GRPOConfig, trl's experimental ORPOConfig and CPOConfig
(SimPO) or transformers.TrainingArguments (pretraining): the only place training arguments are built."""

from __future__ import annotations

import os

from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, KTOConfig, SFTConfig

from hf_vram.device import has_cuda, mixed_precision
from hf_vram.recipe.schema import Recipe


def _optimization(t) -> dict:
    """The optimizer and its schedule (train section): the one translation of train.lr and its companions, used by
    every trainer and by the diffusion loop (optimization_args)."""
    return dict(
        learning_rate=t.lr,
        # two_stage is built by the trainer itself (train/trainers.py); transformers only knows its own schedules.
        lr_scheduler_type="constant" if t.lr_scheduler == "two_stage" else t.lr_scheduler,
        lr_scheduler_kwargs={"min_lr": t.min_lr} if t.lr_scheduler == "cosine_with_min_lr" else None,
        adam_beta2=t.adam_beta2,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
    )


def _common(recipe: Recipe, output_dir: str, has_eval: bool) -> dict:
    """Arguments every trainer takes (transformers.TrainingArguments)."""
    t = recipe.train
    precision = mixed_precision(t.precision)
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        **_optimization(t),
        # A quantized base had checkpointing switched on by prepare_model_for_kbit_training already.
        activation_checkpointing=t.gradient_checkpointing and recipe.quant.bits is None,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # NaN/inf losses stop the run (see output/finite.py) instead of being dropped from the logs.
        logging_nan_inf_filter=False,
        # Held-out evaluation every eval_steps; the runner evaluates once more at the end in any case.
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        # Rotation is done by hf-vram after a checkpoint is complete (output/checkpoints.py), never before.
        save_total_limit=None,
        report_to=t.report_to or "none",
        torch_compile=t.torch_compile,
        use_cpu=not has_cuda(),
        # gloo is the CPU collective backend; only named under a launcher (a lone process has no group).
        ddp_backend="gloo" if not has_cuda() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def sft_config(recipe: Recipe, output_dir: str, has_eval: bool = False) -> SFTConfig:
    d = recipe.data
    return SFTConfig(
        **_common(recipe, output_dir, has_eval),
        max_length=d.max_length,
        packing=d.packing,
        # Plain text: documents longer than a sequence continue in the next one; samples with a prompt are cut.
        packing_strategy="bfd_split" if d.format == "text" else "bfd",
        # The data arrives tokenized with its labels (data_prep/tokenize.py: masks, EOS, truncation, drops).
        dataset_text_field="text",
    )


def dpo_config(recipe: Recipe, output_dir: str, has_eval: bool = False) -> DPOConfig:
    return DPOConfig(
        **_common(recipe, output_dir, has_eval),
        max_length=recipe.data.max_length,
        beta=recipe.dpo.beta,
        loss_type=[recipe.dpo.loss_type],
    )


def orpo_config(recipe: Recipe, output_dir: str, has_eval: bool = False):
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**_common(recipe, output_dir, has_eval), max_length=recipe.data.max_length, beta=recipe.orpo.beta)


def simpo_config(recipe: Recipe, output_dir: str, has_eval: bool = False):
    """SimPO is trl's CPO trainer with its simpo loss (length-normalised rewards, a target margin, no reference)."""
    from trl.experimental.cpo import CPOConfig

    s = recipe.simpo
    return CPOConfig(**_common(recipe, output_dir, has_eval), max_length=recipe.data.max_length, loss_type="simpo",
                     beta=s.beta, simpo_gamma=s.gamma, cpo_alpha=s.cpo_alpha)


def kto_config(recipe: Recipe, output_dir: str, has_eval: bool = False) -> KTOConfig:
    k = recipe.kto
    return KTOConfig(**_common(recipe, output_dir, has_eval), max_length=recipe.data.max_length, beta=k.beta,
                     desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)


def grpo_config(recipe: Recipe, output_dir: str, has_eval: bool = False) -> GRPOConfig:
    """train.micro_batch_size counts completions: micro_batch_size x grad_accum of them (whole groups of
    num_generations) are generated at once, then trained on micro-batch by micro-batch."""
    g = recipe.grpo
    return GRPOConfig(
        **_common(recipe, output_dir, has_eval),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        beta=g.beta,
        temperature=g.temperature,
        loss_type=g.loss_type,
        reward_weights=[r.weight for r in g.rewards],
        # The answer column reaches the reward functions (trl passes every column but the prompt to them).
        remove_unused_columns=False,
    )


def pretrain_args(recipe: Recipe, output_dir: str, has_eval: bool = False) -> TrainingArguments:
    # Blocks of token ids arrive whole from the shards (data_prep/shards.py): nothing to pack or pad.
    return TrainingArguments(**_common(recipe, output_dir, has_eval))


def optimization_args(recipe: Recipe, output_dir: str) -> TrainingArguments:
    """For a loop that is not a Trainer (task diffusion): the optimizer and schedule settings as TrainingArguments,
    so that it builds them with the Trainer's own functions (Trainer.get_optimizer_cls_and_kwargs, get_scheduler)."""
    return TrainingArguments(output_dir=output_dir, **_optimization(recipe.train), seed=recipe.train.seed,
                             report_to="none", use_cpu=not has_cuda())


def training_args(recipe: Recipe, output_dir: str, has_eval: bool = False):
    build = {"dpo": dpo_config, "orpo": orpo_config, "simpo": simpo_config, "kto": kto_config,
             "grpo": grpo_config, "pretrain": pretrain_args}.get(recipe.task, sft_config)
    return build(recipe, output_dir, has_eval)
