"""The translation layer, recipe -> the Hugging Face libraries' objects, for every shipped recipe and for the tests'
tiny variants of them: the training arguments, BitsAndBytesConfig, the peft config, the model config, and the model
itself built on the meta device (no weights, no data; diffusers' model for task diffusion). A base on the Hub gets
its config from hf-vram's known configs (the Hub is never asked: HF_HUB_OFFLINE). Milliseconds a recipe.

What each result must carry is written here from the recipe's documented meaning (recipe/schema.py), not read back
from the builder's code; the model built on meta is also counted against the planner's parameter counts, a second
translation of the same recipe."""

from __future__ import annotations

import functools
import importlib
import json
import math

import pytest
import torch

from hf_vram.builders import diffusion as diffusion_builders
from hf_vram.builders.adapter import adapter_config
from hf_vram.builders.model import build_model
from hf_vram.builders.quant import bnb_config
from hf_vram.builders.training_args import training_args
from hf_vram.recipe.load import load_recipe, shipped_recipes
from hf_vram.vram.configs import resolve_config
from hf_vram.vram.counts import count_parameters

from .conftest import SAMPLE_DATA

# model.arch -> the diffusers class (builders/diffusion.py's table of architectures).
DIFFUSERS_CLASSES = {"unet2d": "UNet2DModel", "dit": "DiTTransformer2DModel",
                     "unet2d-condition": "UNet2DConditionModel", "pixart": "PixArtTransformer2DModel"}
# Fields a model built from scratch takes from its tokenizer rather than from the recipe.
TOKENIZER_FIELDS = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}


@functools.cache
def _shipped(name: str):
    return load_recipe(shipped_recipes()[name], check_references=False).recipe


def names(kind) -> list[str]:
    """Shipped recipes for which kind(recipe) holds (collection time: no references checked)."""
    return [n for n in sorted(shipped_recipes()) if kind(_shipped(n))]


def lm_task(r) -> bool:
    from hf_vram.tasks import task_of

    return task_of(r).language_model


def on_the_hub(r) -> bool:
    """A pretrained base named by Hub id (not another recipe's output): what the tiny fine-tuning variants replace."""
    return bool(r.model.name_or_path) and not r.model.name_or_path.startswith("recipe:")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """resolve_config asks the Hub (with a short deadline) for a config it has not cached unless offline: here it
    never does. huggingface_hub read the variable at import, so its constant is set too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    """The tests' tiny BPE tokenizer (300 tokens, trained offline): what a model built from scratch is sized to."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def expected_precision(choice: str) -> str:
    """train.precision as the schema documents it: auto = bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def expected_dtype(choice: str) -> torch.dtype:
    """quant.compute_dtype: auto = the dtype of train.precision's auto rule."""
    by_precision = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return by_precision[expected_precision("auto")] if choice == "auto" else getattr(torch, choice)


def _value(x):
    """An enum field of TrainingArguments (OptimizerNames, SchedulerType, IntervalStrategy) as its string."""
    return getattr(x, "value", x)


def has_eval(recipe) -> bool:
    """Held-out data: a split of the source, or val_size of the records (the runner's rule)."""
    return bool(recipe.data.eval_split or recipe.data.val_size)


# ---------------------------------------------------------------------------------------------------- checks


def check_training_args(recipe, args) -> None:
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, KTOConfig, SFTConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    t = recipe.train
    expected_class = {"sft": SFTConfig, "dpo": DPOConfig, "pretrain": TrainingArguments, "orpo": ORPOConfig,
                      "simpo": CPOConfig, "kto": KTOConfig, "grpo": GRPOConfig}[recipe.task]
    assert type(args) is expected_class
    assert args.learning_rate == t.lr
    assert args.per_device_train_batch_size == args.per_device_eval_batch_size == t.micro_batch_size
    assert args.gradient_accumulation_steps == t.grad_accum
    assert args.max_steps == (t.max_steps if t.max_steps else -1)
    assert args.num_train_epochs == t.epochs
    precision = expected_precision(t.precision)
    assert (args.bf16, args.fp16) == (precision == "bf16", precision == "fp16")
    # two_stage is hf-vram's own schedule, built by its trainer over a constant base schedule.
    assert _value(args.lr_scheduler_type) == ("constant" if t.lr_scheduler == "two_stage" else t.lr_scheduler)
    if t.lr_scheduler == "cosine_with_min_lr":
        assert args.lr_scheduler_kwargs == {"min_lr": t.min_lr}
    assert args.warmup_steps == t.warmup
    assert (args.weight_decay, args.max_grad_norm, args.adam_beta2) == (t.weight_decay, t.max_grad_norm, t.adam_beta2)
    assert _value(args.optim) == t.optimizer
    # A quantized base has checkpointing switched on by peft's prepare_model_for_kbit_training instead.
    assert args.activation_checkpointing == (t.gradient_checkpointing and recipe.quant.bits is None)
    assert (args.seed, args.data_seed) == (t.seed, t.seed)
    assert (args.logging_steps, args.save_steps) == (t.logging_steps, t.save_steps)
    # Checkpoints are rotated by hf-vram once complete, never by the Trainer before.
    assert args.save_total_limit is None
    assert _value(args.eval_strategy) == ("steps" if has_eval(recipe) and t.eval_steps else "no")
    assert args.report_to == t.report_to
    assert args.torch_compile == t.torch_compile
    assert args.use_cpu == (not torch.cuda.is_available())
    check_task_args(recipe, args)


def check_task_args(recipe, args) -> None:
    """The settings of each task's own config class."""
    d = recipe.data
    if recipe.task == "sft":
        assert (args.max_length, args.packing) == (d.max_length, d.packing)
        # Plain text continues across sequences; samples with a prompt are never split.
        assert args.packing_strategy == ("bfd_split" if d.format == "text" else "bfd")
    if recipe.task == "dpo":
        assert (args.max_length, args.beta, args.loss_type) == (d.max_length, recipe.dpo.beta, [recipe.dpo.loss_type])
    if recipe.task == "orpo":
        assert (args.max_length, args.beta) == (d.max_length, recipe.orpo.beta)
    if recipe.task == "simpo":
        s = recipe.simpo
        assert (args.loss_type, args.beta, args.simpo_gamma, args.cpo_alpha) == ("simpo", s.beta, s.gamma, s.cpo_alpha)
    if recipe.task == "kto":
        k = recipe.kto
        assert (args.beta, args.desirable_weight, args.undesirable_weight) == (k.beta, k.desirable_weight,
                                                                               k.undesirable_weight)
    if recipe.task == "grpo":
        g = recipe.grpo
        assert (args.num_generations, args.max_completion_length, args.beta, args.temperature, args.loss_type) == (
            g.num_generations, g.max_completion_length, g.beta, g.temperature, g.loss_type)
        assert args.reward_weights == [r.weight for r in g.rewards]
        # The answer column must reach the reward functions; a whole number of groups is generated at once.
        assert args.remove_unused_columns is False
        assert args.generation_batch_size % g.num_generations == 0


def check_quant(quant, config) -> None:
    if quant.bits is None:
        assert config is None
        return
    if quant.bits == 8:
        assert config.load_in_8bit and not config.load_in_4bit
        return
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == quant.type
    assert config.bnb_4bit_use_double_quant == quant.double_quant
    assert config.bnb_4bit_compute_dtype == expected_dtype(quant.compute_dtype)
    # One process: bitsandbytes' own packed uint8 storage (not under FSDP: test_quant_storage_under_a_sharded_launch).
    assert config.bnb_4bit_quant_storage == torch.uint8


def check_adapter(adapter, config) -> None:
    from peft import AdaptionPromptConfig, LoraConfig

    if adapter.type == "none":
        assert config is None
        return
    if adapter.type == "llama-adapter":
        assert type(config) is AdaptionPromptConfig
        assert (config.adapter_len, config.adapter_layers) == (adapter.prompt_length, adapter.prompt_layers)
        assert config.task_type == "CAUSAL_LM"
        return
    assert type(config) is LoraConfig
    assert (config.r, config.lora_alpha, config.lora_dropout) == (adapter.r, adapter.alpha, adapter.dropout)
    targets = adapter.target_modules
    assert config.target_modules == (targets if isinstance(targets, str) else set(targets))
    assert (config.use_dora, config.use_rslora) == (adapter.type == "dora", adapter.type == "rslora")
    assert config.bias == "none" and config.task_type == "CAUSAL_LM"
    assert config.trainable_token_indices is None  # no tokens added: nothing beside the adapter trains


def check_adapted_model(model, recipe) -> None:
    """The peft model on meta carries the recipe's adapter where the recipe says."""
    a = recipe.adapter
    if a.type == "llama-adapter":
        from peft.tuners.adaption_prompt.layer import AdaptedAttention

        adapted = [m for m in model.modules() if isinstance(m, AdaptedAttention)]
        assert len(adapted) == min(a.prompt_layers, model.config.num_hidden_layers)
        assert all(m.adaption_prompt.shape == (1, a.prompt_length, model.config.hidden_size) for m in adapted)
        return
    from peft.tuners.lora import LoraLayer

    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert lora
    scale = a.alpha / (math.sqrt(a.r) if a.type == "rslora" else a.r)
    for name, m in lora.items():
        # peft 0.21 adapts Mixtral's fused gate_up_proj experts (w1 and w3 in one tensor) with rank and alpha doubled:
        # each half keeps the recipe's rank and scale.
        fused = 2 if getattr(m, "parameter_name", None) == "gate_up_proj" else 1
        assert (m.r["default"], m.use_dora["default"]) == (fused * a.r, a.type == "dora"), name
        assert m.scaling["default"] == pytest.approx(scale), name
    if a.target_modules == "all-linear":
        # Every linear layer of the blocks: what stays a plain nn.Linear is the output layer alone.
        plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and not any(n == w or n.startswith(w + ".") for w in lora)]
        output = model.get_output_embeddings()
        assert [m for n, m in model.named_modules() if n in plain] == [output], plain
    else:
        assert {n.rsplit(".", 1)[-1] for n in lora} == set(a.target_modules)


def check_counts(model, config, recipe) -> None:
    """The model on meta has as many parameters, and as many trainable ones, as the planner counts from the config."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total > 0 and all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(config, recipe)
    assert (total, trainable) == (counts.total, counts.trainable)


def check_config_fields(config, fields: dict) -> None:
    """Every model.config key of the recipe is a field of the built config with the recipe's value."""
    for key, value in fields.items():
        assert getattr(config, key) == value, key


def check_model_on_meta(recipe, config) -> None:
    """A pretrained base (or an assembled mixture) from its config, on meta, wrapped in the recipe's adapter."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = recipe.adapter
    if adapter.type == "llama-adapter":
        # build_model's rule: the paper's top 30 layers, or all of a smaller model's.
        adapter = adapter.model_copy(update={"prompt_layers": min(adapter.prompt_layers, config.num_hidden_layers)})
    peft_config = adapter_config(adapter)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if peft_config is not None:
            model = get_peft_model(model, peft_config)
    assert type(model.config) is type(config)
    if peft_config is not None:
        check_adapted_model(model, recipe)
    else:
        assert all(p.requires_grad for p in model.parameters())  # trained in full
    check_counts(model, config, recipe)


def check_scratch_model(recipe, config, tokenizer) -> None:
    """build_model itself, on meta, sized to the tokenizer; and resolve_config's config (sized to the recipe's
    vocabulary) agrees with it on every other field, and with the planner on the parameters."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model, peft_config = build_model(recipe, tokenizer, None)
    assert peft_config is None and recipe.adapter.type == "none"
    built = model.config
    assert model.config.model_type == recipe.model.arch
    assert type(model) is AutoModelForCausalLM._model_mapping[type(built)]
    check_config_fields(built, recipe.model.config)
    assert built.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert (built.bos_token_id, built.eos_token_id, built.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # The loss the Trainer normalises by the shifted labels (GPT-2 leaves it unset otherwise).
    assert model.loss_type == "ForCausalLM"
    assert all(p.device.type == "meta" and p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 0
    if recipe.model.arch == "bitnet":
        from transformers.integrations.bitnet import AutoBitLinear

        # Ternary training layers in every block (quantised online from fp32 masters); the output layer stays
        # full precision. The config records it, as transformers' BitNet checkpoints do.
        assert sum(isinstance(m, AutoBitLinear) for m in model.modules()) == 7 * built.num_hidden_layers
        assert built.quantization_config["quantization_mode"] == "online"

    def fields(c):
        left_out = TOKENIZER_FIELDS | {"transformers_version", "quantization_config"}
        return {k: v for k, v in c.to_dict().items() if k not in left_out}

    assert fields(config) == fields(built)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    check_counts(full, config, recipe)


def check_diffusion(recipe) -> None:
    """model_config and model_class on the recipe, the model on meta, and the noise schedulers."""
    from hf_vram.vram.diffusion_plan import text_encoder_config, vae_config

    d, images = recipe.diffusion, recipe.data.images
    vae = vae_config(d.vae) if d.vae else None
    if vae is not None:
        latent_channels = vae["latent_channels"]
        latent_size = images.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        latent_channels, latent_size = images.channels, images.resolution
    text = text_encoder_config(d.text_encoder) if d.text_encoder else None
    text_dim = (getattr(text, "d_model", None) or text.hidden_size) if text is not None else None
    config = diffusion_builders.model_config(recipe, latent_channels, latent_size, text_dim, d.num_classes)
    cls = diffusion_builders.model_class(recipe.model.arch)
    assert cls.__name__ == DIFFUSERS_CLASSES[recipe.model.arch]
    with torch.device("meta"):
        model = cls(**config)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(p.device.type == "meta" for p in model.parameters())
    for key, value in recipe.model.config.items():
        got = model.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert (model.config.in_channels, model.config.out_channels) == (latent_channels, latent_channels)
    assert model.config.sample_size == latent_size
    arch = recipe.model.arch
    if arch == "dit":
        assert model.config.num_embeds_ada_norm == 1000  # DiTPipeline's fixed null class of guidance
    if arch == "unet2d":
        classes = (d.num_classes or 10) + 1 if d.conditioning == "class" else None  # + the null class of guidance
        assert model.config.num_class_embeds == classes
    if text_dim is not None:  # the model reads the frozen encoder's width
        key = {"unet2d-condition": "cross_attention_dim", "pixart": "caption_channels"}[arch]
        assert model.config[key] == text_dim
    noise, sample = diffusion_builders.schedulers(recipe)
    for scheduler in (noise, sample):
        c = scheduler.config
        assert (c.num_train_timesteps, c.beta_schedule, c.prediction_type) == (
            d.num_train_timesteps, d.beta_schedule, d.prediction_type)
    assert type(noise).__name__ == "DDPMScheduler"
    assert type(sample).__name__ == {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}[d.sampler]
    if d.sampler == "ddim":
        assert sample.config.clip_sample == (d.vae is None)  # x0 is bounded in pixel space only


def check_recipe(loaded, tmp_path, tokenizer=None) -> None:
    """Every builder the recipe goes through, and what each result must carry."""
    r = loaded.recipe
    check_quant(r.quant, bnb_config(r.quant))
    check_adapter(r.adapter, adapter_config(r.adapter))
    if lm_task(r):
        check_training_args(r, training_args(r, str(tmp_path / "out"), has_eval(r)))
    if r.task == "diffusion":
        check_diffusion(r)
    elif r.model.arch:
        check_scratch_model(r, resolve_config(loaded), tokenizer)
    else:
        config = resolve_config(loaded)
        if r.task == "assemble":
            assert config.model_type == "mixtral"
            assert (config.num_local_experts, config.num_experts_per_tok) == (
                len(r.moe.experts), r.moe.experts_per_token)
        check_model_on_meta(r, config)


# ----------------------------------------------------------------------------------------------- the shipped recipes


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipe_translates(name, tmp_path, tokenizer):
    check_recipe(load_recipe(shipped_recipes()[name]), tmp_path, tokenizer)


def test_every_task_and_adapter_is_covered():
    recipes = [_shipped(n) for n in shipped_recipes()]
    from hf_vram.tasks import TASKS

    assert {r.task for r in recipes} == set(TASKS)  # a recipe ships for every task
    assert {"none", "lora", "llama-adapter"} <= {r.adapter.type for r in recipes}
    assert {None, 4} <= {r.quant.bits for r in recipes}
    assert {"unet2d", "dit", "unet2d-condition", "pixart"} <= {r.model.arch for r in recipes if r.task == "diffusion"}


@pytest.mark.parametrize("name", ["demo-base", "llama7b-qlora-alpaca", "mistral7b-qlora-dpo", "gpt2-124m-fineweb"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_precision_reaches_the_training_arguments(name, precision, tmp_path):
    r = load_recipe(shipped_recipes()[name], [f"train.precision={precision}"]).recipe
    check_training_args(r, training_args(r, str(tmp_path / "out"), has_eval(r)))


@pytest.mark.parametrize("overrides", [
    ["quant.bits=8"],
    ["quant.type=fp4", "quant.double_quant=false"],
    ["quant.compute_dtype=bfloat16"],
    ["quant.compute_dtype=float16"],
])
def test_quant_variants(overrides):
    r = load_recipe(shipped_recipes()["llama7b-qlora-alpaca"], overrides).recipe
    check_quant(r.quant, bnb_config(r.quant))


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_quant_storage_under_a_sharded_launch(variable, monkeypatch):
    """Under FSDP or DeepSpeed the packed 4-bit blocks are stored in the compute dtype, so they shard with the rest."""
    monkeypatch.setenv(variable, "true")
    r = load_recipe(shipped_recipes()["llama3-8b-qlora-chat"], ["quant.compute_dtype=bfloat16"]).recipe
    assert bnb_config(r.quant).bnb_4bit_quant_storage == torch.bfloat16


@pytest.mark.parametrize("kind", ["dora", "rslora"])
def test_lora_variants_on_meta(kind, tmp_path):
    loaded = load_recipe(shipped_recipes()["mistral7b-qlora-alpaca"], [f"adapter.type={kind}", "adapter.r=64"])
    r = loaded.recipe
    check_adapter(r.adapter, adapter_config(r.adapter))
    check_model_on_meta(r, resolve_config(loaded))


@pytest.mark.parametrize("tied", [True, False])
def test_added_tokens_train_beside_the_adapter(tied):
    """A chat template's new tokens: their rows of the embedding (and of an untied output layer) train, no others."""
    r = _shipped("llama7b-qlora-sharegpt")
    config = adapter_config(r.adapter, [32000, 32001], tied_embeddings=tied)
    expected = {"embed_tokens": [32000, 32001]} if tied else {"embed_tokens": [32000, 32001], "lm_head": [32000, 32001]}
    assert config.trainable_token_indices == expected
    assert (config.r, config.lora_alpha) == (r.adapter.r, r.adapter.alpha)


# ------------------------------------------------------------------------------------------------ the tiny variants


def _tests_module(name: str):
    """A test module that defines tiny variants, imported when a tiny-variant test runs (not at collection, so that
    a problem there fails those tests only)."""
    return importlib.import_module(f"tests.{name}")


def _text_sources(folder) -> dict[str, str]:
    """A real sample file per fine-tuning format; messages: the ShareGPT sample's first chat as role/content."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    chat = json.loads((SAMPLE_DATA / "sharegpt_dummy_conversation.json").read_text())[0]
    (folder / "messages.jsonl").write_text(json.dumps(
        {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in chat["conversations"]]}) + "\n")
    return {"alpaca": str(SAMPLE_DATA / "identity.json"), "sharegpt": str(SAMPLE_DATA / "sharegpt_dummy_conversation.json"),
            "messages": str(folder / "messages.jsonl"), "preference": str(SAMPLE_DATA / "dpo_en_demo.json")}


@pytest.mark.skipif(not SAMPLE_DATA.is_dir(), reason=f"no sample data at {SAMPLE_DATA} (set HF_VRAM_SAMPLE_DATA)")
@pytest.mark.parametrize("name", names(lambda r: r.task in ("sft", "dpo") and on_the_hub(r)))
def test_tiny_fine_tuning_variant_translates(name, tiny_base, tokenizer, tmp_path):
    family = _tests_module("test_recipe_family")
    if name not in family.SFT_RECIPES and _shipped(name).task != "dpo":
        pytest.skip(f"tests/test_recipe_family.py defines no tiny variant of {name}")
    loaded = family.tiny_variant(name, tiny_base, _text_sources(tmp_path)[_shipped(name).data.format], tmp_path / "out")
    assert loaded.recipe.model.name_or_path == str(tiny_base)
    check_recipe(loaded, tmp_path, tokenizer)


@pytest.mark.parametrize("name", names(lambda r: r.task == "pretrain"))
def test_tiny_pretrain_variant_translates(name, tokenizer, tmp_path):
    families = _tests_module("test_pretrain_families")
    if name not in families.TINY:
        pytest.skip(f"tests/test_pretrain_families.py defines no tiny variant of {name}")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in families.english_documents(4)))
    loaded = families.tiny_pretrain(name, corpus, tmp_path / "out")
    check_config_fields(resolve_config(loaded), families.TINY[name]["config"])
    check_recipe(loaded, tmp_path, tokenizer)


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    """A local VAE folder for the tiny diffusion variants (its config: only the latent shape is read here)."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae")
    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                  sample_size=16).save_config(folder)
    return str(folder)


@pytest.mark.parametrize("name", names(lambda r: r.task == "diffusion"))
def test_tiny_diffusion_variant_translates(name, tiny_vae_folder, tmp_path):
    recipes = _tests_module("test_diffusion_recipes")
    loaded = recipes.tiny_diffusion(name, tmp_path / "out", tiny_vae_folder)
    assert loaded.recipe.model.config == recipes.TINY[loaded.recipe.model.arch]
    check_recipe(loaded, tmp_path)
