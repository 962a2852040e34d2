"""BitNet b1.58 (hf_vram.models.bitnet): a tiny BitNet trained from scratch through transformers' AutoBitLinear with
the two-stage schedule, exported packed and loaded back by from_pretrained and pipeline, reloaded for training."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BitNetConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    pipeline,
)
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, WeightQuant

from hf_vram.models.bitnet import (
    DropWeightDecayInStage2,
    absmean_ternary,
    apply_stage2_weight_decay,
    export_packed,
    load_training_model,
    stage2_start,
    ternary_fraction,
    to_bitlinear,
    two_stage_schedule,
)

VOCAB = 300
STEPS, WARMUP, PEAK_LR = 40, 4, 6e-3
# Exported (BitLinear: int8 activations times the unpacked ternary weights, divided by both scales) against trained
# (AutoBitLinear: the same quantised values, dequantised before the matmul) compute the same thing in a different
# order, so they agree to float rounding (1.4e-6 max, relative to the largest logit 4e-7, measured with a peak lr of
# 3e-3) except where an activation lies within rounding of a step of the 8-bit quantiser and lands on the other
# side of it: that moves every later value of the token a little. Measured here (peak lr 6e-3): max abs 4.3e-4,
# 7.4e-5 of the largest logit, mean 1.2e-6; the same run at lr 1e-2 had more such flips: max 8.5e-3, 1.1e-3 of the
# largest logit, mean 1.7e-4 (2.2e-5 of it). The bounds leave room for those; a wrong scale or packing is off by
# the size of the logits themselves.
MAX_REL_ERROR, MEAN_REL_ERROR = 2e-3, 1e-4
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def eager_one_thread():
    # transformers wraps the BitNet quantisers in @torch.compile: on CPU the first call would compile for seconds.
    # force_eager runs the same functions uncompiled. Tiny matrices: one thread, no fight for the shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.compiler.set_stance("force_eager"):
        yield
    torch.set_num_threads(threads)


def tiny_config() -> BitNetConfig:
    return BitNetConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config())


def repetitive_batch(rows: int = 8, length: int = 32) -> torch.Tensor:
    """A cycle of 8 tokens, each row starting elsewhere in it: learnable from the previous token alone."""
    cycle = torch.arange(10, 18)
    return torch.stack([cycle[(torch.arange(length) + r) % len(cycle)] for r in range(rows)])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One word a token id: "w3".."w298", specials at 0-2 and 299 (names that no word contains, as special tokens
    are matched anywhere in the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": VOCAB - 1} | {f"w{i}": i for i in range(3, VOCAB - 1)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def lr_factor(step: int, total: int = STEPS, warmup: int = WARMUP, fraction: float = 0.5, ratio: float = 0.3) -> float:
    """The schedule written out independently of the implementation."""
    switch = round(total * (1 - fraction))
    if step < warmup:
        return step / warmup
    if step < switch:
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return ratio * 0.5 * (1 + math.cos(math.pi * (step - switch) / (total - switch)))


class RecordUpdate(TrainerCallback):
    """What each optimizer step is about to use: learning rate and weight decay of the first parameter group."""

    def __init__(self):
        self.lr, self.weight_decay = [], []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lr.append(optimizer.param_groups[0]["lr"])
        self.weight_decay.append(optimizer.param_groups[0]["weight_decay"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BitNet trained STEPS AdamW updates by the Trainer with the two-stage schedule."""
    model = to_bitlinear(tiny_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = repetitive_batch()
    with torch.no_grad():
        loss_before = model.eval()(ids, labels=ids).loss.item()
    # betas (0.9, 0.95), the usual choice for LLM pretraining; the peak lr is high, as 1-bit models train at.
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = two_stage_schedule(optimizer, STEPS, WARMUP)
    record = RecordUpdate()
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("bitnet-train")), max_steps=STEPS, per_device_train_batch_size=8,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = Trainer(
        model=model.train(), args=args, train_dataset=data, optimizers=(optimizer, scheduler),
        callbacks=[DropWeightDecayInStage2(), record],
    )
    trainer.train()
    with torch.no_grad():
        loss_after = model.eval()(ids, labels=ids).loss.item()
    return {"model": model, "before": before, "loss": (loss_before, loss_after), "record": record, "ids": ids}


def test_to_bitlinear_swaps_decoder_linears_only():
    model = tiny_model()
    weights = {n: p for n, p in model.named_parameters()}
    to_bitlinear(model)
    for layer in model.model.layers:
        linears = {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        assert sorted(linears) == sorted(DECODER_LINEARS)
        for module in linears.values():
            assert isinstance(module, AutoBitLinear) and module.online_quant
            assert module.weight.device.type == "cpu" and module.weight.requires_grad
            assert torch.equal(module.rms_norm.weight, torch.ones(module.in_features))
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    # The Parameters themselves carried over (an optimizer holding them keeps working), plus one norm per layer.
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in weights.items() if n in after)
    assert len(after) == len(weights) + 2 * len(DECODER_LINEARS)
    recorded = model.config.quantization_config
    assert recorded["linear_class"] == "autobitlinear" and recorded["quantization_mode"] == "online"
    assert recorded["use_rms_norm"] is True
    assert recorded["modules_to_not_convert"] == ["lm_head"]
    ids = repetitive_batch(2, 16)
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and 4.0 < loss.item() < 8.0  # ~ln(300) = 5.7 at random init
    loss.backward()
    # The straight-through estimator passes gradients to the fp32 masters of the quantised layers.
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_training_lowers_loss_changes_every_parameter_and_stays_ternary(trained):
    model = trained["model"]
    loss_before, loss_after = trained["loss"]
    assert loss_after < 0.2 * loss_before, (loss_before, loss_after)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), trained["before"][n])]
    assert not unchanged
    for name, module in model.named_modules():
        if isinstance(module, AutoBitLinear):
            # The weight the forward multiplies by: ternary values times one scale, the absmean of the masters.
            used = WeightQuant.apply(module.weight).detach()
            absmean = module.weight.detach().abs().mean()
            levels = used / absmean
            assert torch.allclose(levels, levels.round(), atol=1e-5), name
            assert set(levels.round().unique().tolist()) <= {-1.0, 0.0, 1.0}, name
            ternary, scale = absmean_ternary(module.weight)
            assert torch.allclose(used, ternary.float() / scale, atol=1e-7), name
    shares = ternary_fraction(model)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.1 < s < 0.6 for s in shares.values()), shares  # no collapse onto zero or onto the signs


def test_two_stage_schedule_in_the_trainer(trained):
    record = trained["record"]
    switch = stage2_start(STEPS)
    assert switch == 20 and len(record.lr) == STEPS
    for step in (0, 2, WARMUP, 10, switch - 1, switch, 30, STEPS - 1):
        assert record.lr[step] == pytest.approx(PEAK_LR * lr_factor(step), abs=1e-12), step
    # The drop at the switch: from ~half the peak down to 0.3 of it.
    assert record.lr[switch - 1] > 0.5 * PEAK_LR > 0.3 * PEAK_LR == pytest.approx(record.lr[switch])
    assert record.weight_decay[:switch] == [0.1] * switch
    assert record.weight_decay[switch:] == [0.0] * (STEPS - switch)


def test_two_stage_schedule_formula_and_weight_decay():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(
        [{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "weight_decay": 0.0}], lr=1.0
    )
    scheduler = two_stage_schedule(
        optimizer, total_steps=100, warmup_steps=10, stage2_fraction=0.25, stage2_lr_ratio=0.2
    )
    # Decaying groups get the recipe's 0.1; a group built without decay (norms, biases) keeps 0.
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    factor = scheduler.lr_lambdas[0]
    assert factor.switch_step == stage2_start(100, 0.25) == 75
    for step in (0, 5, 10, 40, 74, 75, 90, 100):
        assert factor(step) == pytest.approx(lr_factor(step, 100, 10, 0.25, 0.2), abs=1e-12), step
    assert factor(0) == 0.0 and factor(10) == 1.0
    assert factor(75) == pytest.approx(0.2) and factor(100) == pytest.approx(0.0)
    # The LambdaLR itself applies it, step by step.
    lrs = []
    for _ in range(80):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[40] == pytest.approx(lr_factor(40, 100, 10, 0.25, 0.2)) and lrs[75] == pytest.approx(0.2)
    # Weight decay: untouched in stage 1, 0 in every group from the switch on (loop and Trainer forms).
    assert not apply_stage2_weight_decay(optimizer, 74, 100, 0.25)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    callback = DropWeightDecayInStage2(stage2_fraction=0.25)
    callback.on_pre_optimizer_step(None, TrainerState(max_steps=100, global_step=74), None, optimizer=optimizer)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    callback.on_pre_optimizer_step(None, TrainerState(max_steps=100, global_step=75), None, optimizer=optimizer)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    with pytest.raises(ValueError, match="warmup"):
        two_stage_schedule(optimizer, total_steps=100, warmup_steps=60)
    with pytest.raises(ValueError, match="stage2_fraction"):
        two_stage_schedule(optimizer, total_steps=100, warmup_steps=5, stage2_fraction=1.0)


def test_export_packed_loads_with_from_pretrained_and_matches(trained, tmp_path):
    model, ids = trained["model"], trained["ids"]
    # Other inputs than the training rows too: the comparison is not only on memorised text.
    probe = torch.cat([ids[:2], torch.randint(3, VOCAB, (2, ids.shape[1]), generator=torch.Generator().manual_seed(1))])
    expected = logits(model, probe)
    out = export_packed(model, tmp_path / "packed", tokenizer=tiny_tokenizer())

    packed = AutoModelForCausalLM.from_pretrained(out)
    assert type(packed).__name__ == "BitNetForCausalLM"
    assert packed.config.quantization_config.linear_class == "bitlinear"
    assert packed.config.quantization_config.quantization_mode == "offline"
    down = packed.model.layers[0].mlp.down_proj
    assert isinstance(down, BitLinear) and type(packed.lm_head) is nn.Linear
    # 2B4T's layout: uint8 (out_features / 4, in_features), four ternary rows a byte, one scale per tensor.
    assert down.weight.dtype == torch.uint8 and down.weight.shape == (64 // 4, 128)
    assert down.weight_scale.shape == (1,)
    trained_down = model.model.layers[0].mlp.down_proj.weight
    assert down.weight_scale.item() == pytest.approx(1 / trained_down.detach().abs().mean().item(), rel=1e-6)
    assert ternary_fraction(packed) == ternary_fraction(model)

    got = logits(packed, probe)
    error, scale = (got - expected).abs(), expected.abs().max().item()
    assert error.max().item() < MAX_REL_ERROR * scale, f"max abs error {error.max():.3g}, largest logit {scale:.3g}"
    assert error.mean().item() < MEAN_REL_ERROR * scale, f"mean abs logit error {error.mean().item():.3g}"
    assert torch.equal(got[:2].argmax(-1), expected[:2].argmax(-1))  # the trained rows: confident predictions

    # Decoder weights: 2 bits a weight against fp32's 32, plus one 4-byte scale per layer.
    model.save_pretrained(tmp_path / "fp32")
    decoder_bytes = {}
    for name in ("fp32", "packed"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            decoder_bytes[name] = sum(
                f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 2)[-2] in DECODER_LINEARS
            )
    assert decoder_bytes["fp32"] / decoder_bytes["packed"] > 15, decoder_bytes
    assert (out / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "fp32" / "model.safetensors").stat().st_size

    generator = pipeline("text-generation", model=str(out))
    prompt = "w10 w11 w12"
    text = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    # The exported model continues the cycle it learnt (10 .. 17, then 10 again) under greedy decoding.
    assert text.startswith(prompt) and text[len(prompt):].split() == ["w13", "w14", "w15", "w16", "w17", "w10"], text


def test_load_training_model_round_trip(trained, tmp_path):
    model, ids = trained["model"], trained["ids"]
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = load_training_model(tmp_path / "ckpt")
    assert sum(isinstance(m, AutoBitLinear) for m in reloaded.modules()) == 2 * len(DECODER_LINEARS)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    # It trains on: one more update through the straight-through estimator.
    optimizer = torch.optim.AdamW(reloaded.parameters(), lr=1e-3)
    loss = reloaded.train()(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    # A packed export is not a training checkpoint: said so, rather than loaded wrongly.
    export_packed(model, tmp_path / "packed")
    with pytest.raises(ValueError, match="no BitNet training layout"):
        load_training_model(tmp_path / "packed")
