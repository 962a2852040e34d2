"""The planner of the language-model tasks: the estimate of a recipe (estimate.py), printed, fitted to a card,
its memory savings itemized, and the longest context that fits."""

from __future__ import annotations

from hf_vram.recipe.load import LoadedRecipe
from hf_vram.vram import estimate as estimate_module
from hf_vram.vram.configs import resolve_config
from hf_vram.vram.counts import Counts, count_parameters
from hf_vram.vram.estimate import Plan, estimate
from hf_vram.vram.fitting import fit_search
from hf_vram.vram.gpus import GPU
from hf_vram.vram.report import gib, item_lines, rough_duration


def dataset_size(loaded: LoadedRecipe) -> int | None:
    """Training records of a recipe, without tokenizing: counted for builtin and local data, looked up for the
    shipped recipes' Hub datasets; None when unknown (time is then given per step). A mixture: the records of its
    sources together (concatenated, or the most a weighted mixture can draw), None when one is unknown."""
    d = loaded.recipe.data
    if d.streaming:
        return None  # a streamed corpus may not fit in memory: never read whole to count it (train.max_steps is set)
    held_out = d.val_size if d.val_size and not d.eval_split else 0.0
    if not d.sources:
        return _source_size(d.source, d.format, d.split, d.max_samples, held_out)
    sizes = [_source_size(e.source, e.format, e.split, e.max_samples, held_out) for e in d.sources]
    if None in sizes:
        return None
    if d.sources[0].weight is None or d.mix_stopping == "all_exhausted":
        # Concatenated: every record once. all_exhausted draws at least that many (the exact number is random).
        return sum(sizes)
    # first_exhausted stops when a source runs out: about that source's records over its share of the weights.
    total = sum(e.weight for e in d.sources)
    return round(min(n * total / e.weight for n, e in zip(sizes, d.sources)))


def _source_size(source: str, fmt: str, split: str, max_samples: int | None, held_out: float) -> int | None:
    """Training records of one source (after max_samples and the held-out share), or None when unknown."""
    from pathlib import Path

    from hf_vram.vram.known_configs import KNOWN_DATASET_SIZES

    if source.startswith("builtin:") or Path(source).expanduser().is_file():
        from data_prep.sources import read_records

        n = len(read_records(source, fmt, split))
    else:
        n = KNOWN_DATASET_SIZES.get((source, split))
        if n is None:
            return None
    if max_samples:
        n = min(n, max_samples)
    return n - (round(n * held_out) if held_out else 0)


def planning_inputs(loaded: LoadedRecipe) -> tuple[object, Counts, int | None]:
    """(config, parameter counts, training records): what every plan of this recipe starts from, read once."""
    # A plain config object for the dense families (configs.py): planning needs its fields, not transformers' classes.
    config = resolve_config(loaded, light=True)
    return config, count_parameters(config, loaded.recipe), dataset_size(loaded)


def plan_recipe(loaded: LoadedRecipe, gpu: GPU, inputs=None) -> Plan:
    config, counts, samples = inputs or planning_inputs(loaded)
    plan = estimate(config, loaded.recipe, gpu, samples=samples, counts=counts)
    plan.savings = savings_lines(config, loaded.recipe, gpu, counts, plan)
    return plan


def _loss_path_fixed(recipe) -> bool:
    """train.fused_loss is no choice: the task's trainer scores its loss one way only (estimate.py)."""
    return recipe.task in (*estimate_module.FUSED_ONLY_TASKS, *estimate_module.FULL_LOGITS_TASKS)


def all_savings_on(recipe):
    """The recipe with every memory saving on (those set off switched on, `auto` ones forced on)."""
    r = with_setting(with_setting(recipe, "train.activation_offloading", True), "train.tiled_mlp", True)
    if not _loss_path_fixed(recipe):
        r = with_setting(r, "train.fused_loss", True)
    if recipe.quant.bits:
        r = with_setting(r, "quant.unquantized_dtype", "compute")
    if not r.train.gradient_checkpointing:
        r = with_setting(r, "train.gradient_checkpointing", True)
    return r


def format_longest(loaded: LoadedRecipe, gpu: GPU, inputs=None) -> str:
    """`hf-vram plan --longest`: the longest sequence at micro-batch 1, as the recipe is and with every saving on."""
    config, counts, _ = inputs or planning_inputs(loaded)
    recipe = loaded.recipe
    n = longest_context(config, recipe, gpu, counts)
    lines = [f"longest context on {gpu.name} at micro-batch 1: {n:,} tokens" + (
        f" (hf-vram train {loaded.name} data.max_length={n} train.micro_batch_size=1)" if n else
        " (nothing fits: not even 256 tokens)")]
    best = longest_context(config, all_savings_on(recipe), gpu, counts)
    if best > n:
        lines.append(f"  with every saving on: {best:,} tokens (train.gradient_checkpointing=true "
                     "train.activation_offloading=true train.tiled_mlp=true"
                     + (" train.fused_loss=true" if not _loss_path_fixed(recipe) else "")
                     + (" quant.unquantized_dtype=compute" if recipe.quant.bits else "") + ")")
    return "\n".join(lines)


def fit_overrides(loaded: LoadedRecipe, gpu: GPU, inputs=None) -> tuple[list[str], Plan]:
    """fit_search for a language model (its config, parameter counts and records read once)."""
    config, counts, samples = inputs or planning_inputs(loaded)
    return fit_search(loaded.recipe, lambda r: estimate(config, r, gpu, samples=samples, counts=counts))


# The savings `hf-vram plan` itemizes: the recipe override that switches each off, and what it is.
SAVINGS = (
    ("quant.unquantized_dtype", "float32", "unquantized weights in the compute dtype"),
    ("train.fused_loss", False, "fused LM-head loss"),
    ("train.activation_offloading", False, "activation offloading"),
    ("train.tiled_mlp", False, "tiled MLP"),
)


def with_setting(recipe, key: str, value):
    """The recipe with one section key changed (a copy; the value is one the schema takes)."""
    section, name = key.split(".")
    part = getattr(recipe, section)
    return recipe.model_copy(update={section: part.model_copy(update={name: value})})


def savings_lines(config, recipe, gpu: GPU, counts: Counts, plan: Plan) -> list[str]:
    """What each memory saving that is on saves at this recipe's size (the plan again with it off), and what each
    one that is off would save."""
    from hf_vram.builders.long_context import offloading_on, tiled_mlp_on

    active = {
        "quant.unquantized_dtype": bool(recipe.quant.bits) and recipe.quant.unquantized_dtype == "compute",
        "train.fused_loss": estimate_module.loss_uses_fused_head(config, recipe),
        "train.activation_offloading": offloading_on(recipe, cuda=True),
        "train.tiled_mlp": tiled_mlp_on(recipe) and config.model_type in estimate_module.TILED_FAMILIES,
    }
    lines = []
    for key, off, what in SAVINGS:
        if key == "quant.unquantized_dtype" and not recipe.quant.bits:
            continue
        if key == "train.fused_loss" and _loss_path_fixed(recipe):
            continue  # trl's DPO and KTO trainers have no other path, its ORPO and CPO trainers no fused one
        if active[key]:
            other = estimate(config, with_setting(recipe, key, off), gpu, counts=counts)
            lines.append(f"  saves {gib(other.total - plan.total):>10}  {what} (on; {key}={str(off).lower()} to compare)")
        else:
            on = "compute" if key == "quant.unquantized_dtype" else True
            other = estimate(config, with_setting(recipe, key, on), gpu, counts=counts)
            if other.total < plan.total:
                lines.append(f"  could save {gib(plan.total - other.total):>6}  {what} ({key}={str(on).lower()})")
    if plan.host_bytes:
        lines.append(f"  host memory {gib(plan.host_bytes):>9}  offloaded checkpoints in pinned CPU memory (not on the card)")
    return lines


def longest_context(config, recipe, gpu: GPU, counts: Counts, limit: int = 1 << 20) -> int:
    """The longest data.max_length (a multiple of 256) that fits the card at micro-batch 1, the recipe's other
    settings kept. `auto` savings switch on at fixed lengths, so the plan's peak grows with the length only between
    those lengths: each stretch is binary-searched, and the longest fit of any stretch is the answer."""
    from hf_vram.builders.long_context import OFFLOAD_FROM, TILED_MLP_FROM

    one = with_setting(recipe, "train.micro_batch_size", 1)

    def fits(length: int) -> bool:
        return estimate(config, with_setting(one, "data.max_length", length), gpu, counts=counts).fits

    bounds = sorted({256, OFFLOAD_FROM, TILED_MLP_FROM, limit})
    best = 0
    for lo, hi in zip(bounds, bounds[1:]):
        hi -= 256  # the stretch ends before the next switch
        if hi < lo or not fits(lo):
            continue
        while lo < hi:  # the longest fit in [lo, hi], in steps of 256
            mid = (lo + hi + 256) // 512 * 256
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 256)
        best = max(best, lo)
    if fits(limit):
        best = limit
    return best


def format_plan(loaded: LoadedRecipe, plan: Plan) -> str:
    r = loaded.recipe
    kind = (f"{r.adapter.type}" + (f", {r.quant.bits}-bit {r.quant.type if r.quant.bits == 4 else 'int8'} base" if r.quant.bits else "")
            if r.adapter.type != "none" else "full fine-tune" if r.model.name_or_path else f"{r.model.arch} from scratch")
    s = plan.settings
    lines = [
        f"plan: {loaded.name} on {plan.gpu.name} ({plan.gpu.memory_gib:.0f} GiB)",
        f"  {plan.params:,} parameters, {plan.trainable:,} trained ({kind}); micro-batch {s['micro_batch_size']} x "
        f"{s['max_length']} tokens, accumulation {s['grad_accum']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"{s['optimizer']}",
    ]
    lines += item_lines(plan, "the items are not all alive at once: the peak comes at the start or the end of backward")
    lines += getattr(plan, "savings", [])
    lines += [f"  note: {n}" for n in plan.notes]
    rate = f"{plan.flops_per_token:.3g} FLOPs/token at {plan.mfu:.0%} MFU of {plan.gpu.bf16_tflops} TFLOPS bf16"
    sampling = ""
    if plan.sampling_seconds:
        each = plan.sampling_seconds
        each = f"{each:.1f} s" if each >= 0.1 else f"{each * 1000:.0f} ms"
        sampling = (f", sampling included: {each} a step for the completions, decoding bound by "
                    f"{plan.gpu.memory_gbps:,.0f} GB/s of memory bandwidth")
    if plan.seconds:
        lines.append(f"  time: {plan.steps:,} steps x {plan.tokens_per_step:,} tokens, {rate}: {rough_duration(plan.seconds)} "
                     f"(every sample counted at data.max_length: an upper bound unless packed{sampling})")
    else:
        per_step = plan.tokens_per_step * plan.flops_per_token / (plan.gpu.bf16_tflops * 1e12 * plan.mfu)
        per_step += plan.sampling_seconds
        lines.append(f"  time: {per_step:.2f} s per step of {plan.tokens_per_step:,} tokens, {rate} (dataset size "
                     f"unknown{sampling})")
    return "\n".join(lines)


class LMPlanner:
    """The planner of tasks sft, dpo and pretrain (hf_vram/tasks.py); the CLI, the table and preflight call it."""

    def __init__(self):
        self._inputs: dict[int, tuple] = {}

    def inputs(self, loaded: LoadedRecipe):
        """planning_inputs, read once per recipe."""
        if id(loaded) not in self._inputs:
            self._inputs[id(loaded)] = (loaded, planning_inputs(loaded))
        return self._inputs[id(loaded)][1]

    def plan(self, loaded: LoadedRecipe, gpu: GPU) -> Plan:
        return plan_recipe(loaded, gpu, self.inputs(loaded))

    def fit(self, loaded: LoadedRecipe, gpu: GPU) -> tuple[list[str], Plan]:
        return fit_overrides(loaded, gpu, self.inputs(loaded))

    def format(self, loaded: LoadedRecipe, plan: Plan) -> str:
        return format_plan(loaded, plan)

    def fix_hint(self, recipe) -> str:
        """What to change when no micro-batch, checkpointing or optimizer setting fits."""
        if recipe.model.arch:
            return "shorten data.max_length or build a smaller model (model.config)"
        if recipe.quant.bits == 4:
            return "shorten data.max_length or choose a smaller base model"
        if recipe.adapter.type == "none":
            return "shorten data.max_length or train an adapter on a quantized base (adapter.type: lora, quant.bits: 4)"
        return "shorten data.max_length or quantize the base (quant.bits: 4)"

    def longest(self, loaded: LoadedRecipe, gpu: GPU) -> str:
        return format_longest(loaded, gpu, self.inputs(loaded))

    def measure(self, loaded: LoadedRecipe) -> str:
        from hf_vram.vram.compare import measure_and_compare

        return measure_and_compare(loaded)

    def table_row(self, loaded: LoadedRecipe, gpu: GPU, plan: Plan | None = None) -> dict:
        from hf_vram.vram.report import fit_cell

        r, inputs = loaded.recipe, self.inputs(loaded)
        plan = plan or self.plan(loaded, gpu)  # the caller's, when it planned already
        return {
            "kind": r.task + (f" {r.adapter.type}" if r.adapter.type != "none" else " full")
            + (f" {r.quant.bits}-bit" if r.quant.bits else ""),
            **fit_cell(plan, lambda: self.fit(loaded, gpu)),
            "longest_context": longest_context(inputs[0], r, gpu, inputs[1]),
        }
