"""The causal-LM runner: recipe -> tokenizer, data, model -> trainer (Accelerate underneath) -> output. trl's SFTTrainer
or DPOTrainer for instructions, chats and preferences; transformers' Trainer on token shards for pretraining.

The output directory holds the model or adapter (safetensors), the tokenizer, `recipe.yaml` (fully
resolved), a model card, TensorBoard logs under runs/, and `train_summary.json`, written last: its
presence means the run finished. Re-running on an existing output directory resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.chat import install_chat_template
from data_prep.formats import CHAT_FORMATS
from data_prep.prepare import Prepared, example_texts, load_examples, prepare_dataset
from hf_vram.atomic import atomic_write_json, atomic_write_text
from hf_vram.builders.model import build_model, count_parameters, expose_bias_of_trainable_tokens, scan_path
from hf_vram.builders.tokenizer import load_tokenizer
from hf_vram.builders.training_args import training_args
from hf_vram.card import model_card
from hf_vram.device import torch_dtype
from hf_vram.evaluate import scorable, score
from hf_vram.recipe.load import LoadedRecipe, find_recipe, load_recipe
from hf_vram.train.checkpoints import CommitCheckpoints, discard_incomplete, latest_complete
from hf_vram.train.guard import GuardedDPOTrainer, GuardedSFTTrainer, GuardedTrainer
from hf_vram.train.memory import MemoryLog
from hf_vram.train.samples import SampleText
from hf_vram.train.savings import apply_trainer_savings

SUMMARY = "train_summary.json"
# Held-out metrics kept in the summary (language modelling; DPO's preference metrics).
EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_rewards/margins", "eval_rewards/accuracies")


def is_finished(output_dir: Path) -> bool:
    return (output_dir / SUMMARY).is_file()


def resolve_reference(loaded: LoadedRecipe, ref: str | None) -> str | None:
    """A model or tokenizer reference, with `recipe:NAME` replaced by that recipe's output (trained first if
    missing). NAME is a shipped recipe or a path, read relative to the recipe that names it."""
    if not ref or not ref.startswith("recipe:"):
        return ref
    dep = load_recipe(find_recipe(ref.removeprefix("recipe:"), relative_to=loaded.path.parent))
    if not is_finished(dep.output_dir):
        print(f"[hf-vram] {loaded.name} needs {dep.name}: training it first into {dep.output_dir}", flush=True)
        train(dep)
    return str(dep.output_dir.resolve())


def resolve_dependencies(loaded: LoadedRecipe) -> tuple[str | None, str | None]:
    """(model path, tokenizer path) of a recipe, its recipe dependencies trained."""
    model_path = resolve_reference(loaded, loaded.recipe.model.name_or_path)
    return model_path, resolve_reference(loaded, loaded.recipe.tokenizer.name_or_path) or model_path


def _rank_checksums(model) -> list[str]:
    """A digest of this rank's trainable weights, gathered from every rank (DDP keeps them identical).
    Sharded parameters (FSDP2 DTensors) differ by design across ranks: no digest then."""
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if any(type(p.data).__name__ == "DTensor" for _, p in params):
        return []
    h = hashlib.sha256()
    for _, p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()[:16]
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, digest)
        return out
    return [digest]


def _peak_memory() -> dict:
    """Peak memory of this run on CUDA (stats reset when fit() starts); on CPU the process's peak RSS, which
    includes any recipe dependency trained earlier in the same process."""
    if torch.cuda.is_available():
        return {
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(),
        }
    # Linux reports ru_maxrss in KiB.
    return {"cpu_process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


@dataclass
class Run:
    """A prepared run: everything built, nothing trained yet (tests inspect the model before fit())."""

    loaded: LoadedRecipe
    trainer: GuardedSFTTrainer | GuardedDPOTrainer | GuardedTrainer
    tokenizer: object
    resume: Path | None
    summary: dict

    @property
    def model(self):
        return self.trainer.model

    @property
    def is_main(self) -> bool:
        return self.trainer.args.process_index == 0


def prepare_data(loaded: LoadedRecipe, tokenizer_path: str | None, args=None) -> tuple[object, Prepared, list[int]]:
    """The recipe's tokenizer (chat template installed), its tokenized, cached data, and the ids of tokens the
    chat template added to the vocabulary. Under a launcher the main process trains the tokenizer and fills the
    cache while the others wait, then they load the same files, so every rank has the same vocabulary and a
    resumed run keeps the one its checkpoints were trained with."""
    from contextlib import nullcontext

    recipe, out = loaded.recipe, loaded.output_dir
    out.mkdir(parents=True, exist_ok=True)

    def first(desc):
        return args.main_process_first(local=False, desc=desc) if args is not None else nullcontext()

    examples = load_examples(recipe.data, recipe.train.seed)
    tokenizer_dir = out / "tokenizer-trained"
    with first("tokenizer"):
        if recipe.tokenizer.train and (tokenizer_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            tokenizer = load_tokenizer(recipe, tokenizer_path, example_texts(examples.train))
            if recipe.tokenizer.train:
                tokenizer.save_pretrained(tokenizer_dir)
    added: list[str] = []
    if recipe.data.format in (*CHAT_FORMATS, "preference"):
        added = install_chat_template(tokenizer, recipe.data.chat_template)
    with first("dataset"):
        prepared = prepare_dataset(examples, tokenizer, recipe.data, out / "prepared")
    return tokenizer, prepared, tokenizer.convert_tokens_to_ids(added)


def prepare(loaded: LoadedRecipe) -> Run:
    """Tokenizer, data, model and trainer for a recipe; trains its recipe dependencies first."""
    recipe = loaded.recipe
    out = loaded.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model_path, tokenizer_path = resolve_dependencies(loaded)
    # Training arguments first: they set up the process group (and DeepSpeed's config) that the rest relies on.
    has_eval = bool(recipe.data.eval_split or recipe.data.val_size)
    args = training_args(recipe, str(out), has_eval)
    if recipe.task == "pretrain":
        from data_prep.corpus import prepare_corpus

        corpus = prepare_corpus(recipe, out, tokenizer_path, lambda desc: args.main_process_first(local=False, desc=desc))
        tokenizer, added_token_ids = corpus.tokenizer, []
        train_data, eval_data, data_counts = corpus.train, corpus.eval, corpus.counts
    else:
        tokenizer, prepared, added_token_ids = prepare_data(loaded, tokenizer_path, args)
        train_data, eval_data, data_counts = prepared.train, prepared.eval, prepared.counts

    dpo = recipe.task == "dpo"
    # trl's DPOTrainer wraps the model in the adapter itself: its reference model is then the same weights with
    # the adapter switched off, not a second frozen copy of the adapter saved beside the trained one.
    model, peft_config = build_model(recipe, tokenizer, model_path, added_token_ids, wrap=not dpo)
    if args.process_index == 0:
        if scan_path(model.config):
            print(f"[hf-vram] {scan_path(model.config)}", flush=True)
        discard_incomplete(out)
        atomic_write_text(out / "recipe.yaml", loaded.resolved_yaml())
    trainer_class = {"dpo": GuardedDPOTrainer, "pretrain": GuardedTrainer}.get(recipe.task, GuardedSFTTrainer)
    callbacks = [CommitCheckpoints(keep=recipe.train.save_total_limit), MemoryLog(out)]
    if recipe.eval.sample_during_training and recipe.eval.sample_prompts:
        callbacks.append(SampleText(tokenizer, recipe.eval.sample_prompts, recipe.eval.max_new_tokens, out))
    extra = {"peft_config": peft_config} if dpo else {}
    if recipe.task == "pretrain":
        from transformers import default_data_collator

        extra["data_collator"] = default_data_collator  # equal-length blocks: stacked, nothing to pad
    if recipe.train.lr_scheduler == "two_stage":
        from hf_vram.models.bitnet import DropWeightDecayInStage2

        callbacks.append(DropWeightDecayInStage2())
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    trainer.two_stage = recipe.train.lr_scheduler == "two_stage"
    savings = [*getattr(model, "memory_savings", []), *apply_trainer_savings(trainer, recipe)]
    if savings and args.process_index == 0:
        print(f"[hf-vram] memory savings: {', '.join(savings)}", flush=True)
    expose_bias_of_trainable_tokens(trainer.model)
    trainable, total = count_parameters(trainer.model)
    if recipe.adapter.type == "llama-adapter":
        # peft's AdaptionPromptModel keeps the forward it found at wrapping time; the trainer has since replaced
        # the inner model's forward with one that can return per-token log-probabilities (trl's fused LM head).
        trainer.model.base_model.forward = trainer.model.get_base_model().forward
    if recipe.quant.bits and torch_dtype(recipe.quant.compute_dtype) == torch.float32:
        # trl casts the adapter of a quantized model to bf16 (the QLoRA paper's choice on GPUs); where the
        # recipe computes in fp32 (auto on CPU) the adapter trains in fp32 too.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    summary = {
        "recipe": loaded.name, "task": recipe.task, "trainable_params": trainable, "total_params": total,
        "samples": len(train_data), "data": data_counts, "memory_savings": savings,
    }
    return Run(loaded, trainer, tokenizer, latest_complete(out), summary)


def fit(run: Run) -> dict:
    """Train (or resume) to the end, save the output; returns the summary written to the output directory."""
    recipe, out, trainer, summary = run.loaded.recipe, run.loaded.output_dir, run.trainer, run.summary
    main = run.is_main
    before_file = out / "score_before.json"
    if scorable(recipe) and main:
        if before_file.is_file():  # a resumed run keeps the score of the untrained model
            summary["score_before"] = json.loads(before_file.read_text())
        else:
            summary["score_before"] = score(recipe, run.model, run.tokenizer)
            atomic_write_json(before_file, summary["score_before"])
        print(f"[hf-vram] score before training: {_fmt_score(summary['score_before'])}", flush=True)
    eval_before_file = out / "eval_before.json"
    if trainer.eval_dataset is not None:
        # Held-out metrics of the untrained model, so that the summary shows what training changed (every rank
        # evaluates: it is a collective under DDP). A resumed run keeps the first measurement.
        if eval_before_file.is_file():
            summary["eval_before"] = json.loads(eval_before_file.read_text())
        else:
            summary["eval_before"] = {k: v for k, v in trainer.evaluate().items() if k in EVAL_KEYS}
            if main:
                atomic_write_json(eval_before_file, summary["eval_before"])
        if main:
            print(f"[hf-vram] held-out before training: {summary['eval_before']}", flush=True)
    if main:
        print(
            f"[hf-vram] {run.loaded.name}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
            f"parameters, {summary['samples']} samples, {trainer.args.world_size} process(es) on {trainer.args.device}"
            + (f", resuming from {run.resume}" if run.resume else ""),
            flush=True,
        )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary.update(
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        train_loss=result.training_loss,
        global_step=trainer.state.global_step,
        world_size=trainer.args.world_size,
        distributed_backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        rank_checksums=_rank_checksums(trainer.model),
        train_seconds=round(time.time() - start, 2),
        resumed_from=str(run.resume) if run.resume else None,
        **_peak_memory(),
    )
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        summary.update({k: v for k, v in metrics.items() if k in EVAL_KEYS})
    if recipe.task == "dpo":
        margins = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
        summary.update(first_reward_margin=margins[0] if margins else None, final_reward_margin=margins[-1] if margins else None)
    trainer.save_model(str(out))
    if main and recipe.adapter.type != "none":
        # An adapter directory has no generation_config.json of its own; the stops set for training (EOS, the chat
        # template's end of turn) then reach `hf-vram merge` and anyone reading the output.
        trainer.model.generation_config.save_pretrained(str(out))
    if main and getattr(getattr(trainer.model, "peft_config", {}).get("default"), "trainable_token_indices", None):
        # The vocabulary grew (a chat template's tokens): save the resized embedding and output layers whole.
        # peft decides this by comparing with the base's config, which it cannot read offline for a Hub base.
        trainer.model.save_pretrained(str(out), save_embedding_layers=True)
    if main and trainer.model.config.model_type == "bitnet":
        from hf_vram.models.bitnet import export_packed, ternary_fraction

        # The output holds the fp32 masters (to train further); packed/ the ternary weights for inference.
        export_packed(trainer.model, out / "packed", tokenizer=run.tokenizer)
        summary["ternary_fraction"] = ternary_fraction(trainer.model)
        print(f"[hf-vram] packed ternary export in {out / 'packed'} (weights -1/0/+1: {summary['ternary_fraction']})",
              flush=True)
    if not main:
        return summary
    if scorable(recipe):
        summary["score_after"] = score(recipe, trainer.model, run.tokenizer)
        print(f"[hf-vram] score after training:  {_fmt_score(summary['score_after'])}", flush=True)
    model_card(run.loaded, summary).save(out / "README.md")
    atomic_write_json(out / SUMMARY, summary)
    print(f"[hf-vram] saved {out} (final loss {summary['final_loss']}"
          + (f", held-out loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "") + ")", flush=True)
    if recipe.eval.sample_prompts:
        from hf_vram.generate import pipeline_generate

        texts = pipeline_generate(out, recipe.eval.sample_prompts, recipe.eval.max_new_tokens)
        for p, t in zip(recipe.eval.sample_prompts, texts):
            print(f"[hf-vram] pipeline('text-generation', model='{out}')\n  prompt: {p!r}\n  output: {t!r}", flush=True)
    if recipe.hub.repo_id:
        from hf_vram.errors import UserError
        from hf_vram.hub import push_output

        try:
            print(f"[hf-vram] pushed to {push_output(out, recipe.hub.repo_id, recipe.hub.private)}", flush=True)
        except UserError as e:
            # Training is done and saved; a failed upload must not make the run look unfinished.
            raise UserError(f"{e}\nThe trained output is saved in {out}; push it later with `hf-vram push {out}`") from None
    return summary


def train(loaded: LoadedRecipe) -> dict:
    """Run (or resume) one recipe to completion; a finished output directory is left as it is."""
    if is_finished(loaded.output_dir):
        print(
            f"[hf-vram] {loaded.name} is already trained in {loaded.output_dir}; remove that directory or set "
            "train.output_dir=... to train again",
            flush=True,
        )
        return json.loads((loaded.output_dir / SUMMARY).read_text())
    if loaded.recipe.task == "assemble":
        from hf_vram.train.assemble import assemble_recipe

        return assemble_recipe(loaded)
    if torch.cuda.is_available():
        from hf_vram.vram.configs import ConfigUnavailable
        from hf_vram.vram.plan import current_gpu, preflight

        try:
            loaded = preflight(loaded, current_gpu())
        except ConfigUnavailable as e:
            # Loading the model will say what is wrong with its name; the plan alone must not stop the run.
            print(f"[hf-vram] not planned: {e}", flush=True)
    if loaded.recipe.task == "diffusion":
        from hf_vram.train.diffusion import train_diffusion

        return train_diffusion(loaded)
    return fit(prepare(loaded))


def _fmt_score(s: dict) -> str:
    return f"{s['accuracy']:.1%} exact match ({s['correct']}/{s['total']} held-out)"
