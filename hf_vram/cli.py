"""The `hf-vram` command: subcommands only; each calls one function of the package.

Heavy libraries (torch, transformers, trl) are imported inside the subcommands that need them, so
`hf-vram recipes` and most of `hf-vram validate` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_vram.errors import TrainingStopped, UserError


def _cmd_recipes(args) -> int:
    import yaml

    from hf_vram.recipe.load import shipped_recipes

    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:<{width}}  {description}")
    return 0


def _validate_one(ref: str, overrides: list[str]) -> str:
    from hf_vram.recipe.accelerate_config import is_accelerate_config, validate_accelerate_config
    from hf_vram.recipe.load import load_recipe
    from hf_vram.recipe.model_checks import check_against_model
    from hf_vram.tasks import task_of

    if is_accelerate_config(ref):
        return validate_accelerate_config(ref)
    loaded = load_recipe(ref, overrides)
    task = task_of(loaded.recipe)
    if task.language_model:
        # Sizes the schema cannot judge alone: the LoRA rank and the sequence length against the model's config.
        check_against_model(loaded)
    return f"ok: {loaded.path} ({task.description(loaded)})"


def _cmd_validate(args) -> int:
    targets = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not targets:
        raise UserError("validate: name at least one recipe (a shipped name or a path)")
    paths: list[str] = []
    for t in targets:
        p = Path(t)
        paths += [str(f) for f in sorted(p.rglob("*.yaml"))] if p.is_dir() else [t]
    failures = []
    for ref in paths:
        try:
            print(_validate_one(ref, overrides))
        except UserError as e:
            failures.append(str(e))
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 2
    return 0


def _cmd_train(args) -> int:
    from hf_vram.recipe.load import load_recipe

    loaded = load_recipe(args.recipe, args.overrides)
    if args.nproc > 1 or args.accelerate_config:
        from hf_vram.runners.launch import launch

        return launch(loaded, args.recipe, args.overrides, args.nproc, args.accelerate_config)
    from hf_vram.runners.run import train

    train(loaded)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every rank waits for the main one to finish writing the output, then the group is taken down before the
        # interpreter exits: a rank that exits with gloo's threads still running aborts ("terminate called
        # without an active exception"), and torchrun then kills the others.
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _cmd_prepare(args) -> int:
    import json

    from data_prep.prepare import format_sample
    from hf_vram.recipe.load import load_recipe
    from hf_vram.recipe.references import References
    from hf_vram.runners.lm_data import prepare_data, refuse_corpus_mixture
    from hf_vram.runners.run import train_dependencies

    loaded = load_recipe(args.recipe, args.overrides)
    train_dependencies(loaded)
    tokenizer_path = References.of(loaded).tokenizer
    if loaded.recipe.task == "pretrain":
        refuse_corpus_mixture(loaded.recipe)
        return _prepare_corpus(loaded, tokenizer_path, args.inspect)
    tokenizer, prepared, _ = prepare_data(loaded, tokenizer_path)
    order = ("samples", "kept", "truncated", "dropped", "tokens", "trained_tokens", "pairs", "examples", "desirable",
             "undesirable")
    for split, counts in prepared.counts.items():
        if split != "sources":
            print(f"{split}: " + ", ".join(f"{k} {counts[k]:,}" for k in order if k in counts))
    for s in prepared.counts.get("sources", []):
        # A mixture: what each source gave (weights draw the training samples, so they need not be all its records).
        print(f"source {s['source']} ({s['format']}): records {s['records']:,}, train {s['train']:,}, eval {s['eval']:,}")
    print(f"cached in {prepared.cache_dir}")
    if args.inspect:
        if loaded.recipe.data.format in ("preference", "unpaired"):  # rows trl tokenizes itself, shown as they are
            for row in prepared.train.select(range(min(args.inspect, len(prepared.train)))):
                print(json.dumps(row, indent=1, ensure_ascii=False))
            return 0
        color = sys.stdout.isatty()
        legend = "trained tokens in green" if color else "trained tokens between [[ ]]"
        for i, row in enumerate(prepared.train.select(range(min(args.inspect, len(prepared.train))))):
            trained = sum(label != -100 for label in row["labels"])
            print(f"--- sample {i}: {len(row['input_ids'])} tokens, {trained} trained ({legend})")
            print(format_sample(row, tokenizer, color))
    return 0


def _prepare_corpus(loaded, tokenizer_path, inspect: int) -> int:
    """`hf-vram prepare` of a pretraining recipe: the token shards, their counts, and the first blocks decoded."""
    from data_prep.corpus import prepare_corpus

    corpus = prepare_corpus(loaded.recipe, loaded.output_dir, tokenizer_path)
    c = corpus.counts
    for split in ("train", "val"):
        print(f"{split}: documents {c['documents'].get(split, 0):,}, tokens {c['tokens'][split]:,}, "
              f"blocks of {loaded.recipe.data.max_length} {c['blocks'][split]:,}")
    print(f"vocabulary {c['vocab_size']:,} ({c['dtype']} ids); cached in {c['shards']}")
    for i in range(min(inspect, len(corpus.train))):
        ids = corpus.train[i]["input_ids"]
        print(f"--- block {i}: {len(ids)} tokens")
        print(corpus.tokenizer.decode(ids))
    return 0


def _cmd_assemble(args) -> int:
    """A recipe with task assemble (trained like any other), or mergekit-moe's own YAML."""
    import yaml

    from hf_vram.moe.assemble import assemble, read_mergekit_yaml
    from hf_vram.recipe.load import find_recipe, load_recipe

    found = find_recipe(args.recipe)
    data = yaml.safe_load(Path(found).read_text(encoding="utf-8")) or {}
    if isinstance(data, dict) and "base_model" in data and "experts" in data:
        if args.overrides:
            raise UserError(f"{found}: overrides apply to hf-vram recipes, not to a mergekit-moe file")
        out = Path(args.out or f"outputs/{Path(found).stem}")
        spec = read_mergekit_yaml(found)
        assemble(spec, out)
        print(f"[hf-vram] assembled {len(spec.experts)} experts into {out}", flush=True)
        return 0
    loaded = load_recipe(found, [*args.overrides, *([f"train.output_dir={args.out}"] if args.out else [])])
    if loaded.recipe.task != "assemble":
        raise UserError(f"{found}: task is {loaded.recipe.task}, not assemble; train it with `hf-vram train`")
    from hf_vram.runners.run import train

    train(loaded)
    return 0


def _cmd_plan(args) -> int:
    """The plan on each card named (--gpu, repeatable; the RTX 4070 when none is); 0 when it fits every one."""
    from hf_vram.recipe.load import load_recipe
    from hf_vram.tasks import task_of
    from hf_vram.vram.gpus import get_gpu

    gpus = [get_gpu(name) for name in args.gpu or ["rtx4070"]]
    if args.png:
        from hf_vram.vram.plan_plot import png_target

        png_target(args.png)
    loaded = load_recipe(args.recipe, args.overrides)
    planner = task_of(loaded.recipe).make_planner()
    if planner is None:
        print(f"{loaded.name}: task {loaded.recipe.task} trains nothing on the GPU ({task_of(loaded.recipe).summary}); "
              "plan the recipe that trains its output (model.name_or_path: recipe:NAME)")
        return 0
    code, plans = 0, []
    for gpu in gpus:
        plan = planner.plan(loaded, gpu)
        plans.append((gpu.name, plan))
        print(planner.format(loaded, plan))
        if args.longest:
            print(planner.longest(loaded, gpu))
        if args.fit and not _print_fit(planner, loaded, gpu, args):
            code = 1
        code = code or (0 if plan.fits or args.fit else 1)
    if args.measure:
        print(planner.measure(loaded))
    if args.png:
        from hf_vram.vram.plan_plot import write_plan_png

        print(f"plan picture: {write_plan_png(args.png, plans, f'{loaded.name}: predicted peak memory')}")
    return code


def _print_fit(planner, loaded, gpu, args) -> bool:
    """`plan --fit`: the smallest change that fits and its plan; False when nothing fits."""
    from hf_vram.recipe.load import load_recipe

    changes, fitted = planner.fit(loaded, gpu)
    if fitted is None or not fitted.fits:
        print(f"--fit: no micro-batch, checkpointing or optimizer setting fits {gpu.name}; "
              f"{planner.fix_hint(loaded.recipe)}")
        return False
    if not changes:
        print("--fit: the recipe fits as it is")
    else:
        print(f"--fit: {' '.join(changes)}")
        print(planner.format(load_recipe(args.recipe, [*args.overrides, *changes]), fitted))
    return True


def _cmd_ui(args) -> int:
    from hf_vram.ui.app import serve

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"--root {root}: not a folder")
    serve(root, args.host, args.port, args.auth)
    return 0


def _cmd_table(args) -> int:
    from hf_vram.vram.gpus import get_gpu
    from hf_vram.vram.table import format_table, table_plans

    gpu = get_gpu(args.gpu)
    if args.png:
        from hf_vram.vram.plan_plot import png_target

        png_target(args.png)
    rows, plans = table_plans(gpu)
    md, csv_text = format_table(rows, gpu)
    print(md)
    if args.csv:
        Path(args.csv).write_text(csv_text)
        print(f"\nwritten to {args.csv}")
    if args.png:
        from hf_vram.vram.plan_plot import write_plan_png

        path = write_plan_png(args.png, plans, f"Shipped recipes on {gpu.name}: predicted peak memory")
        print(f"\nplan picture: {path}")
    return 0


def _cmd_generate(args) -> int:
    from hf_vram.generate import pipeline_generate

    out = Path(args.output_dir)
    if (out / "model_index.json").is_file():
        return _generate_images(out, args.prompt)
    if not (out / "config.json").is_file() and not (out / "adapter_config.json").is_file():
        raise UserError(f"{out}: not a trained output (no config.json or adapter_config.json); run `hf-vram train` first")
    for text in pipeline_generate(out, [args.prompt], args.max_new_tokens, raw=args.raw):
        print(text)
    return 0


def _generate_images(out: Path, prompt: str) -> int:
    """A diffusion output: images from its saved pipeline into OUTPUT_DIR/generated/ (the prompt names a class of
    a class-conditional pipeline, or "" for an unconditional one)."""
    import torch

    from data_prep.images import save_grid
    from hf_vram.builders.diffusion import load_diffusion_pipeline

    pipe = load_diffusion_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    kw = {"generator": torch.Generator().manual_seed(0), **_sampler_settings(out, pipe)}
    if hasattr(pipe, "get_label_ids"):  # class-conditional: DiTPipeline, ClassConditionalPipeline
        try:
            ids = pipe.get_label_ids([prompt] * 4)
        except ValueError:
            raise UserError(f"{out}: '{prompt}' is not one of its classes: {', '.join(sorted(pipe.labels))}") from None
        images = pipe(class_labels=ids, **kw).images
    elif hasattr(pipe, "tokenizer"):
        images = pipe([prompt] * 4, **kw).images
    else:
        images = pipe(batch_size=4, **kw).images
    name = "".join(c if c.isalnum() else "-" for c in prompt)[:40] or "samples"
    print(save_grid(images, out / "generated" / f"{name}.png"))
    return 0


def _sampler_settings(out: Path, pipe) -> dict:
    """The sampler settings the run drew its own sample grids with (the pipelines' defaults are ImageNet-sized),
    from the output's recipe.yaml, and what its architecture's pipeline needs (diffusion_archs.sampling_kwargs)."""
    if not (out / "recipe.yaml").is_file():
        return {}
    import yaml

    from hf_vram.builders.diffusion_archs import ARCHS, sampling_kwargs

    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8")) or {}
    d, arch = saved.get("diffusion") or {}, (saved.get("model") or {}).get("arch")
    kw = {"num_inference_steps": d.get("inference_steps", 50)}
    if d.get("conditioning", "none") != "none":
        kw["guidance_scale"] = d.get("guidance_scale", 3.0)
    if arch in ARCHS and hasattr(pipe, "tokenizer"):
        kw.update(sampling_kwargs(arch, pipe.tokenizer.model_max_length))
    return kw


def _cmd_push(args) -> int:
    from hf_vram.hub import push_output

    print(push_output(Path(args.output_dir), repo_id=args.repo, private=args.private))
    return 0


def _cmd_merge(args) -> int:
    from hf_vram.merge import merge_adapter

    if args.gguf:
        from hf_vram.export.quantize import check_kinds

        check_kinds(args.gguf)  # before the merge: a type that cannot be written is said at once
    dest = merge_adapter(Path(args.output_dir), Path(args.out) if args.out else None, args.dtype, args.max_shard_size)
    print(f"merged model written to {dest}")
    if not args.gguf:
        return 0
    from hf_vram.export.export import export_merged
    from hf_vram.export.report import report

    return report(export_merged(dest, args.gguf, check=args.check))


def _cmd_export(args) -> int:
    from hf_vram.export.export import export_gguf
    from hf_vram.export.report import report

    return report(export_gguf(Path(args.output_dir), args.gguf, check=args.check))


def _cmd_eval(args) -> int:
    from hf_vram.benchmarks.harness import evaluate_output, score_lines, scores, tables
    from hf_vram.benchmarks.tasks import split_names

    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise UserError("--limit and --batch-size: give a whole number of 1 or more")
    results = evaluate_output(Path(args.output_dir), split_names(args.tasks), args.limit, args.batch_size)
    print(tables(results))
    for line in score_lines(scores(results)):
        print(line)
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options and positionals in any order (argparse's intermixed parsing): in
    `hf-vram plan demo --gpu rtx4070 train.micro_batch_size=2` the override after the option is an override too,
    where plain parsing stops the positionals at the first option and calls the rest unrecognized. The top-level
    parser stays plain: parse_intermixed_args refuses a parser with subcommands (their positional has nargs
    PARSER), so each subcommand's parser intermixes its own arguments."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args's own two passes come back through here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-vram", description="Train and fine-tune models on one consumer GPU.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    s = sub.add_parser("recipes", help="list the shipped recipes")
    s.set_defaults(func=_cmd_recipes)
    s = sub.add_parser("validate", help="check recipes (names, paths or folders) without building anything")
    s.add_argument("items", nargs="*", metavar="RECIPE|key=value")
    s.set_defaults(func=_cmd_validate)
    _add_training_commands(sub)
    _add_planning_commands(sub)
    _add_output_commands(sub)
    s = sub.add_parser("ui", help="the local web app: recipes, the plan on a card, runs and their curves, outputs")
    s.add_argument("--root", default=".", help="the folder of your recipes (ROOT/recipes) and runs (ROOT/outputs)")
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--auth", metavar="USER:PASSWORD", help="a login, required on any address but this machine's")
    s.set_defaults(func=_cmd_ui)
    return p


def _add_training_commands(sub) -> None:
    """train and prepare: a recipe and its key.path=value overrides, in any order with the options."""
    s = sub.add_parser("train", help="train a recipe (resumes an existing output directory)")
    s.add_argument("recipe", help="a shipped recipe name or a path to a YAML recipe")
    s.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. train.lr=1e-4 train.max_steps=10")
    s.add_argument("--nproc", type=int, default=1, help="processes (torchrun; gloo DDP on CPU)")
    s.add_argument("--accelerate-config", help="an accelerate config file (recipes/accelerate/*.yaml)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("prepare", help="tokenize a recipe's data once (cached for training); --inspect shows the masks")
    s.add_argument("recipe", help="a shipped recipe name or a path to a YAML recipe")
    s.add_argument("overrides", nargs="*", metavar="key.path=value")
    s.add_argument("--inspect", type=int, default=0, metavar="N", help="print N formatted samples, trained tokens marked")
    s.set_defaults(func=_cmd_prepare)


def _add_planning_commands(sub) -> None:
    s = sub.add_parser("plan", help="predict peak VRAM and training time of a recipe on a card (no weights loaded)")
    s.add_argument("recipe", help="a shipped recipe name or a path to a YAML recipe")
    s.add_argument("overrides", nargs="*", metavar="key.path=value")
    s.add_argument("--gpu", action="append", help="rtx3060, rtx4070 (default), rtx4090, a100-40gb, a100-80gb, h100; "
                   "give it several times to plan on several cards")
    s.add_argument("--png", metavar="FILE", help="also draw the plan as a stacked bar per card into this PNG file")
    s.add_argument("--fit", action="store_true", help="change micro-batch, checkpointing, optimizer until it fits")
    s.add_argument("--measure", action="store_true", help="also measure one real step on the CPU beside the prediction")
    s.add_argument("--longest", action="store_true", help="the longest sequence that trains at micro-batch 1 on the card")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("table", help="predicted memory, fit and time of every shipped recipe on a card")
    s.add_argument("--gpu", default="rtx4070")
    s.add_argument("--csv", help="also write the table as CSV to this file")
    s.add_argument("--png", metavar="FILE", help="also draw every recipe's plan as a stacked bar into this PNG file")
    s.set_defaults(func=_cmd_table)


def _add_output_commands(sub) -> None:
    """generate, merge, export, assemble and push: model directories read or written (assemble builds one from dense
    checkpoints)."""
    s = sub.add_parser("generate", help="generate from an output directory through transformers.pipeline")
    s.add_argument("output_dir")
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--raw", action="store_true", help="do not wrap the prompt in the recipe's template")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("merge", help="merge a trained adapter into its base (reloaded unquantized) and save the model")
    s.add_argument("output_dir", help="an adapter output directory")
    s.add_argument("--out", help="where the merged model goes (default: OUTPUT_DIR/merged)")
    s.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="dtype of the merged weights (auto: the base's own)")
    s.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (an index is written when sharded)")
    _add_gguf_options(s, required=False)
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("export", help="write an output as GGUF for llama.cpp and Ollama (an adapter merged first), "
                       "with a Modelfile, into OUTPUT_DIR/gguf")
    s.add_argument("output_dir", help="an output directory (adapter or full model)")
    _add_gguf_options(s, required=True)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("assemble", help="build a Mixtral-style MoE from dense checkpoints (a task assemble recipe, "
                       "or mergekit-moe's own YAML)")
    s.add_argument("recipe", help="recipe name or path (task: assemble), or a mergekit-moe config file")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides (recipes only)")
    s.add_argument("--out", help="output directory (default: the recipe's, or outputs/<file name>)")
    s.set_defaults(func=_cmd_assemble)

    s = sub.add_parser("push", help="upload an output directory and its model card to the Hugging Face Hub")
    s.add_argument("output_dir")
    s.add_argument("--repo", help="owner/name (default: hub.repo_id of the output's recipe)")
    vis = s.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=None, help="create the repository private")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repository public")
    s.set_defaults(func=_cmd_push)

    s = sub.add_parser("eval", help="evaluate an output with lm-evaluation-harness tasks (the model loaded as "
                       "training scores it: an adapter on its base quantized as in the recipe)")
    s.add_argument("output_dir", help="an output directory of `hf-vram train` (adapter or full model)")
    s.add_argument("--tasks", required=True, metavar="NAME[,NAME...]",
                   help="arithmetic = hf-vram's held-out arithmetic (offline: the questions, prompt template, answer "
                   "length and exact match of the run's own score); it shadows lm-eval's tag 'arithmetic', whose "
                   "GPT-3 tasks keep their own names (arithmetic_1dc, ..., or 'arithmetic_*'). Any other name is an "
                   "lm-eval task, group or tag, its data from the Hub (HF_HUB_OFFLINE=1: from the cache only)")
    s.add_argument("--limit", type=int, metavar="N", help="only the first N examples of each task")
    s.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="prompts per generate call (default 32, as training's score: the same batches pad alike)")
    s.set_defaults(func=_cmd_eval)


def _add_gguf_options(s, required: bool) -> None:
    s.add_argument("--gguf", nargs="+", metavar="TYPE", required=required,
                   help="GGUF types: f16, bf16, q8_0, f32; K-quants (q4_k_m, q5_k_m, q6_k, ...) with the llama-cpp extra")
    s.add_argument("--check", action="store_true", help="round trip: transformers (and llama.cpp when installed) "
                   "load each file and must give the full model's greedy answer; logits compared")


def _quiet_known_noise() -> None:
    """bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional inference kernel (from the Hub)
    is missing; hf-vram switches that inference path off for models it trains, so the warning is noise."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())


def main(argv: list[str] | None = None) -> int:
    _quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"hf-vram: error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:
        print(f"hf-vram: training stopped: {e}", file=sys.stderr)
        return 1
