"""What a language-model run saves: the model or adapter, with what transformers and peft leave out on their own,
and the facts of the distributed run for the summary."""

from __future__ import annotations

import hashlib

import torch.distributed as dist

from hf_vram.output.publish import log


def rank_checksums(model) -> list[str]:
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


def distributed_summary(trainer) -> dict:
    return {
        "world_size": trainer.args.world_size,
        "distributed_backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "rank_checksums": rank_checksums(trainer.model),
    }


def save_lm_output(trainer, tokenizer, out, recipe, summary: dict, main: bool) -> None:
    """trainer.save_model on every rank (a collective under FSDP / DeepSpeed), then on the main process the files
    an adapter or a BitNet output needs besides."""
    trainer.save_model(str(out))
    if not main:
        return
    model = trainer.model
    if recipe.adapter.type != "none":
        # An adapter directory has no generation_config.json of its own; the stops set for training (EOS, the chat
        # template's end of turn) then reach `hf-vram merge` and anyone reading the output.
        model.generation_config.save_pretrained(str(out))
    if getattr(getattr(model, "peft_config", {}).get("default"), "trainable_token_indices", None):
        # The vocabulary grew (a chat template's tokens): save the resized embedding and output layers whole.
        # peft decides this by comparing with the base's config, which it cannot read offline for a Hub base.
        model.save_pretrained(str(out), save_embedding_layers=True)
    if model.config.model_type == "bitnet":
        from hf_vram.models.bitnet import export_packed, ternary_fraction

        # The output holds the fp32 masters (to train further); packed/ the ternary weights for inference.
        export_packed(model, out / "packed", tokenizer=tokenizer)
        summary["ternary_fraction"] = ternary_fraction(model)
        log(f"packed ternary export in {out / 'packed'} (weights -1/0/+1: {summary['ternary_fraction']})")
