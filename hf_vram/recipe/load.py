"""Find, read, merge and validate recipes.

A recipe is named by file name (`demo`, `demo.yaml`, looked up among the shipped recipes) or given by path.
`extends: other` merges this recipe over another; `key.path=value` overrides from the command line go last.
Every problem is reported with the file, line, key path, what was expected and a did-you-mean.
"""

from __future__ import annotations

import copy
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hf_vram.errors import RecipeError, UserError, did_you_mean
from hf_vram.recipe.schema import Recipe

COMMAND_LINE = "command line"


def recipes_dir() -> Path:
    """The shipped recipes: inside the package (a link to the repository's recipes/ in a checkout)."""
    return Path(str(importlib.resources.files("hf_vram") / "recipes"))


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every shipped training recipe (accelerate launch configs excluded)."""
    root = recipes_dir()
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def find_recipe(ref: str, relative_to: Path | None = None) -> Path:
    """A recipe path from a path or a shipped name."""
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.insert(0, relative_to / ref)
        candidates.insert(1, relative_to / f"{ref}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    name = Path(ref).name.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_recipes()
    if "/" not in ref and name in shipped:  # a bare name; a path that does not exist is never replaced
        return shipped[name]
    raise UserError(
        f"recipe '{ref}' not found: not a file, and not a shipped recipe{did_you_mean(name, shipped)}. "
        "`hf-vram recipes` lists the shipped ones."
    )


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    name: str
    # key path -> "file:line" where its value was set (command-line overrides say so)
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.train.output_dir or Path("outputs") / self.name)

    def resolved_yaml(self) -> str:
        data = self.recipe.model_dump(mode="json")
        return f"# {self.name}: fully resolved recipe (extends and overrides applied)\n" + yaml.safe_dump(
            data, sort_keys=False
        )


def _mapping_keys(node: yaml.Node, prefix: str = "", seen: set[int] | None = None):
    """(key path, key node, its mapping node) of every mapping key in a composed YAML document, mappings inside
    lists included (their paths count the list index). Each node is walked once: an alias (`*name`) shares its
    anchor's node, and a recursive one (`&a [*a]`) would otherwise never end."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            yield path, key_node, node
            yield from _mapping_keys(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _mapping_keys(item, f"{prefix}.{i}" if prefix else str(i), seen)


def _line_map(node: yaml.Node, source: str) -> dict[str, str]:
    """key path -> 'file:line' for every mapping key in a composed YAML document."""
    return {path: f"{source}:{key.start_mark.line + 1}" for path, key, _ in _mapping_keys(node)}


def _duplicate_keys(node: yaml.Node, source: str) -> list[str]:
    """A key written twice in one mapping: PyYAML keeps the last value without a word, so the first one, often the
    one meant, would be ignored."""
    first: dict[tuple, str] = {}
    problems = []
    for path, key, mapping in _mapping_keys(node):
        line = key.start_mark.line + 1
        if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; several of them are YAML's own business
            continue
        # Per mapping, by the key as written (a key with dots, `a.b:`, is not the nested a: {b: ...}).
        seen_as = (id(mapping), key.tag, str(key.value))
        where = f"line {line}, column {key.start_mark.column + 1}"
        if seen_as in first:
            problems.append(f"{source}:{line}: {path}: duplicate key (already set at {first[seen_as]}); YAML would "
                            "keep only the last one: keep one of them")
        else:
            first[seen_as] = where
    return problems


def _read_text(path: Path) -> str:
    """The recipe file as text; a file that is not UTF-8 is an error naming the first bad byte (not a traceback)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(str(path), [f"{path}: cannot be read ({e.strerror})"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(str(path), [
            f"{path}:{line}:{column}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason}); "
            "recipes are read as UTF-8: re-save the file as UTF-8 (in the editor's encoding menu, or "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed.yaml` for Latin-1)"
        ]) from None


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """'file:line:column: not valid YAML: what (while what, from line N)' from a PyYAML error."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {e}"
    context = getattr(e, "context", None)
    context_mark = getattr(e, "context_mark", None)
    where = f" ({context}, from line {context_mark.line + 1})" if context and context_mark else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {e.problem}{where}"


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    text = _read_text(path)
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [_yaml_error(path, e)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"{path}: the top level must be a mapping of sections (model, data, train, ...), "
                                      f"not a {type(data).__name__}"])
    duplicates = _duplicate_keys(node, str(path))
    if duplicates:
        raise RecipeError(str(path), duplicates)
    return data, _line_map(node, str(path)) if node is not None else {}


def _deep_merge(base: dict, over: dict) -> dict:
    """Merge a child recipe over its parent, key by key (model.config too); `key: null` removes a key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise RecipeError(str(path), [f"extends: cycle {chain}"])
    data, origins = _read_yaml(path)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data, origins
    if not isinstance(parent_ref, str):
        raise RecipeError(str(path), [f"extends: expected a recipe name or path, got {parent_ref!r}"])
    try:
        parent_path = find_recipe(parent_ref, relative_to=path.parent)
    except UserError as e:
        raise RecipeError(str(path), [f"{origins.get('extends', path)}: extends: {e}"]) from None
    parent, parent_origins = _read_with_extends(parent_path, (*seen, resolved))
    # A child writes its own output (outputs/<child name> by default), never into its parent's directory.
    parent.get("train", {}).pop("output_dir", None)
    return _deep_merge(parent, data), {**parent_origins, **origins}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). Values are read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise RecipeError(COMMAND_LINE, [f"override '{text}': expected key.path=value, e.g. train.lr=1e-4"])
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise RecipeError(COMMAND_LINE, [f"override '{text}': no key path before '=': expected key.path=value, "
                                         "e.g. train.lr=1e-4"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    """Set data[k1][k2]... = value; a number after a list's key is an index into it (moe.experts.0.source_model)."""
    node: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not (k.isdigit() and int(k) < len(node)):
                path = ".".join(keys[:depth])
                indexes = f"of {len(node)} (indexes 0 to {len(node) - 1})" if node else "that is empty"
                raise RecipeError(COMMAND_LINE, [f"override '{'.'.join(keys)}': {path} is a list {indexes}; give an "
                                                 f"index after it, or set the whole list: {path}=[...]"])
            k = int(k)
        elif not last and not isinstance(node.get(k), dict | list):
            node[k] = {}
        if last:
            node[k] = value
        else:
            node = node[k]


def _schema_fields(loc: tuple) -> list[str]:
    """Field names valid at the parent of a pydantic error location (for did-you-mean)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) and model is not None:
            continue  # an entry of a list of sections (data.sources.0): the entries' model is already chosen
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = _section_model(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _section_model(ann) -> type[BaseModel] | None:
    """The section model a field holds: itself, inside an optional union (DataSection | None), or the entries of a
    list of sections (list[DataSourceSection])."""
    for a in typing.get_args(ann) or (ann,):
        inner = typing.get_args(a) if typing.get_origin(a) is list else (a,)
        for b in inner:
            if isinstance(b, type) and issubclass(b, BaseModel):
                return b
    return None


def _field_loc(loc: tuple) -> tuple:
    """The key path of a pydantic error location, without its internal tags (validators, union members)."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _explain(err: dict, origins: dict[str, str], source: str) -> str:
    loc = _field_loc(err["loc"])
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "value_error":
        # Validators name the key they are about: "quant.bits: ..."
        msg = msg.removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            return f"{origins.get(head, source)}: {head}: {rest}"
    path = ".".join(str(p) for p in loc) or "(top level)"
    where = origins.get(path) or origins.get(".".join(str(p) for p in loc[:-1])) or source
    if kind == "extra_forbidden":
        valid = _schema_fields(loc)
        hint = did_you_mean(loc[-1], valid)
        return f"{where}: {path}: unknown key{hint}; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{where}: {path}: required key is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        options = [o.strip(" '") for o in expected.replace(" or ", ",").split(",")]
        return f"{where}: {path}: got {value!r}, expected one of {expected}{did_you_mean(value, options)}"
    if kind == "value_error":
        return f"{where}: {path}: {msg}"
    if kind == "finite_number":
        return f"{where}: {path}: got {value!r}, expected a finite number (inf and nan are not allowed)"
    return f"{where}: {path}: {msg}, got {value!r}"


def _check_references(recipe: Recipe, origins: dict[str, str], source: str) -> list[str]:
    """Things pydantic cannot see: files that must exist, recipe dependencies, builtin data, config keys."""

    def at(key: str) -> str:
        return origins.get(key, source)

    problems = _check_data_source(recipe, at) + _check_model_refs(recipe, at, Path(source).parent)
    problems += _check_reward_files(recipe, at, Path(source).parent)
    if recipe.model.arch:
        problems += _check_model_config(recipe, at)
    return problems


def _check_reward_files(recipe: Recipe, at, folder: Path) -> list[str]:
    """task grpo: each user reward (grpo.rewards.N.function, path.py:name relative to the recipe) is a file that
    defines the function at its top level; read without running it (training imports it)."""
    import ast

    if recipe.task != "grpo":
        return []
    problems = []
    for i, r in enumerate(recipe.grpo.rewards):
        if not r.function:
            continue
        key = f"grpo.rewards.{i}.function"
        file, _, name = r.function.rpartition(":")
        path = (folder / file).expanduser()
        if not path.is_file():
            problems.append(f"{at(key)}: {key}: file '{file}' does not exist (read relative to the recipe: {path})")
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{at(key)}: {key}: '{file}' is not readable Python: {e}")
            continue
        defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        if name not in defined:
            problems.append(f"{at(key)}: {key}: '{file}' defines no function '{name}'{did_you_mean(name, defined)}")
    return problems


def _check_data_source(recipe: Recipe, at) -> list[str]:
    """Every data source of the recipe (data.source, or each of data.sources) checked by _check_one_source."""
    if recipe.data is None:
        return []
    if recipe.data.sources:
        return [p for i, entry in enumerate(recipe.data.sources)
                for p in _check_one_source(recipe, entry.source, f"data.sources.{i}.source", at)]
    return _check_one_source(recipe, recipe.data.source, "data.source", at)


def _check_one_source(recipe: Recipe, src: str, key: str, at) -> list[str]:
    """A builtin source that exists, a URL only for pretraining, a local file that exists."""
    from data_prep.sources import LOADERS

    if src.startswith("builtin:"):
        return _check_builtin_source(src, recipe.data.format == "images", key, at)
    if src.startswith(("http://", "https://")):
        if recipe.task != "pretrain":
            return [f"{at(key)}: {key}: a URL is read by task pretrain only; download the file and give its path"]
    elif src and (src.endswith(tuple(LOADERS)) or src.startswith((".", "/", "~"))):
        if not Path(src).expanduser().exists():
            return [f"{at(key)}: {key}: file '{src}' does not exist (relative paths are read from the current "
                    "directory; give a Hub dataset id without a file suffix to load from the Hub)"]
    return []


def _check_builtin_source(src: str, images: bool, key: str, at) -> list[str]:
    """builtin:NAME names data the project generates: an image set for format images, else a text dataset."""
    if images:
        from data_prep.images import BUILTIN_IMAGE_SOURCES

        if src not in BUILTIN_IMAGE_SOURCES:
            return [f"{at(key)}: {key}: no builtin image source '{src}'"
                    f"{did_you_mean(src, BUILTIN_IMAGE_SOURCES)}; builtin: {', '.join(BUILTIN_IMAGE_SOURCES)}"]
        return []
    from data_prep.builtin import BUILTIN_SOURCES

    name = src.removeprefix("builtin:")
    if name not in BUILTIN_SOURCES:
        return [f"{at(key)}: {key}: no builtin dataset '{name}'{did_you_mean(name, BUILTIN_SOURCES)}; "
                f"builtin: {', '.join(BUILTIN_SOURCES)}"]
    return []


def _check_model_refs(recipe: Recipe, at, folder: Path) -> list[str]:
    """Models named by the recipe: a recipe:NAME dependency must be a recipe, a local path must exist."""
    refs = [("model.name_or_path", recipe.model.name_or_path), ("tokenizer.name_or_path", recipe.tokenizer.name_or_path)]
    if recipe.diffusion:
        refs += [("diffusion.vae", recipe.diffusion.vae), ("diffusion.text_encoder", recipe.diffusion.text_encoder)]
    if recipe.moe:
        refs += [(f"moe.experts.{i}.source_model", e.source_model) for i, e in enumerate(recipe.moe.experts)]
    problems = []
    init = recipe.grpo.init_adapter if recipe.task == "grpo" else None
    if init and not init.startswith("recipe:") and not (folder / Path(init).expanduser()).exists():
        # Read relative to the recipe file, as hf_vram/runners/grpo.py reads it.
        problems.append(f"{at('grpo.init_adapter')}: grpo.init_adapter: directory '{init}' does not exist "
                        f"(read relative to {folder})")
    elif init:
        refs.append(("grpo.init_adapter", init))
    for key, ref in refs:
        if ref and ref.startswith("recipe:"):
            dep = ref.removeprefix("recipe:")
            try:
                find_recipe(dep, relative_to=folder)
            except UserError:
                problems.append(f"{at(key)}: {key}: no recipe '{dep}' to train first{did_you_mean(dep, shipped_recipes())}")
        elif ref and ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists():
            problems.append(f"{at(key)}: {key}: directory '{ref}' does not exist")
    return problems


def _check_model_config(recipe: Recipe, at) -> list[str]:
    """model.config keys must be fields of the architecture's config class (transformers accepts any)."""
    from transformers import CONFIG_MAPPING

    arch = recipe.model.arch
    if recipe.task == "diffusion":
        return _check_diffusion_config(recipe, at)
    if arch not in CONFIG_MAPPING:
        import hf_vram.models  # noqa: F401  (architectures hf-vram adds, RetNet, register themselves)
    if arch not in CONFIG_MAPPING:
        return [f"{at('model.arch')}: model.arch: unknown model type '{arch}'{did_you_mean(arch, CONFIG_MAPPING.keys())}"]
    config_cls = CONFIG_MAPPING[arch]
    defaults = config_cls().to_dict()
    known = set(vars(config_cls()).keys()) | set(getattr(config_cls, "attribute_map", {}))

    def accepted(key, value) -> bool:
        # Legacy keys (rope_theta -> rope_parameters) change other fields; an unknown key is only stored as is.
        try:
            changed = {k for k, v in config_cls(**{key: value}).to_dict().items() if defaults.get(k) != v}
        except Exception:  # a bad value for a real field: the config class says so when the model is built
            return True
        return bool(changed - {key})

    problems = []
    for key, value in recipe.model.config.items():
        if key not in known and not accepted(key, value):
            problems.append(
                f"{at('model.config.' + key)}: model.config.{key}: not a field of {config_cls.__name__}"
                f"{did_you_mean(key, known)}"
            )
    return problems


def _check_diffusion_config(recipe: Recipe, at) -> list[str]:
    """task diffusion: model.arch names a diffusers model class; model.config keys are parameters of its __init__."""
    from hf_vram.builders.diffusion import config_keys, model_class
    from hf_vram.builders.diffusion_archs import ARCHS, DERIVED_KEYS

    arch = recipe.model.arch
    if arch not in ARCHS:
        return [f"{at('model.arch')}: model.arch: unknown diffusion architecture '{arch}'{did_you_mean(arch, ARCHS)}; "
                f"one of {', '.join(ARCHS)}"]
    known = config_keys(arch)
    problems = []
    for key in recipe.model.config:
        if key not in known:
            problems.append(f"{at('model.config.' + key)}: model.config.{key}: not a parameter of "
                            f"{model_class(arch).__name__}{did_you_mean(key, known)}")
        elif key in DERIVED_KEYS and key != "sample_size":
            problems.append(f"{at('model.config.' + key)}: model.config.{key}: hf-vram sets it from the data, the VAE "
                            "and the pipeline; leave it out")
    return problems


def load_recipe(ref: str | Path, overrides: list[str] | tuple[str, ...] = (), check_references: bool = True) -> LoadedRecipe:
    """Read a recipe (extends and overrides applied) into a validated Recipe, or raise RecipeError."""
    path = find_recipe(str(ref))
    data, origins = _read_with_extends(path)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
        origins[".".join(keys)] = COMMAND_LINE
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems = list(dict.fromkeys(_explain(err, origins, str(path)) for err in e.errors()))
        raise RecipeError(str(path), problems) from None
    if check_references:
        problems = _check_references(recipe, origins, str(path))
        if problems:
            raise RecipeError(str(path), problems)
    return LoadedRecipe(recipe=recipe, path=path, name=path.stem, origins=origins)
