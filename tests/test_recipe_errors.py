"""A bad recipe gets one clear message (file, line, key path, what was expected, did-you-mean) and exit 2."""

from __future__ import annotations

import pytest

from hf_vram.cli import main
from hf_vram.errors import RecipeError, UserError
from hf_vram.recipe.load import load_recipe

from .conftest import run_cli, scratch_recipe, write_recipe


@pytest.fixture
def good(tmp_path):
    return scratch_recipe(tmp_path / "out")


def _error(tmp_path, data, *overrides) -> str:
    path = write_recipe(tmp_path, "bad", data)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path), overrides)
    return str(e.value)


def test_unknown_key_names_file_line_path_and_suggestion(tmp_path, good):
    good["train"]["lrr"] = 1e-4
    msg = _error(tmp_path, good)
    assert "bad.yaml:" in msg and "train.lrr: unknown key" in msg
    assert "did you mean 'lr'?" in msg
    assert "valid keys here:" in msg


def test_unknown_section_gets_did_you_mean(tmp_path, good):
    good["adaptor"] = {"type": "lora"}
    msg = _error(tmp_path, good)
    assert "adaptor: unknown key (did you mean 'adapter'?)" in msg


def test_wrong_type_says_what_was_expected(tmp_path, good):
    good["train"]["micro_batch_size"] = "four"
    msg = _error(tmp_path, good)
    assert "train.micro_batch_size" in msg and "valid integer" in msg and "'four'" in msg


def test_bad_choice_lists_options_with_did_you_mean(tmp_path, good):
    good["quant"] = {"type": "nf5"}
    msg = _error(tmp_path, good)
    assert "quant.type: got 'nf5', expected one of 'nf4' or 'fp4' (did you mean 'nf4'?)" in msg


def test_out_of_range_value(tmp_path, good):
    good["train"]["lr"] = -1
    assert "train.lr: Input should be greater than 0" in _error(tmp_path, good)


def test_values_checked_before_anything_is_built(tmp_path, good):
    msg = _error(tmp_path, good, "hub.repo_id=notarepo", "dpo.loss_type=sigmod", "data.chat_template=chatlm")
    assert "hub.repo_id: got 'notarepo', expected owner/name (e.g. my-user/my-model)" in msg
    assert "dpo.loss_type: got 'sigmod', expected one of" in msg and "(did you mean 'sigmoid'?)" in msg
    assert "data.chat_template: got 'chatlm', expected auto, plain, chatml, or a Jinja chat template" in msg


def test_missing_data_file(tmp_path, good):
    good["data"]["source"] = str(tmp_path / "nope.jsonl")
    msg = _error(tmp_path, good)
    assert "data.source: file" in msg and "nope.jsonl' does not exist" in msg


def test_unknown_model_config_field_is_an_error(tmp_path, good):
    good["model"]["config"]["num_hiden_layers"] = 3
    msg = _error(tmp_path, good)
    assert "model.config.num_hiden_layers: not a field of LlamaConfig (did you mean 'num_hidden_layers'?)" in msg


def test_unknown_architecture(tmp_path, good):
    good["model"]["arch"] = "lama"
    assert "model.arch: unknown model type 'lama' (did you mean 'llama'?)" in _error(tmp_path, good)


def test_inconsistent_sections(tmp_path, good):
    good["model"] = {"name_or_path": "some/model"}
    good["tokenizer"] = {}
    good["quant"] = {"bits": 4}
    assert "a quantized base cannot be trained in full" in _error(tmp_path, good)


def test_missing_required_section(tmp_path, good):
    del good["data"]
    assert "data: task sft needs a data section (data.source at least)" in _error(tmp_path, good)


def test_unknown_recipe_name_suggests_a_shipped_one():
    with pytest.raises(UserError, match="did you mean 'demo-base'"):
        load_recipe("demo-bse")


def test_override_typo_is_reported_as_command_line(tmp_path, good):
    path = write_recipe(tmp_path, "ok", good)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path), ["train.max_step=5"])
    assert "command line: train.max_step: unknown key (did you mean 'max_steps'?)" in str(e.value)


def test_overrides_and_extends_merge(tmp_path, good):
    write_recipe(tmp_path, "parent", good)
    child = write_recipe(tmp_path, "child", {"extends": "parent", "train": {"lr": 5e-4}, "description": "child"})
    loaded = load_recipe(str(child), ["train.max_steps=7", "data.max_length=32", "train.report_to=[]"])
    r = loaded.recipe
    assert (r.train.lr, r.train.max_steps, r.data.max_length, r.train.report_to) == (5e-4, 7, 32, [])
    assert r.model.config["hidden_size"] == 64  # inherited from the parent
    assert loaded.name == "child" and "lr: 0.0005" in loaded.resolved_yaml()


def test_extends_cycle(tmp_path, good):
    write_recipe(tmp_path, "a", {"extends": "b", **good})
    write_recipe(tmp_path, "b", {"extends": "a"})
    with pytest.raises(RecipeError, match="extends: cycle"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_yaml_scientific_notation_reads_as_number(tmp_path, good):
    path = tmp_path / "sci.yaml"
    path.write_text(write_recipe(tmp_path, "x", good).read_text().replace("lr: 0.003", "lr: 3e-3"))
    assert load_recipe(str(path)).recipe.train.lr == 3e-3


def test_validate_exits_2_with_message_on_stderr(tmp_path, good, capsys):
    good["train"]["optimizer"] = "adamw_8bitt"
    path = write_recipe(tmp_path, "bad", good)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"invalid recipe {path}" in err and "did you mean 'adamw_8bit'?" in err


def test_cli_process_exit_code_is_2_for_train_and_validate(tmp_path, good):
    good["data"]["formt"] = "text"
    path = write_recipe(tmp_path, "bad", good)
    for cmd in ("validate", "train"):
        proc = run_cli(cmd, str(path))
        assert proc.returncode == 2, proc.stderr
        assert "data.formt: unknown key (did you mean 'format'?)" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_child_recipe_can_remove_inherited_keys_and_writes_its_own_output(tmp_path, good):
    write_recipe(tmp_path, "parent", good)  # good has train.output_dir set
    child = write_recipe(tmp_path, "child", {
        "extends": "parent",
        "model": {"arch": None, "config": None, "name_or_path": "some-org/some-model"},
        "tokenizer": {"train": None},
    })
    loaded = load_recipe(str(child))
    assert loaded.recipe.model.name_or_path == "some-org/some-model" and loaded.recipe.model.arch is None
    assert loaded.output_dir.name == "child"  # not the parent's output directory


def test_legacy_config_keys_are_accepted(tmp_path, good):
    good["model"]["config"]["rope_theta"] = 50000.0
    assert load_recipe(str(write_recipe(tmp_path, "rope", good))).recipe.model.config["rope_theta"] == 50000.0


def test_malformed_yaml_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {arch: llama\ndata: [")
    assert main(["validate", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cross_section_errors_name_the_key_and_where_it_was_set(tmp_path, good):
    path = write_recipe(tmp_path, "x", good)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path), ["quant.bits=4"])
    assert str(e.value).endswith("command line: quant.bits: a quantized base cannot be trained in full: "
                                 "set adapter.type: lora (QLoRA)")
