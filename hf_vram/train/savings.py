"""The memory savings that live in the trainer rather than in the model: activation offloading around each training
step, and the loss (trl's fused LM head, or the full logits when train.fused_loss is false)."""

from __future__ import annotations

from hf_vram.builders.long_context import offloading_on
from hf_vram.device import has_cuda
from hf_vram.recipe.schema import Recipe


def full_logits_loss(model):
    """train.fused_loss false for SFT: the model's own causal-LM loss on full logits (trl then scores its token
    accuracy and entropy in a second, gradient-free pass through its fused head)."""

    def loss(outputs, labels, num_items_in_batch=None):
        return model.loss_function(logits=outputs.logits, labels=labels, vocab_size=outputs.logits.shape[-1],
                                   num_items_in_batch=num_items_in_batch)

    return loss


def apply_trainer_savings(trainer, recipe: Recipe) -> list[str]:
    """Wire the recipe's trainer-side savings into a built trainer; returns what was applied, for the log."""
    from trl.trainer.utils import add_fused_lm_head

    done = []
    if not has_cuda():
        from hf_vram.train.cpu_fused_loss import use_cpu_fused_loss

        use_cpu_fused_loss()  # trl's fused head on CPU tensors: hf-vram's chunked function (cpu_fused_loss.py)
    if offloading_on(recipe, has_cuda()):
        from hf_vram.train.offload import offload_context

        # trl's SFT and DPO trainers run every training step inside this context (the pretraining trainer too,
        # train/trainers.py); creating it once keeps its pinned buffers and streams across steps.
        trainer.maybe_activation_offload_context = offload_context(trainer.model)
        done.append("activation offloading to CPU memory")
    from hf_vram.vram.estimate import loss_uses_fused_head

    fused = loss_uses_fused_head(trainer.model.config, recipe)
    if recipe.task == "pretrain" and fused:
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        add_fused_lm_head(base)
        trainer.fused_loss = True
        done.append("fused LM head loss")
    elif recipe.task == "sft" and not fused:
        trainer.compute_loss_func = full_logits_loss(trainer.model)
        done.append("full-logits loss (train.fused_loss false)")
    return done
