"""The behaviours of transformers, peft, trl and bitsandbytes that hf-vram works around, each checked on the library
itself with a tiny model on the CPU: when a library changes one, its test here fails, naming the installed version,
and the workaround (named in each docstring) can go or must change.

Guarded elsewhere, not repeated here:
- peft's fp32 cast of a 4-bit base's unquantized weights in prepare_model_for_kbit_training (undone by
  builders/model.py's cast_unquantized): tests/test_long_context.py::test_peft_still_casts_unquantized_weights_to_fp32;
- trl looking up its fused-head kernel at every call (train/cpu_fused_loss.py's use_cpu_fused_loss):
  tests/test_long_context.py::test_trl_still_looks_up_its_fused_kernel_at_call_time;
- huggingface_hub's retries on an unreachable Hub (vram/configs.py's hub_config_file):
  tests/test_plan_speed.py::test_huggingface_hub_still_retries_an_unreachable_hub;
- transformers' config defaults and layer shapes the planner writes down (vram/configs.py DENSE_DEFAULTS,
  vram/counts.py): tests/test_plan_speed.py.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TESTS = Path(__file__).resolve().parent


def version(package: str) -> str:
    return f"{package} {importlib.metadata.version(package)}"


def _tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config}))


def _load_4bit(path, compute=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute, device_map={"": "cpu"})


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True, **kw)


def test_guards_kept_elsewhere_still_exist():
    """The tests named in this module's docstring, so that the list cannot silently go stale."""
    for ref in re.findall(r"tests/(test_\w+\.py)::(test_\w+)", __doc__):
        assert f"def {ref[1]}(" in (TESTS / ref[0]).read_text(), f"{ref[0]} no longer has {ref[1]}"


# ---------------------------------------------------------------------------------------------------- transformers


def _micro_batches(vocab: int):
    """Two micro-batches of one optimizer step, with different numbers of labelled tokens."""
    torch.manual_seed(1)
    batches = []
    for masked in (2, 5):
        ids = torch.randint(0, vocab, (2, 8))
        labels = ids.clone()
        labels[:, :masked] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _hand_loss(model, batch, num_items):
    """Summed next-token cross-entropy over the step's token count, plus coef x the model's load-balancing loss."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"])
    logits = out.logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                         reduction="sum")
    return ce / num_items, model.config.router_aux_loss_coef * out.aux_loss


def test_trainer_leaves_a_moe_models_aux_loss_unscaled_by_grad_accum_and_multiplies_it_by_processes(tmp_path,
                                                                                                    monkeypatch):
    """transformers 5.24's Trainer with a model that accepts loss kwargs (a Mixtral with output_router_logits) and
    grad_accum 2: the model returns cross-entropy / num_items_in_batch (the tokens of the whole optimizer step) +
    coef x aux; training_step does not divide that by grad_accum, and compute_loss multiplies it by the number of
    processes when average_tokens_across_devices. So the router's loss weighs coef x grad_accum x processes, which
    hf_vram/train/moe_router.py (RouterLoss.rescale_aux_loss) takes back to coef once per optimizer step."""
    from accelerate import Accelerator
    from transformers import MixtralConfig, MixtralForCausalLM, Trainer

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5, max_position_embeddings=32)
    model = MixtralForCausalLM(config)
    trainer = Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    v = version("transformers")
    assert trainer.model_accepts_loss_kwargs, f"{v}: the Trainer no longer passes num_items_in_batch to Mixtral"
    assert trainer.args.average_tokens_across_devices, f"{v}: average_tokens_across_devices is no longer the default"

    batches, num_items = trainer.get_batch_samples(iter(_micro_batches(config.vocab_size)), 2, torch.device("cpu"))
    assert int(num_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it
    model.train()
    for batch in batches:
        ce, aux = _hand_loss(model, batch, num_items)
        assert aux > 0
        loss = trainer.training_step(model, dict(batch), num_items)
        assert loss.item() == pytest.approx((ce + aux).item(), rel=1e-5), (
            f"{v}: Trainer.training_step returned {loss.item():.6f}, not cross-entropy / num_items + coef x aux "
            f"= {(ce + aux).item():.6f} (divided by grad_accum it would be {((ce + aux) / 2).item():.6f}): "
            "revisit RouterLoss.rescale_aux_loss in hf_vram/train/moe_router.py")

    # Two processes: compute_loss multiplies the whole loss, aux term included, by their number.
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    ce, aux = _hand_loss(model, batches[0], num_items)
    loss = trainer.compute_loss(model, dict(batches[0]), num_items_in_batch=num_items)
    assert loss.item() == pytest.approx(2 * (ce + aux).item(), rel=1e-5), (
        f"{v}: Trainer.compute_loss under 2 processes returned {loss.item():.6f}, not 2 x (cross-entropy / "
        f"num_items + coef x aux) = {2 * (ce + aux).item():.6f}: revisit RouterLoss.rescale_aux_loss")


def test_trainer_counts_every_label_of_a_model_without_a_loss_type(tmp_path):
    """transformers 5.24: GPT-2 leaves `loss_type` unset, and the Trainer then counts num_items_in_batch over every
    label (T per row) where the causal loss predicts T - 1 of them, scaling the loss by (T - 1) / T. With
    loss_type ForCausalLM (what hf_vram/builders/model.py's build_model sets) it counts the shifted labels."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    v = version("transformers")
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50))
    assert model.loss_type is None, f"{v}: GPT-2 now sets loss_type={model.loss_type!r}: build_model's default can go"
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}
    _, counted = Trainer(model=model, args=_args(tmp_path)).get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert int(counted) == 2 * 8, f"{v}: the Trainer counts {int(counted)} labels of a model without a loss_type"
    model.loss_type = "ForCausalLM"
    _, counted = Trainer(model=model, args=_args(tmp_path)).get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert int(counted) == 2 * 7


def test_trainer_writes_every_checkpoint_through_save_checkpoint(tmp_path):
    """transformers 5.24's Trainer writes each checkpoint in Trainer._save_checkpoint, entered before any of its
    files exist: hf_vram/train/trainers.py overrides it to stop on a non-finite loss before a checkpoint is written."""
    from transformers import Trainer

    calls = []

    class Recording(Trainer):
        def _save_checkpoint(self, model, trial):
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            calls.append((self.state.global_step, folder.exists()))
            return super()._save_checkpoint(model, trial)

    ids = torch.randint(0, 100, (8,))
    data = [{"input_ids": ids, "labels": ids}] * 4
    args = _args(tmp_path, max_steps=2, save_steps=1, per_device_train_batch_size=2, logging_steps=1)
    Recording(model=_tiny_llama(), args=args, train_dataset=data).train()
    v = version("transformers")
    assert calls == [(1, False), (2, False)], f"{v}: Trainer._save_checkpoint calls {calls} (step, folder existed)"
    assert all((tmp_path / "out" / f"checkpoint-{s}").is_dir() for s in (1, 2)), f"{v}: no checkpoint folders"


def test_attention_free_models_refuse_sdpa():
    """transformers 5.24 refuses attn_implementation='sdpa' (its default) for models without attention: builders/
    model.py's attention_for asks for none for them (Mamba, Mamba2, RWKV)."""
    from transformers import AutoModelForCausalLM, MambaConfig

    def config():
        return MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=50, state_size=4)

    v = version("transformers")
    cls = AutoModelForCausalLM._model_mapping[MambaConfig]
    assert cls._supports_sdpa is False, f"{v}: {cls.__name__} now supports sdpa: attention_for can go"
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa")
    # What attention_for asks for instead: none, the model's own default.
    assert type(AutoModelForCausalLM.from_config(config(), attn_implementation=None)) is cls


# ---------------------------------------------------------------------------------------------------- bitsandbytes


def _input_grad(layer, x):
    layer.train()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    if out.requires_grad:
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return x.grad


def test_bitsandbytes_repacks_4bit_weights_for_cpu_inference_and_training_does_not_undo_it(tiny_base):
    """bitsandbytes 0.50 repacks a Linear4bit's weight in place at its first eval-mode, no-grad forward on a CPU with
    AVX512-BF16 (support_avx512bf16_for_cpu), and later training forwards no longer carry the gradient through the
    layer: after a generate() before training, the base passed back far smaller gradients. hf_vram/builders/model.py's
    keep_4bit_layout_for_training switches the repacking off for models that are trained."""
    import bitsandbytes as bnb

    v = version("bitsandbytes")
    model = _load_4bit(tiny_base)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.support_avx512bf16_for_cpu == bool(bnb.functional.has_avx512bf16()), (
        f"{v}: Linear4bit no longer sets support_avx512bf16_for_cpu from the CPU: keep_4bit_layout_for_training's switch")
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip(f"this CPU has no AVX512-BF16: {v} does not repack here")
    x = torch.randn(1, 5, layer.in_features)
    before = _input_grad(layer, x)
    layout = layer.weight.data.shape
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), (
        f"{v} no longer repacks a 4-bit weight at an eval-mode no-grad forward on the CPU: "
        "keep_4bit_layout_for_training can go")
    assert layer.weight.data.shape != layout
    after = _input_grad(layer, x)
    assert after is None or not torch.allclose(after, before, rtol=1e-3, atol=1e-5), (
        f"{v}: training after the repacking gives the gradient it gave before: keep_4bit_layout_for_training can go")

    # With the switch off (keep_4bit_layout_for_training), the same sequence keeps the layout and the gradient.
    fresh = _load_4bit(tiny_base).model.layers[0].mlp.up_proj
    fresh.support_avx512bf16_for_cpu = False
    before = _input_grad(fresh, x)
    fresh.eval()
    with torch.no_grad():
        fresh(x)
    assert not getattr(fresh.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(_input_grad(fresh, x), before, msg=f"{v}: the switch no longer keeps the gradient")


# ------------------------------------------------------------------------------------------------------- peft, trl


def test_trls_fused_head_reads_a_bias_that_peft_trainable_tokens_do_not_answer():
    """peft 0.21's TrainableTokensWrapper (the new tokens' rows of an untied output layer) answers `.weight` with the
    merged weights, trained rows included, but has no `.bias`; trl 1.16's fused LM head reads both, so its forward
    fails. hf_vram/builders/model.py's expose_bias_of_trainable_tokens gives the wrapper its layer's bias."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import TrainableTokensWrapper
    from trl.trainer.utils import add_fused_lm_head

    from hf_vram.builders.model import expose_bias_of_trainable_tokens

    new = [98, 99]
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"],
                                                     trainable_token_indices={"embed_tokens": new, "lm_head": new}))
    add_fused_lm_head(model.get_base_model())  # as trl's SFTTrainer does, on the wrapped model's base
    head = model.get_base_model().get_output_embeddings()
    assert isinstance(head, TrainableTokensWrapper), f"{version('peft')}: the untied head is {type(head).__name__}"
    with torch.no_grad():
        head.token_adapter.trainable_tokens_delta["default"].fill_(0.5)
    merged, original = head.weight, head.original_module.weight
    assert torch.equal(merged[new], torch.full_like(merged[new], 0.5)) and torch.equal(merged[:98], original[:98]), (
        f"{version('peft')}: TrainableTokensWrapper.weight no longer carries the trained rows")
    with pytest.raises(AttributeError, match="bias"):
        head.bias  # noqa: B018
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(AttributeError, match="bias"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)

    expose_bias_of_trainable_tokens(model)
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert fused.loss.item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5), (
        f"{version('trl')}: the fused head's loss differs from the model's own with the trained rows")


def test_adaption_prompt_model_keeps_the_forward_it_wrapped():
    """peft 0.21's AdaptionPromptModel stores the inner model's forward when it wraps it; trl 1.16's fused LM head
    (add_fused_lm_head, which its SFTTrainer applies after wrapping) replaces that forward, and calls through the
    adapter still reach the old one, which ignores fused_lm_head: no per-token log-probabilities. hf_vram/runners/
    lm.py points the adapter at the new forward."""
    from peft import AdaptionPromptConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    model = get_peft_model(_tiny_llama(), AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"))
    add_fused_lm_head(model.get_base_model())
    ids = torch.randint(0, 100, (2, 8))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert not hasattr(out, "log_probs"), (
        f"{version('peft')} / {version('trl')}: the adapter now reaches trl's fused forward: runners/lm.py's "
        "re-pointing of base_model.forward can go")

    model.base_model.forward = model.get_base_model().forward  # hf-vram's fix
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert out.log_probs is not None
    assert out.loss.item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


def _trainable_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def test_trl_casts_the_adapter_of_a_quantized_model_to_bf16(tiny_base, tmp_path):
    """trl 1.16's SFTTrainer and DPOTrainer cast the trainable (adapter) weights of a 4-bit model to bf16 (the QLoRA
    paper's choice on GPUs), whatever the compute dtype: hf_vram/runners/lm.py casts them back to fp32 where the
    recipe computes in fp32 (auto on the CPU)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    v = version("trl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    common = dict(use_cpu=True, report_to="none", max_steps=1, bf16=False, disable_tqdm=True)

    model = get_peft_model(_load_4bit(tiny_base), lora)
    assert _trainable_dtypes(model) == {torch.float32}  # peft's own choice: fp32 adapters
    sft = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft"), **common),
                     train_dataset=Dataset.from_list([{"input_ids": [1, 5, 6, 7, 2]}] * 2), processing_class=tokenizer)
    assert _trainable_dtypes(sft.model) == {torch.bfloat16}, f"{v}: SFTTrainer leaves {_trainable_dtypes(sft.model)}"

    pairs = Dataset.from_list([{"prompt": "1 + 2 =", "chosen": " 3", "rejected": " 4"}] * 2)
    dpo = DPOTrainer(model=_load_4bit(tiny_base), args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
                     train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    assert _trainable_dtypes(dpo.model) == {torch.bfloat16}, f"{v}: DPOTrainer leaves {_trainable_dtypes(dpo.model)}"



def test_dit_pipeline_draws_its_null_class_at_id_1000():
    """diffusers 0.42's DiTPipeline uses class id 1000 as the null class of classifier-free guidance whatever the
    model's label table holds, so builders/diffusion_archs.py gives a DiT 1000 class rows plus the null row
    (fixed_null_class). Checked on the pipeline itself: its call embeds the label 1000 for the unconditional half."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from hf_vram.builders.diffusion_archs import ARCHS, DIT_NULL_CLASS

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=DIT_NULL_CLASS)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()),
                                    with_kwargs=True)

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[3], num_inference_steps=1, guidance_scale=2.0, output_type="np")
    assert seen and seen[0] == [3, DIT_NULL_CLASS], f"{version('diffusers')}: DiTPipeline's labels were {seen[0]}"
    assert ARCHS["dit"].fixed_null_class == DIT_NULL_CLASS
