"""The model card of a language-model output: a fine-tune (adapter or full) or a model trained from scratch."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_vram.output.cards.common import duration_text, hub_id, num, peak_memory_text, table
from hf_vram.output.summary import LM_EVAL_AFTER, LM_EVAL_BEFORE, score_metrics, score_stderr
from hf_vram.recipe.load import LoadedRecipe

# Tags per adapter type; the LoRA variants keep `lora` so that the Hub's LoRA filters find them.
_ADAPTER_TAGS = {
    "lora": ["lora"],
    "dora": ["lora", "dora"],
    "rslora": ["lora", "rslora"],
    "llama-adapter": ["llama-adapter"],
}
_ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA"}


def _tags(loaded: LoadedRecipe) -> list[str]:
    r = loaded.recipe
    tags = ["hf-vram", loaded.name, "trl", "text-generation"]
    if r.adapter.type != "none":
        tags += ["peft", *_ADAPTER_TAGS[r.adapter.type]]
    if r.quant.bits:
        tags += ["bitsandbytes", f"{r.quant.bits}-bit"]
        if r.quant.bits == 4 and r.adapter.type in ("lora", "dora", "rslora"):
            tags.append("qlora")
    if r.task in ("dpo", "orpo", "simpo", "kto", "grpo"):
        tags.append(r.task)
    elif r.data.format != "text":
        tags.append("sft")
    return list(dict.fromkeys(tags))


def _what(loaded: LoadedRecipe) -> str:
    r = loaded.recipe
    base = f"`{r.model.name_or_path}`"
    if r.quant.bits == 4:
        base += f" loaded in 4-bit {r.quant.type}" + (" with double quantization" if r.quant.double_quant else "")
    elif r.quant.bits == 8:
        base += " loaded in 8-bit (LLM.int8)"
    kind = r.adapter.type
    if kind == "llama-adapter":
        what = (
            f"a Llama-Adapter (learned prompts of {r.adapter.prompt_length} tokens in the top "
            f"{r.adapter.prompt_layers} layers) on {base}"
        )
    elif kind != "none":
        what = f"a {_ADAPTER_NAMES[kind]} adapter (r={r.adapter.r}, alpha={r.adapter.alpha}) on {base}"
    elif r.model.arch:
        what = f"a `{r.model.arch}` model trained from scratch"
    else:
        what = f"a full fine-tune of {base}"
    return what + _tuned_by(r)


def _tuned_by(r) -> str:
    """The preference objective, with the settings that define it."""
    if r.task == "dpo":
        return f", tuned by DPO on preference pairs (beta={r.dpo.beta}, loss {r.dpo.loss_type})"
    if r.task == "orpo":
        return f", tuned by ORPO on preference pairs (odds-ratio weight beta={r.orpo.beta}, no reference model)"
    if r.task == "simpo":
        s = r.simpo
        return (f", tuned by SimPO on preference pairs (beta={s.beta}, target margin gamma={s.gamma}, "
                f"cpo_alpha={s.cpo_alpha}, no reference model)")
    if r.task == "kto":
        k = r.kto
        return (f", tuned by KTO on answers judged desirable or undesirable (beta={k.beta}, weights "
                f"{k.desirable_weight} desirable / {k.undesirable_weight} undesirable)")
    if r.task == "grpo":
        g = r.grpo
        rewards = ", ".join(f"{x.builtin or x.function} x {x.weight}" for x in g.rewards)
        start = f", starting from the adapter of `{g.init_adapter}`" if g.init_adapter else ""
        return (f", tuned by GRPO on sampled answers ({g.num_generations} per prompt, rewards {rewards}, "
                f"beta={g.beta}, loss {g.loss_type}){start}")
    return ""


def _training_rows(loaded: LoadedRecipe, summary: dict) -> list[tuple[str, object]]:
    return [*_setup_rows(loaded, summary), *_result_rows(summary)]


def _setup_rows(loaded: LoadedRecipe, s: dict) -> list[tuple[str, object]]:
    """What was trained, on what, how."""
    r = loaded.recipe
    rows: list[tuple[str, object]] = [
        ("recipe", f"`{s.get('recipe', loaded.name)}` (task {r.task})"),
        ("data", _data_text(r.data, s)),
    ]
    if "samples" in s:
        rows.append(("training samples", s["samples"]))
    if "global_step" in s:
        rows.append(("optimizer steps", s["global_step"]))
    rows.append(
        ("global batch", f"{r.train.micro_batch_size} x {r.train.grad_accum} x {s.get('world_size', 1)} process(es)")
    )
    return rows + [("learning rate", f"{r.train.lr} ({r.train.lr_scheduler})"), ("optimizer", r.train.optimizer)]


def _data_text(d, s: dict) -> str:
    """The data row: the source and its format, or each source of a mixture with its format, weight and the
    training samples it gave (train_summary.json's data counts)."""
    layout = f"max length {d.max_length}, packing {d.packing}"
    if not d.sources:
        return f"`{d.source}` ({d.format}, {layout})"
    # In the order of data.sources (one source may appear twice, with two splits).
    counts = s.get("data", {}).get("sources", [])
    parts = []
    for i, e in enumerate(d.sources):
        c = counts[i] if i < len(counts) else None
        given = f", {c['train']:,} training / {c['eval']:,} held-out samples" if c else ""
        parts.append(f"`{e.source}` ({e.format}{', weight ' + num(e.weight) if e.weight else ''}{given})")
    how = f"interleaved by weight ({d.mix_stopping})" if d.sources[0].weight else "concatenated"
    return f"a mixture, {how}, {layout}: " + "; ".join(parts)


# Summary values shown as they are: (key, row name).
_PLAIN_ROWS = (("first_loss", "first training loss"), ("final_loss", "final training loss"),
               ("eval_loss", "held-out loss"), ("eval_perplexity", "held-out perplexity"))


def _result_rows(s: dict) -> list[tuple[str, object]]:
    """What the run measured."""
    rows: list[tuple[str, object]] = [(name, num(s[key])) for key, name in _PLAIN_ROWS if s.get(key) is not None]
    if s.get("final_reward_margin") is not None:
        start = f"{num(s['first_reward_margin'])} -> " if s.get("first_reward_margin") is not None else ""
        sides = "desirable - undesirable" if s.get("task") == "kto" else "chosen - rejected"
        rows.append((f"{s.get('task', 'dpo').upper()} reward margin ({sides})", start + num(s["final_reward_margin"])))
    if s.get("final_kl") is not None:
        start = f"{num(s['first_kl'])} -> " if s.get("first_kl") is not None else ""
        rows.append(("KTO KL estimate (policy vs reference)", start + num(s["final_kl"])))
    # GRPO's mean sampled reward, in all and per reward function (hf_vram/runners/grpo.py's task_metrics).
    grpo = s.get("task") == "grpo"
    for key in sorted(k for k in s if grpo and k.startswith("final_reward")):
        first = s.get("first" + key.removeprefix("final"))
        name = key.removeprefix("final_reward").lstrip("_") or "total"
        rows.append((f"GRPO mean reward ({name})", (f"{num(first)} -> " if first is not None else "") + num(s[key])))
    if s.get("eval_rewards/accuracies") is not None:
        rows.append(("held-out preference accuracy", f"{s['eval_rewards/accuracies']:.1%}"))
    if "trainable_params" in s and "total_params" in s:
        rows.append(("trainable / total parameters", f"{s['trainable_params']:,} / {s['total_params']:,}"))
    if (memory := peak_memory_text(s)) is not None:
        rows.append(("peak memory", memory))
    if s.get("train_seconds") is not None:
        rows.append(("training time", duration_text(s["train_seconds"]) + f" on {s.get('world_size', 1)} process(es)"))
    return rows


LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def _eval_results(summary: dict) -> list[EvalResult]:
    """The model-index of the card (the Hub's evaluation results): the trained model's lm-eval scores."""
    results = []
    for task, entry in (summary.get(LM_EVAL_AFTER) or {}).items():
        dataset = entry.get("dataset") or ""
        # A Hub dataset by its id, hf-vram's generated data by its source (builtin:arithmetic), else the task.
        dataset_type = hub_id(dataset) or (dataset if dataset.startswith("builtin:") else task)
        for metric in score_metrics(entry):
            name, _, where = metric.partition(",")
            results.append(EvalResult(
                task_type="text-generation", task_name=task, dataset_type=dataset_type, dataset_name=task,
                dataset_split=entry.get("split"), metric_type=name, metric_value=entry[metric],
                metric_name=f"{name} ({where})" if where else name,
                source_name="lm-evaluation-harness", source_url=LM_EVAL_URL))
    return results


def _evaluation(summary: dict) -> str:
    """The card's Evaluation section: the held-out score of the run, and lm-eval's scores (before and after
    training when both were measured); empty when nothing was evaluated."""
    parts = []
    if "score_before" in summary and "score_after" in summary:
        b, a = summary["score_before"], summary["score_after"]
        parts.append(f"Held-out exact match: {b['accuracy']:.1%} before training, {a['accuracy']:.1%} after "
                     f"({a['correct']}/{a['total']}).")
    after, before = summary.get(LM_EVAL_AFTER) or {}, summary.get(LM_EVAL_BEFORE) or {}
    if after:
        head = "| task | metric | before training | after training |" if before else "| task | metric | value |"
        rows = [head, "|---" * head.count(" | ") + "|---|"]
        for task, entry in after.items():
            for metric in score_metrics(entry):
                cells = [task, metric, *([_score_text(before.get(task, {}), metric)] if before else []),
                         _score_text(entry, metric)]
                rows.append("| " + " | ".join(cells) + " |")
        parts.append(f"[lm-evaluation-harness]({LM_EVAL_URL}) tasks (the recipe's `eval.tasks`; `hf-vram eval` runs "
                     "them on a saved output):\n\n" + "\n".join(rows))
    return "\n## Evaluation\n\n" + "\n\n".join(parts) + "\n" if parts else ""


def _score_text(entry: dict, metric: str) -> str:
    if metric not in entry:
        return "-"
    stderr = score_stderr(entry, metric)
    n = f" ({entry['samples']} samples)" if entry.get("samples") else ""
    return num(entry[metric]) + (f" ± {num(stderr)}" if stderr is not None else "") + n


def _usage(loaded: LoadedRecipe, model_ref: str, prompt: str) -> str:
    """Python that loads the output and generates, with the prompt laid out as in training."""
    from data_prep.formats import CHAT_FORMATS, alpaca_prompt

    r = loaded.recipe
    head = f"model_id = {json.dumps(model_ref)}\n"
    if r.adapter.type == "llama-adapter" or (r.adapter.type != "none" and r.data.chat_template == "chatml"):
        # transformers' own adapter loading does not take adaption prompts, nor resize a base for added tokens.
        head += (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer, pipeline\n\n"
            'pipe = pipeline("text-generation", model=AutoPeftModelForCausalLM.from_pretrained(model_id), '
            "tokenizer=AutoTokenizer.from_pretrained(model_id))\n"
        )
    else:
        # tokenizer= as well: for an adapter, transformers would take the base's tokenizer, which may lack the
        # chat template the adapter was trained with.
        remote = ", trust_remote_code=True" if _remote_code(loaded) else ""
        head += f'from transformers import pipeline\n\npipe = pipeline("text-generation", model=model_id, tokenizer=model_id{remote})\n'
    n = r.eval.max_new_tokens
    if r.data.format in (*CHAT_FORMATS, "preference", "unpaired"):
        # The chat template the model was trained with is saved with its tokenizer.
        return head + (
            f'messages = [{{"role": "user", "content": {json.dumps(prompt)}}}]\n'
            f'print(pipe(messages, max_new_tokens={n})[0]["generated_text"][-1]["content"])'
        )
    if r.data.format == "alpaca":
        prompt = alpaca_prompt(prompt, "", r.data.template)
    return head + f'print(pipe({json.dumps(prompt)}, max_new_tokens={n}, return_full_text=False)[0]["generated_text"])'


def _remote_code(loaded: LoadedRecipe) -> bool:
    """Whether the model loads from code saved beside its weights (RetNet, which transformers does not ship): its
    config, or its base's, has an auto_map."""
    if loaded.recipe.model.arch == "retnet":
        return True
    for folder in (loaded.output_dir, Path(loaded.recipe.model.name_or_path or "")):
        config = folder / "config.json"
        if folder.parts and config.is_file() and "auto_map" in json.loads(config.read_text()):
            return True
    return False


def _other_ways(loaded: LoadedRecipe, model_ref: str) -> str:
    """The other ways the output loads: peft for an adapter, transformers' model class, and the hf-vram commands
    that make a merged model or GGUF files for llama.cpp and Ollama. Each block names the model in its own
    `model_id = ...` line, which `hf-vram push` rewrites when it pushes to another repository."""
    remote = ", trust_remote_code=True" if _remote_code(loaded) else ""
    ref = json.dumps(model_ref)
    if loaded.recipe.adapter.type != "none":
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f"model_id = {ref}\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(model_id)  # the adapter on its base, still separate\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_id)"
        )
        what = "With peft, the adapter loaded on its base (to train it further, or to switch adapters):"
        merged = (
            f"As one model: `hf-vram merge {loaded.output_dir}` folds the adapter into its base (reloaded unquantized)"
            " and saves a plain transformers model. "
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model_id = {ref}\n"
            f"model = AutoModelForCausalLM.from_pretrained(model_id{remote})\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_id)"
        )
        what, merged = "With transformers' model class:", ""
    from hf_vram.export.families import FAMILIES

    arch = loaded.recipe.model.arch
    gguf = (
        f"`hf-vram export` has no GGUF form for a {arch} model (it writes {', '.join(FAMILIES)})."
        if _remote_code(loaded) or (arch and arch not in FAMILIES) else
        f"For llama.cpp and Ollama: `hf-vram export {loaded.output_dir} --gguf q8_0` (or f16, q4_k_m, ...) writes "
        "GGUF files and an Ollama Modelfile into `gguf/`, and describes them in this card."
    )
    return f"\n{what}\n\n```python\n{code}\n```\n\n{merged}{gguf}\n"


def lm_card(loaded: LoadedRecipe, summary: dict) -> str:
    r = loaded.recipe
    adapter = r.adapter.type != "none"
    base = hub_id(r.model.name_or_path)
    # Every Hub dataset trained on (a mixture's local and builtin sources have no Hub id).
    datasets = [i for i in dict.fromkeys(hub_id(e.source) for e in r.data.sources or [r.data]) if i]
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        base_model=base,
        # Lets the Hub list this model under its base as an adapter or a fine-tune.
        base_model_relation=("adapter" if adapter else "finetune") if base else None,
        datasets=datasets or None,
        tags=_tags(loaded),
        # The model-index (the Hub's evaluation results) needs the model's name.
        model_name=loaded.name if _eval_results(summary) else None,
        eval_results=_eval_results(summary) or None,
    )
    model_ref = r.hub.repo_id or str(loaded.output_dir)
    prompt = r.eval.sample_prompts[0] if r.eval.sample_prompts else "Hello"
    base_note = ""
    if adapter and r.model.name_or_path and not base:
        base_note = (
            f"\nThe adapter's base is `{r.model.name_or_path}`, which is not a Hub model: `adapter_config.json` "
            "names it as `base_model_name_or_path`, and loading needs that base at that path.\n"
        )
    rows = table(_training_rows(loaded, summary))
    scores = _evaluation(summary)
    text = f"""---
{data.to_yaml()}
---

# {loaded.name}

{r.description}

This is {_what(loaded)}. It was trained with hf-vram from the recipe `{loaded.name}` (the resolved recipe is
`recipe.yaml`).

## Use

```python
{_usage(loaded, model_ref, prompt)}
```
{_other_ways(loaded, model_ref)}{base_note}
## Training

{rows}
{scores}"""
    # Through ModelCard, which renders the metadata as the Hub reads it.
    return str(ModelCard(text))
