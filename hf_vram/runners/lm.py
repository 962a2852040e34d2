"""The causal-LM runners: recipe -> tokenizer, data, model -> trainer (Accelerate underneath) -> output. trl's
SFTTrainer for instructions and chats (task sft), DPOTrainer for preferences (dpo); transformers' Trainer on token
shards for pretraining (pretrain).

The output directory holds the model or adapter (safetensors), the tokenizer, `recipe.yaml` (fully resolved), a
model card, TensorBoard logs under runs/, and `train_summary.json`, written last: its presence means the run
finished. Re-running on an existing output directory resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import time

import torch

from data_prep.atomic import atomic_write_json, atomic_write_text
from hf_vram.builders.model import build_model, expose_bias_of_trainable_tokens, scan_path, trainable_and_total
from hf_vram.builders.training_args import training_args
from hf_vram.device import torch_dtype
from hf_vram.errors import TrainingStopped
from hf_vram.evaluate import scorable, score
from hf_vram.output.checkpoints import CommitCheckpoints, discard_incomplete, latest_complete
from hf_vram.output.loss_plot import LossPicture
from hf_vram.output.memory import MemoryLog
from hf_vram.output.progress import Progress
from hf_vram.output.publish import log
from hf_vram.output.stop import StopOnRequest, clear_stop, stopped_message
from hf_vram.output.summary import LM_EVAL_AFTER, LM_EVAL_BEFORE, peak_memory, reset_peak_memory
from hf_vram.runners.base import Runner
from hf_vram.runners.lm_data import LMData, corpus_data, examples_data
from hf_vram.runners.lm_output import distributed_summary, save_lm_output
from hf_vram.train.samples import SampleText
from hf_vram.train.savings import apply_trainer_savings
from hf_vram.train.trainers import GuardedDPOTrainer, GuardedSFTTrainer, GuardedTrainer

# Held-out metrics kept in the summary (language modelling; DPO's preference metrics).
EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_rewards/margins", "eval_rewards/accuracies")


class LMRunner(Runner):
    trainer_class = GuardedSFTTrainer
    # False where the trainer wraps the model in the adapter itself (trl's DPOTrainer).
    wrap_adapter = True

    trainer = tokenizer = resume = benchmarks = None

    @property
    def model(self):
        return self.trainer.model

    @property
    def is_main(self) -> bool:
        return self.trainer.args.process_index == 0

    def data(self, args) -> LMData:
        return examples_data(self.loaded, self.refs.tokenizer, args)

    def trainer_kwargs(self, peft_config) -> dict:
        return {}

    def setup(self) -> None:
        """Tokenizer, data, model and trainer; nothing trained."""
        recipe, out = self.recipe, self.out
        out.mkdir(parents=True, exist_ok=True)
        # Training arguments first: they set up the process group (and DeepSpeed's config) that the rest relies on.
        args = training_args(recipe, str(out), bool(recipe.data.eval_split or recipe.data.val_size))
        data = self.data(args)
        model, peft_config = build_model(recipe, data.tokenizer, self.refs.model, data.added_token_ids,
                                         wrap=self.wrap_adapter)
        if args.process_index == 0:
            if scan_path(model.config):
                log(scan_path(model.config))
            discard_incomplete(out)
            clear_stop(out)
            atomic_write_text(out / "recipe.yaml", self.loaded.resolved_yaml())
        self.trainer = self.trainer_class(
            model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=data.tokenizer,
            callbacks=self._callbacks(data.tokenizer), **self.trainer_kwargs(peft_config))
        self.trainer.two_stage = recipe.train.lr_scheduler == "two_stage"
        savings = [*getattr(model, "memory_savings", []), *apply_trainer_savings(self.trainer, recipe)]
        if savings and args.process_index == 0:
            log(f"memory savings: {', '.join(savings)}")
        self._after_trainer_built()
        trainable, total = trainable_and_total(self.trainer.model)
        self.tokenizer, self.resume = data.tokenizer, latest_complete(out)
        # A stream (data.streaming) has no length: the summary and the card say so instead of a count.
        samples = "streamed" if recipe.data.streaming else len(data.train)
        self.summary.update(trainable_params=trainable, total_params=total, samples=samples,
                            data=data.counts, memory_savings=savings)

    def _callbacks(self, tokenizer) -> list:
        recipe = self.recipe
        self.stop = StopOnRequest(self.out)
        callbacks = [CommitCheckpoints(keep=recipe.train.save_total_limit), MemoryLog(self.out),
                     LossPicture(f"{self.loaded.name} (task {recipe.task})"), Progress(self.out), self.stop]
        if recipe.eval.sample_during_training and recipe.eval.sample_prompts:
            callbacks.append(SampleText(tokenizer, recipe.eval.sample_prompts, recipe.eval.max_new_tokens, self.out))
        if recipe.train.lr_scheduler == "two_stage":
            from hf_vram.models.bitnet import DropWeightDecayInStage2

            callbacks.append(DropWeightDecayInStage2())
        return callbacks

    def _after_trainer_built(self) -> None:
        """What the trainer's construction changed and training needs back (library behaviour, named below)."""
        recipe, model = self.recipe, self.trainer.model
        expose_bias_of_trainable_tokens(model)
        if recipe.adapter.type == "llama-adapter":
            # peft 0.21's AdaptionPromptModel keeps the forward it found at wrapping time (self.forward =
            # self.model.forward); trl 1.16's trainer then replaces the inner model's forward with its fused LM head
            # (add_fused_lm_head), and calls through the adapter would reach the old forward, which ignores
            # fused_lm_head. Checked by tests/test_library_workarounds.py::
            # test_adaption_prompt_model_keeps_the_forward_it_wrapped.
            model.base_model.forward = model.get_base_model().forward
        if recipe.quant.bits and torch_dtype(recipe.quant.compute_dtype) == torch.float32:
            # trl 1.16's SFTTrainer and DPOTrainer cast the trainable weights of a quantized model to bf16 (the QLoRA
            # paper's choice on GPUs), whatever the compute dtype; where the recipe computes in fp32 (auto on CPU)
            # the adapter trains in fp32 too. Checked by tests/test_library_workarounds.py::
            # test_trl_casts_the_adapter_of_a_quantized_model_to_bf16.
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

    def train(self) -> None:
        """Train (or resume) to the end, with the scores and held-out metrics before and after."""
        trainer, summary = self.trainer, self.summary
        self._before_training()
        reset_peak_memory()
        start = time.time()
        result = trainer.train(resume_from_checkpoint=str(self.resume) if self.resume else None)
        if self.stop.stopped_at is not None:
            raise TrainingStopped(stopped_message(self.stop.stopped_at))
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        summary.update(
            first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
            train_loss=result.training_loss, global_step=trainer.state.global_step,
            **distributed_summary(trainer), train_seconds=round(time.time() - start, 2),
            resumed_from=str(self.resume) if self.resume else None, **peak_memory(),
        )
        if trainer.eval_dataset is not None:
            summary.update({k: v for k, v in trainer.evaluate().items() if k in EVAL_KEYS})
        summary.update(self.task_metrics())

    def task_metrics(self) -> dict:
        return {}

    def _before_training(self) -> None:
        """Scores and held-out metrics of the untrained model (a resumed run keeps its first measurement), and the
        line that says what is about to train."""
        recipe, out, trainer, summary, main = self.recipe, self.out, self.trainer, self.summary, self.is_main
        if scorable(recipe) and main:
            summary["score_before"] = _measured_once(out / "score_before.json",
                                                     lambda: score(recipe, self.model, self.tokenizer))
            log(f"score before training: {_fmt_score(summary['score_before'])}")
        if recipe.eval.tasks and main:
            self._benchmarks()  # now, before training: an unknown task or a silent Hub fails the run at once
            if recipe.eval.tasks_before:
                summary[LM_EVAL_BEFORE] = _measured_once(out / "lm_eval_before.json", lambda: self._lm_eval(self.model))
                log(f"lm-eval before training: {_fmt_lm_eval(summary[LM_EVAL_BEFORE])}")
        if trainer.eval_dataset is not None:
            # Every rank evaluates (it is a collective under DDP); the main one keeps the file.
            summary["eval_before"] = _measured_once(
                out / "eval_before.json", lambda: {k: v for k, v in trainer.evaluate().items() if k in EVAL_KEYS},
                write=main)
            if main:
                log(f"held-out before training: {summary['eval_before']}")
        if main:
            log(f"{self.loaded.name}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
                f"parameters, {summary['samples']} samples, {trainer.args.world_size} process(es) on "
                f"{trainer.args.device}" + (f", resuming from {self.resume}" if self.resume else ""))

    def save_output(self) -> None:
        save_lm_output(self.trainer, self.tokenizer, self.out, self.recipe, self.summary, self.is_main)
        if self.is_main and scorable(self.recipe):
            self.summary["score_after"] = score(self.recipe, self.trainer.model, self.tokenizer)
            log(f"score after training:  {_fmt_score(self.summary['score_after'])}")
        if self.is_main and self.recipe.eval.tasks:
            self.summary[LM_EVAL_AFTER] = self._lm_eval(self.trainer.model)
            log(f"lm-eval after training:  {_fmt_lm_eval(self.summary[LM_EVAL_AFTER])}")

    def _benchmarks(self):
        """eval.tasks (hf_vram/benchmarks/), checked and their data fetched once per run."""
        if self.benchmarks is None:
            from hf_vram.benchmarks.harness import Benchmarks
            from hf_vram.benchmarks.tasks import PromptSettings

            where = self.loaded.origins.get("eval.tasks", str(self.loaded.path))  # file:line, or command line
            self.benchmarks = Benchmarks(self.recipe.eval.tasks, PromptSettings.of(self.recipe), f"{where}: eval.tasks")
        return self.benchmarks

    def _lm_eval(self, model) -> dict:
        """lm-eval's scores of the model in memory, as `score` scores it (hf-vram eval loads a saved one)."""
        from hf_vram.benchmarks.harness import scores

        return scores(self._benchmarks().run(model, self.tokenizer))

    def card(self) -> str:
        from hf_vram.output.cards.lm import lm_card

        return lm_card(self.loaded, self.summary)

    def report(self) -> None:
        s, out, recipe = self.summary, self.out, self.recipe
        log(f"saved {out} (final loss {s['final_loss']}"
            + (f", held-out loss {s['eval_loss']:.4f}" if "eval_loss" in s else "") + ")")
        if recipe.eval.sample_prompts:
            from hf_vram.generate import pipeline_generate

            texts = pipeline_generate(out, recipe.eval.sample_prompts, recipe.eval.max_new_tokens)
            for p, t in zip(recipe.eval.sample_prompts, texts):
                log(f"pipeline('text-generation', model='{out}')\n  prompt: {p!r}\n  output: {t!r}")


class SFTRunner(LMRunner):
    pass


class DPORunner(LMRunner):
    trainer_class = GuardedDPOTrainer
    # trl's DPOTrainer wraps the model in the adapter itself: its reference model is then the same weights with the
    # adapter switched off, not a second frozen copy of the adapter saved beside the trained one.
    wrap_adapter = False

    def trainer_kwargs(self, peft_config) -> dict:
        return {"peft_config": peft_config}

    def task_metrics(self) -> dict:
        return first_and_last(self.trainer.state.log_history, "rewards/margins", "reward_margin")


class PretrainRunner(LMRunner):
    trainer_class = GuardedTrainer

    def data(self, args) -> LMData:
        return corpus_data(self.loaded, self.refs.tokenizer, args)

    def trainer_kwargs(self, peft_config) -> dict:
        from transformers import default_data_collator

        return {"data_collator": default_data_collator}  # equal-length blocks: stacked, nothing to pad


def first_and_last(log_history: list[dict], key: str, name: str) -> dict:
    """The first and the last logged value of a training metric, as first_NAME / final_NAME."""
    values = [e[key] for e in log_history if key in e]  # held-out values are logged as eval_KEY
    return {f"first_{name}": values[0] if values else None, f"final_{name}": values[-1] if values else None}


def _measured_once(path, measure, write: bool = True) -> dict:
    """A measurement kept in `path`: read back when a resumed run finds it, else measured (and written)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = measure()
    if write:
        atomic_write_json(path, value)
    return value


def _fmt_score(s: dict) -> str:
    return f"{s['accuracy']:.1%} exact match ({s['correct']}/{s['total']} held-out)"


def _fmt_lm_eval(scores: dict) -> str:
    from hf_vram.benchmarks.harness import score_lines

    return "; ".join(score_lines(scores))
