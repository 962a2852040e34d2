"""The preference runners beside DPO (hf_vram/runners/lm.py): ORPO and SimPO on chosen/rejected pairs, which need
no reference model, and KTO on answers judged one by one (format unpaired), whose reference is the base with the
adapter switched off, as DPO's is. Everything else (data, model, output, card) is the language-model runner's."""

from __future__ import annotations

from hf_vram.runners.lm import DPORunner, LMRunner, first_and_last
from hf_vram.train.trainers import GuardedCPOTrainer, GuardedKTOTrainer, GuardedORPOTrainer


class _PairedRunner(LMRunner):
    """ORPO and SimPO: the policy alone scores both answers (no reference pass), so hf-vram wraps the adapter
    itself as for SFT, and trl's trainer gets the adapter model as it is."""

    def task_metrics(self) -> dict:
        return first_and_last(self.trainer.state.log_history, "rewards/margins", "reward_margin")


class ORPORunner(_PairedRunner):
    trainer_class = GuardedORPOTrainer

    def task_metrics(self) -> dict:
        history = self.trainer.state.log_history
        # ORPO's loss is the chosen answers' NLL plus beta x the log odds-ratio term: both are logged.
        return {**super().task_metrics(), **first_and_last(history, "log_odds_ratio", "log_odds_ratio"),
                **first_and_last(history, "nll_loss", "nll_loss")}


class SimPORunner(_PairedRunner):
    # trl's CPO trainer; its config carries loss_type simpo (hf_vram/builders/training_args.py: simpo_config).
    trainer_class = GuardedCPOTrainer


class KTORunner(DPORunner):
    # As DPO's, trl's KTOTrainer wraps the model in the adapter itself, and then scores its reference (and the KL
    # reference point) with the adapter switched off: no second copy of the model.
    trainer_class = GuardedKTOTrainer

    def task_metrics(self) -> dict:
        history = self.trainer.state.log_history
        # rewards/margins: desirable minus undesirable rewards where a micro-batch has both; kl: the estimate of the
        # policy's KL divergence from the reference, KTO's reference point.
        return {**first_and_last(history, "rewards/margins", "reward_margin"), **first_and_last(history, "kl", "kl")}
