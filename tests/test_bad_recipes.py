"""Bad recipe input exits 2 with a message naming the file (or command line), the key and the fix: never a
traceback, never a value silently accepted. Each case goes through the CLI or load_recipe."""

from __future__ import annotations

import math
import typing

import pytest
from pydantic import BaseModel, ValidationError

from hf_vram.cli import build_parser, main
from hf_vram.errors import RecipeError
from hf_vram.recipe import schema
from hf_vram.recipe.accelerate_config import is_accelerate_config
from hf_vram.recipe.load import load_recipe

from .conftest import scratch_recipe, write_recipe


@pytest.fixture
def good(tmp_path):
    return scratch_recipe(tmp_path / "out")


def _validate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["validate", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _load_error(path, *overrides) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path), overrides)
    return str(e.value)


# --- 1. encoding --------------------------------------------------------------------------------------------------

def test_file_that_is_not_utf8_names_line_offset_and_fix(tmp_path, capsys):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"# a recipe\ndescription: caf\xe9\n")  # Latin-1
    code, _, err = _validate(capsys, str(path))
    assert code == 2
    assert f"{path}:2:17: not UTF-8 text: byte 0xe9 at offset 27" in err
    assert "re-save the file as UTF-8" in err
    assert not is_accelerate_config(str(path))  # looked at first by validate: no UnicodeDecodeError there either


def test_utf8_text_is_read(tmp_path, good):
    good["description"] = "café, naïve, 日本語"
    assert load_recipe(str(write_recipe(tmp_path, "utf8", good))).recipe.description == "café, naïve, 日本語"


# --- 2. inf and nan -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_value", [".inf", "-.inf", ".nan", ".NaN", "+.Inf"])
def test_non_finite_float_in_the_file_is_refused(tmp_path, good, yaml_value):
    path = write_recipe(tmp_path, "bad", good)
    path.write_text(path.read_text().replace("lr: 0.003", f"lr: {yaml_value}"))
    msg = _load_error(path)
    assert f"{path}:" in msg and "train.lr: got" in msg and "expected a finite number (inf and nan are not allowed)" in msg


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.lr=-inf", "train.warmup=.inf",
                                      "adapter.dropout=nan", "train.max_grad_norm=Infinity", "dpo.beta=.inf"])
def test_non_finite_float_override_is_refused(tmp_path, good, override):
    key = override.partition("=")[0]
    msg = _load_error(write_recipe(tmp_path, "ok", good), override)
    assert f"command line: {key}: got" in msg and "finite number" in msg


def test_non_finite_float_in_model_config_is_refused(tmp_path, good):
    good["model"]["config"]["rope_scaling"] = {"rope_type": "linear", "factor": math.inf}
    path = write_recipe(tmp_path, "bad", good)
    assert f"{path}:" in (msg := _load_error(path))
    assert "model.config.rope_scaling.factor: not a finite number" in msg


def _section_classes() -> list[type[BaseModel]]:
    return [c for c in vars(schema).values() if isinstance(c, type) and issubclass(c, schema.Section)]


def _fields(kind) -> list[tuple[type[BaseModel], str]]:
    """(section, field) of every schema field whose type has `kind` among its members."""
    return [(cls, name) for cls in _section_classes() for name, f in cls.model_fields.items()
            if kind in schema._leaves(f.annotation)]


def test_schema_has_float_and_int_fields():
    assert len(_fields(float)) >= 10 and len(_fields(int)) >= 20


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "nan"])
def test_no_float_field_takes_inf_or_nan(value):
    for cls, name in _fields(float):
        section = cls.model_construct()
        with pytest.raises(ValidationError, match="finite number"):
            setattr(section, name, value)  # validate_assignment: the field's own validation


@pytest.mark.parametrize("value", [True, False])
def test_no_number_field_takes_a_boolean(value):
    number_fields = [(cls, name) for cls in _section_classes() for name, f in cls.model_fields.items()
                     if schema._number_not_bool(f.annotation)]
    assert {(c.__name__, n) for c, n in number_fields} >= {("AdapterSection", "r"), ("TrainSection", "lr"),
                                                             ("QuantSection", "bits"), ("ImageSection", "channels")}
    for cls, name in number_fields:
        section = cls.model_construct()
        with pytest.raises(ValidationError, match="a boolean where a number goes"):
            setattr(section, name, value)


def test_fields_that_take_booleans_still_do(tmp_path, good):
    r = load_recipe(str(write_recipe(tmp_path, "ok", good)),
                    ["train.fused_loss=false", "data.packing=true", "model.config.tie_word_embeddings=true"]).recipe
    assert r.train.fused_loss is False and r.data.packing is True and r.model.config["tie_word_embeddings"] is True


# --- 3. booleans as numbers ---------------------------------------------------------------------------------------

def test_boolean_rank_in_the_file_is_refused(tmp_path, good):
    good["adapter"] = {"type": "lora", "r": True}
    path = write_recipe(tmp_path, "bad", good)
    msg = _load_error(path)
    assert f"{path}:" in msg and "adapter.r: got true, a boolean where a number goes" in msg


@pytest.mark.parametrize("override", ["adapter.r=true", "train.lr=false", "train.micro_batch_size=yes"])
def test_boolean_override_is_refused(tmp_path, good, override):
    msg = _load_error(write_recipe(tmp_path, "ok", good), override)
    assert f"command line: {override.partition('=')[0]}: got" in msg and "a boolean where a number goes" in msg


def test_number_overrides_still_read_as_numbers(tmp_path, good):
    r = load_recipe(str(write_recipe(tmp_path, "ok", good)), ["adapter.r=8", "train.lr=1e-4", "train.epochs=2"]).recipe
    assert (r.adapter.r, r.train.lr, r.train.epochs) == (8, 1e-4, 2.0)


# --- 4. absurd sizes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "bound"), [
    ("adapter.r=1000000000000", "65536"),
    ("train.micro_batch_size=1000000000", "65536"),
    ("train.grad_accum=1000000000", "65536"),
    ("data.max_length=1000000000000000", "16777216"),
    ("eval.max_new_tokens=1000000000000", "16777216"),
    ("tokenizer.vocab_size=100000000000", "2097152"),
])
def test_absurd_sizes_are_refused_by_validate(capsys, override, bound):
    code, _, err = _validate(capsys, "demo-base", override)
    assert code == 2
    assert f"command line: {override.partition('=')[0]}: Input should be less than or equal to {bound}" in err


def test_rank_above_the_models_width_is_refused(capsys):
    code, _, err = _validate(capsys, "demo", "adapter.r=200")  # demo-base is 128 wide
    assert code == 2
    assert "command line: adapter.r: 200 is more than recipe:demo-base has room for (hidden_size is 128)" in err
    assert "set adapter.r <= 128" in err
    assert _validate(capsys, "demo", "adapter.r=128")[0] == 0


def test_rank_is_checked_against_the_narrowest_targeted_layer(capsys):
    # Llama-3-8B: 8 key/value heads of 128 make k_proj and v_proj 1,024 wide.
    code, _, err = _validate(capsys, "llama3-8b-qlora-chat", "adapter.r=2048")
    assert code == 2 and "(k_proj's smaller side is 1024)" in err and "set adapter.r <= 1024" in err
    assert _validate(capsys, "llama3-8b-qlora-chat", "adapter.r=2048", "adapter.target_modules=[q_proj]")[0] == 0


def test_sequence_past_a_learned_position_table_is_refused(capsys):
    code, _, err = _validate(capsys, "nanogpt-shakespeare-char", "data.max_length=512")
    assert code == 2
    assert ("command line: data.max_length: 512 tokens is more than the gpt2 built from model.config can read "
            "(n_positions 256: a learned position table); set data.max_length <= 256") in err


def test_sequence_past_a_rotary_models_context_is_a_note_only(capsys):
    code, out, err = _validate(capsys, "demo-base", "data.max_length=256")
    assert code == 0 and out.startswith("ok:")
    assert "note:" in err and "past model.config.max_position_embeddings 128" in err


def test_llama_adapter_layers_and_model_type_are_checked(capsys):
    code, _, err = _validate(capsys, "llama7b-llama-adapter-alpaca", "adapter.prompt_layers=40")
    assert code == 2 and "adapter.prompt_layers: 40 is more than the 32 layers of NousResearch/Llama-2-7b-hf" in err
    code, _, err = _validate(capsys, "qwen2.5-7b-qlora-chat", "adapter.type=llama-adapter")
    assert code == 2 and "Qwen/Qwen2.5-7B-Instruct is qwen2: use adapter.type: lora" in err


def test_adaption_prompt_types_match_peft():
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    from hf_vram.recipe.model_checks import ADAPTION_PROMPT_TYPES

    assert set(ADAPTION_PROMPT_TYPES) == set(TRANSFORMERS_MODEL_CONFIG)


def test_model_config_values_the_config_class_refuses(tmp_path, good, capsys):
    good["model"]["config"].update(hidden_size=64, num_attention_heads=3)
    path = write_recipe(tmp_path, "bad", good)
    code, _, err = _validate(capsys, str(path))
    assert code == 2
    assert "model.config: the llama config class refuses these values: The hidden size (64) is not a multiple" in err


def test_model_without_a_config_is_not_checked(tmp_path, good, capsys):
    # Offline (the tests set HF_HUB_OFFLINE) and not a known base: validate still answers, without the model checks.
    good["model"] = {"name_or_path": "some-org/unknown-model"}
    good["tokenizer"] = {}
    good["adapter"] = {"type": "lora", "r": 4096}
    assert _validate(capsys, str(write_recipe(tmp_path, "unknown", good)))[0] == 0


# --- 5. options and overrides in any order ------------------------------------------------------------------------

def test_plan_takes_an_override_after_an_option(capsys):
    assert main(["plan", "demo", "--gpu", "rtx4070", "train.micro_batch_size=2"]) == 0
    assert "micro-batch 2 x 64 tokens" in capsys.readouterr().out


def test_validate_takes_recipes_and_overrides_in_any_order(capsys):
    code, out, _ = _validate(capsys, "train.max_steps=3", "demo-base", "data.max_length=64", "demo")
    assert code == 0 and len(out.splitlines()) == 2


@pytest.mark.parametrize("argv", [
    ["train", "demo-base", "--nproc", "2", "train.max_steps=20"],
    ["train", "--nproc", "2", "demo-base", "train.max_steps=20"],
    ["train", "demo-base", "train.max_steps=20", "--nproc", "2"],
])
def test_train_options_and_overrides_parse_in_any_order(argv):
    args = build_parser().parse_args(argv)
    assert (args.command, args.recipe, args.nproc, args.overrides) == ("train", "demo-base", 2, ["train.max_steps=20"])


def test_overrides_keep_their_order_around_options():
    args = build_parser().parse_args(["plan", "demo", "a=1", "--fit", "a=2", "--gpu", "h100", "b=3"])
    assert (args.overrides, args.fit, args.gpu) == (["a=1", "a=2", "b=3"], True, ["h100"])  # --gpu repeats


def test_arguments_a_command_does_not_take_are_still_refused(capsys):
    for argv in (["recipes", "train.lr=1"], ["plan", "demo", "--bogus"], ["table", "extra"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


# --- 6. overrides and YAML structure ------------------------------------------------------------------------------

def test_override_without_a_key_path(capsys):
    code, _, err = _validate(capsys, "demo", "=3")
    assert code == 2 and "override '=3': no key path before '=': expected key.path=value" in err


def test_override_of_an_unknown_key_exits_2_with_did_you_mean(capsys):
    code, _, err = _validate(capsys, "demo", "train.micro_bach_size=2")
    assert code == 2 and "command line: train.micro_bach_size: unknown key (did you mean 'micro_batch_size'?)" in err


def test_override_indexes_into_a_list(capsys, tmp_path):
    loaded = load_recipe("moe-assemble-4x-tiny", ["moe.experts.1.source_model=recipe:demo-base"])
    assert loaded.recipe.moe.experts[1].source_model == "recipe:demo-base"
    code, _, err = _validate(capsys, "moe-assemble-4x-tiny", "moe.experts.9.source_model=x")
    assert code == 2 and "moe.experts is a list of 4 (indexes 0 to 3); give an index after it" in err


@pytest.mark.parametrize(("text", "kind"), [("- model\n- data\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_top_level_that_is_not_a_mapping(tmp_path, capsys, text, kind):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    code, _, err = _validate(capsys, str(path))
    assert code == 2 and f"{path}: the top level must be a mapping of sections (model, data, train, ...), not a {kind}" in err


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {arch: llama\ndata: [")
    code, _, err = _validate(capsys, str(path))
    assert code == 2
    assert f"{path}:2:5: not valid YAML: expected ',' or '}}', but got ':' (while parsing a flow mapping, from line 1)" in err


def test_duplicate_keys_are_refused_with_both_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  arch: llama\ntrain:\n  lr: 0.1\n  micro_batch_size: 2\n  lr: 0.2\nmodel: {}\n")
    code, _, err = _validate(capsys, str(path))
    assert code == 2
    assert f"{path}:6: train.lr: duplicate key (already set at line 4, column 3)" in err
    assert f"{path}:7: model: duplicate key (already set at line 1, column 1)" in err


def test_same_key_in_different_mappings_is_not_a_duplicate(tmp_path, good):
    good["eval"] = {"max_new_tokens": 8}
    good["data"]["max_length"] = 64  # max_length-like keys in sibling sections, lists of mappings
    good["train"]["report_to"] = []
    assert load_recipe(str(write_recipe(tmp_path, "ok", good))).recipe.eval.max_new_tokens == 8
    assert load_recipe("moe-assemble-4x-tiny").recipe.moe.experts  # source_model in every expert


def test_recursive_alias_is_an_error_not_a_hang(tmp_path, capsys):
    path = tmp_path / "alias.yaml"
    path.write_text("model: &m {arch: llama, config: *m}\n")
    code, _, err = _validate(capsys, str(path))
    assert code == 2 and "invalid recipe" in err


def test_schema_helpers_read_field_types():
    assert schema._leaves(typing.Literal[4, 8] | None) == [4, 8, type(None)]
    assert schema._number_not_bool(int) and schema._number_not_bool(typing.Literal[1, 3])
    assert not schema._number_not_bool(bool | typing.Literal["auto"]) and not schema._number_not_bool(str)
    assert not schema._number_not_bool(dict[str, typing.Any])
