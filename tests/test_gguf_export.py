"""hf-vram export --gguf: every supported family written as GGUF and read back by transformers (`gguf_file=`), a
trained QLoRA output exported through the CLI (merged first) with its Modelfile and card section, and the refusals.

Tolerances are on the largest |logit difference| against the model in float32, over every position of a batch of
prompts, on these width-64 random models whose logits reach about 0.6. Measured: f32 0 (the same values), f16
3e-4 to 6e-4 by family, bf16 2.5e-3, q8_0 7e-3; each tolerance is about 5x the measured figure.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_vram.errors import UserError
from hf_vram.export.gguf_file import llama3_rope_factors, write_gguf
from hf_vram.export.modelfile import chat_template_as_go
from hf_vram.export.quantize import check_kinds, llama_cpp_available

from .conftest import run_cli, write_recipe
from .test_train_qlora import qlora_recipe

TOL = {"f32": 1e-5, "f16": 3e-3, "bf16": 1.5e-2, "q8_0": 4e-2}
PROMPTS = ["3 + 4 = 7. What is 2 + 6?", "9 + 0 is"]
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 128}
FAMILIES = {
    # grouped-query attention, so the k rows are permuted with their own head count
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": (MistralConfig, MistralForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    # head_dim 128, as every Qwen3 has: transformers (5.24) reads a qwen3 file back without its key_length and takes
    # Qwen3Config's default; llama.cpp reads the key_length the export writes.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                                 "sliding_window": 64}),
}


def _tiny(family: str, folder, tiny_base):
    config_class, model_class, extra = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=family != "llama", **SHAPE, **extra)
    model = model_class(config)
    with torch.no_grad():  # norms away from their initial ones, so that an offset or a missed norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.5 if family == "gemma2" else 1.0, 0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model.eval(), tok


def _max_diff(model, loaded, tok) -> float:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**enc).logits
        b = loaded(**enc).logits
    keep = enc.attention_mask.bool()
    return float((a - b).abs()[keep].max())


def _load_gguf(path):
    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_reads_back_in_transformers(tmp_path, tiny_base, family):
    model, tok = _tiny(family, tmp_path / "model", tiny_base)
    written = write_gguf(tmp_path / "model", tmp_path / f"{family}.gguf", "f16")
    loaded, gguf_tok = _load_gguf(written.path)
    assert type(loaded).__name__ == type(model).__name__ or family == "mistral"  # a llama-arch file reads as Llama
    assert written.types == {"F16": 2 + 7 * 2 - (family != "llama"), "F32": 1 + 2 * 2 + (2 * 2 if family == "gemma2" else 0)
                             + (3 * 2 if family == "qwen2" else 0) + (2 * 2 if family == "qwen3" else 0)}
    for p in PROMPTS:
        assert gguf_tok(p)["input_ids"] == tok(p)["input_ids"]
    assert _max_diff(model, loaded, tok) < TOL["f16"]


def _sentencepiece_style(folder):
    """A tiny tokenizer laid out as transformers saves Llama 2's and Mistral 7B's: BPE with byte fallback, <unk> <s>
    </s>, the 256 byte pieces, then the pieces in merge order, spaces as "▁"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.llama.tokenization_llama import LlamaTokenizer

    from data_prep.builtin import BUILTIN_SOURCES

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    texts = [r["text"] for r in BUILTIN_SOURCES["arithmetic"].records("text")[:500]]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]])
    tok.pad_token = tok.unk_token  # as Llama 2 fine-tunes commonly set it
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, **SHAPE, num_attention_heads=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


SPM_TEXTS = ["What is 2 + 6?", "3 + 4 = 7.\n\nWhat  is 9+0? \u00e9 \u00fc \u5b57", "Hello world"]


def test_a_sentencepiece_vocabulary_reads_back_with_its_scores(tmp_path):
    model, tok = _sentencepiece_style(tmp_path / "spm")
    written = write_gguf(tmp_path / "spm", tmp_path / "spm.gguf", "f16")
    loaded, gguf_tok = _load_gguf(written.path)
    for text in SPM_TEXTS:  # byte fallback for the characters the pieces lack
        assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert _max_diff(model, loaded, tok) < TOL["f16"]
    if not llama_cpp_available():
        return
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(written.path), vocab_only=True, verbose=False)
    try:
        for text in SPM_TEXTS:  # llama.cpp's own SentencePiece merges, by the scores written
            assert vocab.tokenize(text.encode(), add_bos=False) == tok(text)["input_ids"], text
        # Where they part: a text that starts with a space gets one more "▁" in llama.cpp (as in sentencepiece
        # itself), none in transformers' Metaspace, which sees the space as the prefix already.
        assert vocab.tokenize(b" 3", add_bos=False) == [tok.convert_tokens_to_ids("\u2581")] + tok(" 3")["input_ids"]
    finally:
        vocab.close()


def test_the_older_sentencepiece_layout_is_read_as_sentencepiece(tmp_path):
    """Llama 2's tokenizer.json as transformers 4.3x wrote it: the "▁" marker from the normalizer (Prepend, Replace),
    no pre-tokenizer. The file gets the same tokens, scores and space prefix as from today's Metaspace layout."""
    import gguf

    _sentencepiece_style(tmp_path / "spm")
    path = tmp_path / "spm" / "tokenizer.json"
    current = json.loads(path.read_text())
    older = dict(current, pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]})
    fields = []
    for layout, name in ((current, "a.gguf"), (older, "b.gguf")):
        path.write_text(json.dumps(layout))  # json's default ASCII escapes, as transformers writes the file
        reader = gguf.GGUFReader(write_gguf(tmp_path / "spm", tmp_path / name, "f16").path)
        fields.append({k: reader.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens",
                       "tokenizer.ggml.scores", "tokenizer.ggml.add_space_prefix")})
    assert fields[0] == fields[1] and fields[0]["tokenizer.ggml.model"] == "llama"


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0"])
def test_each_written_type_reads_back_within_its_tolerance(tmp_path, tiny_base, kind):
    model, tok = _tiny("llama", tmp_path / "model", tiny_base)
    written = write_gguf(tmp_path / "model", tmp_path / f"m-{kind}.gguf", kind)
    matrices = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0"}[kind]
    assert written.types.get(matrices) == 16 if kind != "f32" else written.types == {"F32": 21}
    loaded, _ = _load_gguf(written.path)
    assert _max_diff(model, loaded, tok) < TOL[kind]


def test_llama3_rope_factors_are_transformers_frequency_scaling():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = llama3_rope_factors(config.to_dict())
    # llama.cpp divides each frequency by its factor: plain / factor must be what transformers rotates by.
    torch.testing.assert_close(plain / torch.from_numpy(factors).double(), scaled.double(), rtol=1e-5, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0


def _render_go(template: str, system: str, prompt: str, response: str) -> str:
    """Ollama's evaluation of the Go template forms the Modelfile uses: if/else/end on .System, the three values,
    and printed string literals."""
    template = template.replace('{{ "{{" }}', "\x01")
    if_block = re.compile(r"\{\{ if \.System \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}", re.S)
    template = if_block.sub(lambda m: m.group(1) if system else m.group(2), template)
    for name, value in (("System", system), ("Prompt", prompt), ("Response", response)):
        template = template.replace(f"{{{{ .{name} }}}}", value)
    assert "{{" not in template, template
    return template.replace("\x01", "{{")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a {{ '{{' }}helper}}.<|im_end|>\n"
                  "{% endif %}" + CHATML)
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}")


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM, NO_SYSTEM], ids=["chatml", "default-system", "no-system"])
def test_modelfile_template_renders_what_the_chat_template_renders(tiny_base, template):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = template
    go = chat_template_as_go(tok)
    for system in ([None] if template is NO_SYSTEM else [None, "Be brief."]):
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
        assert _render_go(go, system or "", "What is 2 + 2?", "4") == tok.apply_chat_template(messages, tokenize=False)


def test_modelfile_without_a_template_and_with_a_long_context(tiny_base):
    from hf_vram.export.modelfile import MAX_NUM_CTX, modelfile_text

    text = modelfile_text("m.gguf", tiny_base, 131072)  # a base with no recipe and no chat template: plain text
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert text.splitlines()[1:] == ["FROM ./m.gguf", f"PARAMETER stop {json.dumps(tok.eos_token)}",
                                     f"PARAMETER num_ctx {MAX_NUM_CTX}"]


def _qlora_recipe(base, out) -> dict:
    recipe = qlora_recipe(base, out, max_steps=15, logging_steps=5)
    recipe["eval"] = {"score_samples": 0, "sample_prompts": ["What is 2 + 6?"], "max_new_tokens": 6}
    return recipe


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("gguf-qlora")
    out = folder / "out"
    run = run_cli("train", str(write_recipe(folder, "qlora", _qlora_recipe(tiny_base, out))))
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_a_trained_adapter_exports_with_a_modelfile_and_reads_back(trained_adapter, tiny_base):
    from peft import PeftModel

    run = run_cli("export", str(trained_adapter), "--gguf", "f16", "q8_0", "--check")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("round trip")]
    assert len(lines) == 2 and all("same answer: tokens equal" in line for line in lines), run.stdout
    folder = trained_adapter / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "out-f16.gguf", "out-q8_0.gguf"]
    assert not [p for p in trained_adapter.iterdir() if p.name.startswith(".gguf-")]  # the temporary merge is gone

    # Independently of the export's own check: the adapter on its fp32 base, as peft runs it, against the file.
    tok = AutoTokenizer.from_pretrained(trained_adapter)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                          trained_adapter).eval()
    loaded, _ = _load_gguf(folder / "out-f16.gguf")
    assert _max_diff(reference, loaded, tok) < TOL["f16"]
    prompt = tok("### Instruction:\nWhat is 2 + 6?\n\n### Response:\n", return_tensors="pt").input_ids
    greedy = [m.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist() for m in (reference, loaded)]
    assert greedy[0] == greedy[1]

    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./out-f16.gguf\n" in modelfile
    assert 'TEMPLATE """### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}"""' in modelfile
    assert f"PARAMETER stop {json.dumps(tok.eos_token)}" in modelfile and "PARAMETER num_ctx 128" in modelfile

    again = run_cli("export", str(trained_adapter), "--gguf", "f16")
    assert again.returncode == 0, again.stderr[-2000:]
    card = (trained_adapter / "README.md").read_text()
    assert card.count("## GGUF (llama.cpp, Ollama)") == 1 and "`gguf/out-f16.gguf`" in card
    assert "`gguf/out-q8_0.gguf`" not in card  # the section says what the last export wrote
    assert card.startswith("---")  # the card above the section is left as training wrote it
    # Every way the card says the output loads runs: pipeline, peft, and transformers on the GGUF file.
    blocks = [b.split("```")[0] for b in card.split("```python\n")[1:]]
    assert len(blocks) == 3 and "AutoPeftModelForCausalLM" in blocks[1] and "gguf_file=" in blocks[2]
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    # Why the card loads the GGUF from its own folder: transformers (5.24) sends an adapter folder to the base, also
    # with gguf_file. Once it stops doing so, the card can name the output's folder.
    with pytest.raises(OSError, match="does not appear to have a file named gguf/out-f16.gguf"):
        AutoModelForCausalLM.from_pretrained(trained_adapter, gguf_file="gguf/out-f16.gguf")


def test_merge_writes_gguf_beside_the_merged_model(trained_adapter, tmp_path):
    dest = tmp_path / "merged"
    bad = run_cli("merge", str(trained_adapter), "--out", str(dest), "--gguf", "q9")
    assert bad.returncode == 2 and "unknown GGUF type" in bad.stderr and not dest.exists()  # refused before merging
    run = run_cli("merge", str(trained_adapter), "--out", str(dest), "--gguf", "q8_0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (dest / "gguf" / "merged-q8_0.gguf").is_file() and (dest / "gguf" / "Modelfile").is_file()
    card = (dest / "README.md").read_text()
    assert "merged" in card.split("---")[1] and "`gguf/merged-q8_0.gguf`" in card  # the merge's card, plus its files
    model, tok = AutoModelForCausalLM.from_pretrained(dest).eval(), AutoTokenizer.from_pretrained(dest)
    loaded, _ = _load_gguf(dest / "gguf" / "merged-q8_0.gguf")
    assert _max_diff(model, loaded, tok) < TOL["q8_0"]


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (the llama-cpp extra) is not installed")
def test_llama_cpp_greedy_tokens_equal_transformers(trained_adapter):
    run = run_cli("export", str(trained_adapter), "--gguf", "f16", "q4_k_m", "--check")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("round trip")]
    assert len(lines) == 2 and all("llama.cpp" in line and "same answer" in line for line in lines), run.stdout


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (the llama-cpp extra) is not installed")
def test_k_quants_by_llama_cpp_read_back_weight_by_weight(tmp_path, tiny_base):
    """Rows of 256, so that llama.cpp writes real K-quant blocks (the demo's rows of 128 fall back to q5_0/q8_0):
    every weight transformers dequantizes from the file is the original within the format's rounding."""
    from hf_vram.export.export import write_folder

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    files, _ = write_folder(tmp_path / "model", tmp_path / "gguf", ["q6_k", "q4_k_m"], "m", tmp_path)
    assert files[0].types["Q6_K"] == 16 and files[1].types["Q4_K"] >= 12  # q4_k_m keeps some in Q6_K
    original = model.state_dict()
    # RMS error over RMS weight, per matrix, measured: Q6_K 0.018, Q4_K 0.072 (q4_k_m's Q6_K matrices 0.018)
    for written, bound in zip(files, (0.03, 0.1)):
        loaded, _ = _load_gguf(written.path)
        for name, w in loaded.state_dict().items():
            if w.ndim == 2:
                err = ((w - original[name]).pow(2).mean() / original[name].pow(2).mean()).sqrt()
                assert err < bound, (written.path.name, name, float(err))


def test_refusals_name_the_problem(tmp_path, tiny_base, monkeypatch):
    retnet = tmp_path / "retnet"
    retnet.mkdir()
    (retnet / "config.json").write_text(json.dumps({"model_type": "retnet"}))
    run = run_cli("export", str(retnet), "--gguf", "f16")
    assert run.returncode == 2 and "llama.cpp has no retention (RetNet) graph" in run.stderr
    assert "Traceback" not in run.stderr

    run = run_cli("export", str(retnet), "--gguf", "q4km")
    assert run.returncode == 2 and "unknown GGUF type" in run.stderr and "q4_k_m" in run.stderr

    run = run_cli("export", str(tmp_path / "missing"), "--gguf", "f16")
    assert run.returncode == 2 and "no such directory" in run.stderr

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed: import fails
    with pytest.raises(UserError, match=r"pip install 'hf-vram\[llama-cpp\]'"):
        check_kinds(["q4_k_m"])
    assert check_kinds(["F16", "q8_0", "f16"]) == ["f16", "q8_0"]

    model_dir = tmp_path / "spm"
    _tiny("llama", model_dir, tiny_base)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(UserError, match="not one llama.cpp names here"):
        write_gguf(model_dir, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))  # nothing half-written left
