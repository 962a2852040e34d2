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

    if is_accelerate_config(ref):
        return validate_accelerate_config(ref)
    loaded = load_recipe(ref, overrides)
    r = loaded.recipe
    if r.task == "assemble":
        return (f"ok: {loaded.path} (assemble: {len(r.moe.experts)} experts, top-{r.moe.experts_per_token}, router "
                f"{r.moe.gate_mode}, on {r.model.name_or_path}; output {loaded.output_dir})")
    if r.task == "diffusion":
        d = r.diffusion
        size = r.data.images.resolution if r.data.images else 64
        return (f"ok: {loaded.path} (diffusion: {r.model.arch} from scratch, {d.conditioning} conditioning, "
                f"{'latents of ' + d.vae if d.vae else 'pixel space'}; data {r.data.source} at {size}px; "
                f"output {loaded.output_dir})")
    kind = f"{r.adapter.type} adapter on {r.model.name_or_path}" if r.adapter.type != "none" else (
        f"{r.model.arch} from scratch" if r.model.arch else f"full fine-tune of {r.model.name_or_path}"
    )
    quant = f", {r.quant.bits}-bit {r.quant.type} base" if r.quant.bits else ""
    return f"ok: {loaded.path} ({r.task}: {kind}{quant}; data {r.data.source} as {r.data.format}; output {loaded.output_dir})"


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
        from hf_vram.train.launch import launch

        return launch(loaded, args.recipe, args.overrides, args.nproc, args.accelerate_config)
    from hf_vram.train.lm import train

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
    from hf_vram.train.lm import prepare_data, resolve_dependencies

    loaded = load_recipe(args.recipe, args.overrides)
    _, tokenizer_path = resolve_dependencies(loaded)
    if loaded.recipe.task == "pretrain":
        return _prepare_corpus(loaded, tokenizer_path, args.inspect)
    tokenizer, prepared, _ = prepare_data(loaded, tokenizer_path)
    order = ("samples", "kept", "truncated", "dropped", "tokens", "trained_tokens", "pairs")
    for split, counts in prepared.counts.items():
        print(f"{split}: " + ", ".join(f"{k} {counts[k]:,}" for k in order if k in counts))
    print(f"cached in {prepared.cache_dir}")
    if args.inspect:
        if loaded.recipe.data.format == "preference":
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
    from hf_vram.train.assemble import assemble_file

    assemble_file(args.recipe, args.out, args.overrides)
    return 0


def _cmd_plan(args) -> int:
    from hf_vram.recipe.load import load_recipe
    from hf_vram.vram.gpus import get_gpu

    gpu = get_gpu(args.gpu)
    loaded = load_recipe(args.recipe, args.overrides)
    if loaded.recipe.task == "assemble":
        print(f"{loaded.name}: task assemble trains nothing (the experts are copied into one model on the CPU); plan "
              "the recipe that fine-tunes its output (model.name_or_path: recipe:NAME)")
        return 0
    if loaded.recipe.task == "diffusion":
        from hf_vram.vram.diffusion_plan import fit_diffusion, format_diffusion_plan, plan_diffusion

        plan = plan_diffusion(loaded, gpu)
        fmt, refit = format_diffusion_plan, lambda: fit_diffusion(loaded, gpu)
        fix = "lower data.images.resolution, use a VAE's latents (diffusion.vae) or a smaller model"
    else:
        from hf_vram.vram.plan import fit_overrides, format_plan, plan_recipe, planning_inputs

        inputs = planning_inputs(loaded)
        plan = plan_recipe(loaded, gpu, inputs)
        fmt, refit = format_plan, lambda: fit_overrides(loaded, gpu, inputs)
        fix = "shorten data.max_length or try " + (
            "a smaller model" if loaded.recipe.model.arch else "quantizing the base (quant.bits: 4)")
    print(fmt(loaded, plan))
    if args.longest:
        if loaded.recipe.task == "diffusion":
            print("--longest: a diffusion recipe has no sequence length (its size is data.images.resolution)")
        else:
            from hf_vram.vram.plan import format_longest

            print(format_longest(loaded, gpu, inputs))
    if args.fit:
        changes, fitted = refit()
        if fitted is None or not fitted.fits:
            print(f"--fit: no micro-batch, checkpointing or optimizer setting fits {gpu.name}; {fix}")
            return 1
        if not changes:
            print("--fit: the recipe fits as it is")
        else:
            print(f"--fit: {' '.join(changes)}")
            print(fmt(load_recipe(args.recipe, [*args.overrides, *changes]), fitted))
    if args.measure:
        if loaded.recipe.task == "diffusion":
            print("--measure: a diffusion plan is already a measurement (of one step on fake tensors at full size)")
        else:
            from hf_vram.vram.compare import measure_and_compare

            print(measure_and_compare(loaded))
    return 0 if plan.fits or args.fit else 1


def _cmd_table(args) -> int:
    from pathlib import Path

    from hf_vram.vram.gpus import get_gpu
    from hf_vram.vram.plan import format_table, table_rows

    gpu = get_gpu(args.gpu)
    md, csv_text = format_table(table_rows(gpu), gpu)
    print(md)
    if args.csv:
        Path(args.csv).write_text(csv_text)
        print(f"\nwritten to {args.csv}")
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
    from hf_vram.builders.diffusion import load_pipeline

    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    # The sampler settings the run drew its own sample grids with (the pipelines' defaults are ImageNet-sized).
    kw = {}
    if (out / "recipe.yaml").is_file():
        import yaml

        d = (yaml.safe_load((out / "recipe.yaml").read_text()) or {}).get("diffusion") or {}
        kw = {"num_inference_steps": d.get("inference_steps", 50)}
        if d.get("conditioning", "none") != "none":
            kw["guidance_scale"] = d.get("guidance_scale", 3.0)
    if hasattr(pipe, "get_label_ids"):  # class-conditional: DiTPipeline, ClassConditionalPipeline
        try:
            ids = pipe.get_label_ids([prompt] * 4)
        except ValueError:
            raise UserError(f"{out}: '{prompt}' is not one of its classes: {', '.join(sorted(pipe.labels))}") from None
        images = pipe(class_labels=ids, generator=generator, **kw).images
    elif hasattr(pipe, "tokenizer"):
        if type(pipe).__name__ == "PixArtAlphaPipeline":  # its resolution bins exist only for 256 px and up
            kw.update(use_resolution_binning=False, clean_caption=False,
                      max_sequence_length=pipe.tokenizer.model_max_length)
        images = pipe([prompt] * 4, generator=generator, **kw).images
    else:
        images = pipe(batch_size=4, generator=generator, **kw).images
    name = "".join(c if c.isalnum() else "-" for c in prompt)[:40] or "samples"
    print(save_grid(images, out / "generated" / f"{name}.png"))
    return 0


def _cmd_push(args) -> int:
    from hf_vram.hub import push_output

    print(push_output(Path(args.output_dir), repo_id=args.repo, private=args.private))
    return 0


def _cmd_merge(args) -> int:
    from hf_vram.merge import merge_adapter

    dest = merge_adapter(Path(args.output_dir), Path(args.out) if args.out else None, args.dtype, args.max_shard_size)
    print(f"merged model written to {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-vram", description="Train and fine-tune models on one consumer GPU.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("recipes", help="list the shipped recipes")
    s.set_defaults(func=_cmd_recipes)

    s = sub.add_parser("validate", help="check recipes (names, paths or folders) without building anything")
    s.add_argument("items", nargs="*", metavar="RECIPE|key=value")
    s.set_defaults(func=_cmd_validate)

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

    s = sub.add_parser("plan", help="predict peak VRAM and training time of a recipe on a card (no weights loaded)")
    s.add_argument("recipe", help="a shipped recipe name or a path to a YAML recipe")
    s.add_argument("overrides", nargs="*", metavar="key.path=value")
    s.add_argument("--gpu", default="rtx4070", help="rtx3060, rtx4070 (default), rtx4090, a100-40gb, a100-80gb, h100")
    s.add_argument("--fit", action="store_true", help="change micro-batch, checkpointing, optimizer until it fits")
    s.add_argument("--measure", action="store_true", help="also measure one real step on the CPU beside the prediction")
    s.add_argument("--longest", action="store_true", help="the longest sequence that trains at micro-batch 1 on the card")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("table", help="predicted memory, fit and time of every shipped recipe on a card")
    s.add_argument("--gpu", default="rtx4070")
    s.add_argument("--csv", help="also write the table as CSV to this file")
    s.set_defaults(func=_cmd_table)

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
    s.set_defaults(func=_cmd_merge)

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
    return p


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
