"""From a YAML file and `KEY=VALUE` overrides to a checked, frozen Recipe.

    cpt train recipes/quickstart/cpt.yaml train.optimizer.lr=1e-4 data.seq_len=256

OmegaConf reads the YAML, merges the dotted overrides and resolves interpolations; `build` then
walks the schema (schema.py) and collects *every* problem (unknown key with a did-you-mean, wrong
type, bad value), `check_semantics` (checks.py) adds the problems across fields, and one
`RecipeError` lists them all. Nothing after loading sees a `DictConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpt_cli.config.checks import check_semantics
from cpt_cli.config.schema import Recipe, Size, parse_size, to_plain
from cpt_cli.errors import RecipeError


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `KEY=VALUE` overrides, validate everything, return a Recipe."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe: pass the path of a YAML recipe "
                          "file (see recipes/ for examples).")
    if not path.is_file():
        raise RecipeError(f"Recipe file not found: {path}. Pass the path of a YAML recipe "
                          "(see recipes/ for examples).")
    try:
        # OmegaConf parses with a safe YAML loader: no Python objects are ever constructed.
        base = OmegaConf.load(path)
    except (OmegaConfBaseException, Exception) as err:  # yaml.YAMLError and friends
        raise RecipeError(f"{path} is not valid YAML: {err}".rstrip()) from None
    if not OmegaConf.is_dict(base):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, model:, data:, train:, ...)")
    return recipe_from_config(base, overrides, base_dir=path.resolve().parent, origin=str(path))


def recipe_from_config(config: Any, overrides: list[str] | tuple[str, ...] = (), *,
                       base_dir: str | Path = ".", origin: str = "recipe") -> Recipe:
    """Validate a mapping (dict or DictConfig) plus overrides into a Recipe."""
    problems: list[str] = []
    cfg = OmegaConf.create(config) if not OmegaConf.is_config(config) else config
    apply_overrides(cfg, overrides, problems)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise RecipeError(f"{origin}: could not resolve an interpolation: {err}\n"
                          "An interpolation such as ${data.seq_len} refers to a key written in "
                          "the recipe or an override; schema defaults are not visible to it."
                          ) from None
    if not isinstance(plain, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping")
    plain.setdefault("base_dir", str(base_dir))
    failed: list[str] = []
    recipe = build(Recipe, plain, "", problems, failed)
    if recipe is not _FAILED:
        semantic: list[str] = []
        check_semantics(recipe, semantic)
        # A field that failed its type check was replaced by its default: skip the cross-field
        # problems that mention it (or a parent of it), which would only repeat the first report.
        for problem in semantic:
            key = problem.split(":", 1)[0]
            if not any(f.startswith(key) or key.startswith(f) for f in failed if f):
                problems.append(problem)
    if problems:
        raise RecipeError(f"{origin} has {len(problems)} problem{'s' * (len(problems) > 1)}:",
                          problems)
    return recipe


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...], problems: list[str]) -> None:
    """Merge `KEY=VALUE` overrides into `cfg` in place; a problem per override that is not one."""
    for item in overrides:
        if "=" not in item or not item.partition("=")[0].strip():
            problems.append(f"override {item!r}: write overrides as KEY=VALUE, e.g. "
                            "train.optimizer.lr=1e-4")
            continue
        key, _, text = item.partition("=")
        try:
            # The value is parsed as YAML, as OmegaConf's dotlist does; `update` (not a merge of
            # a dotlist) also reaches into lists: data.sources.0.weight=0.5.
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]),
                                           resolve=False)["value"]
            OmegaConf.update(cfg, key.strip(), value, merge=True, force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError, KeyError,
                IndexError) as err:
            reason = " ".join(str(err).splitlines()[0].split()) or type(err).__name__
            problems.append(f"override {item!r}: {reason}; write KEY=VALUE with a dotted key "
                            "(list items by index: data.sources.0.weight=0.5)")


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML, exactly as trained."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(recipe))))


# --------------------------------------------------------------------------------------------
# build: plain values to schema types, every problem collected
# --------------------------------------------------------------------------------------------


def build(tp: Any, value: Any, path: str, problems: list[str],
          failed: list[str] | None = None) -> Any:
    """Convert `value` to type `tp`, appending a message per problem; `_FAILED` on failure.

    A dataclass with a bad field is still built, with the field's default (or a placeholder), so
    that the checks across fields can run too and every problem is reported at once; the keys that
    failed are collected in `failed` so those checks do not repeat them.
    """
    failed = [] if failed is None else failed
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems, failed)
    if origin in (Union, types.UnionType):
        return _build_union(tp, value, path, problems, failed)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{path}: {value!r} is not accepted; use one of "
                        f"{', '.join(repr(a) for a in allowed)}{hint}")
        return _FAILED
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return _FAILED
        (item_tp,) = typing.get_args(tp)
        items = [build(item_tp, v, _key(path, i), problems, failed) for i, v in enumerate(value)]
        return _FAILED if any(i is _FAILED for i in items) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return _FAILED
        return dict(value)
    return _build_scalar(tp, value, path, problems)


_FAILED = object()


def _build_dataclass(tp: Any, value: Any, path: str, problems: list[str],
                     failed: list[str]) -> Any:
    """A schema class from a mapping: unknown keys (with a did-you-mean), missing required keys
    and every field's own problems are all reported; a failed field takes its default."""
    if not isinstance(value, dict):
        problems.append(f"{path or 'recipe'}: expected {_type_name(tp)}, got {value!r}")
        failed.append(path)
        return _FAILED
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    kwargs: dict[str, Any] = {}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; accepted keys: {', '.join(f for f in fields if f != 'base_dir')}"
            problems.append(f"{_key(path, key)}: unknown key{hint}")
    for name, f in fields.items():
        key = _key(path, name)
        if name in value:
            built = build(hints[name], value[name], key, problems, failed)
            if built is _FAILED:
                failed.append(key)
                if _required(f):
                    kwargs[name] = _placeholder(hints[name])
                continue
            kwargs[name] = built
        elif _required(f):
            problems.append(f"{key}: required ({_type_name(hints[name])})")
            failed.append(key)
            kwargs[name] = _placeholder(hints[name])
    return tp(**kwargs)


def _build_union(tp: Any, value: Any, path: str, problems: list[str], failed: list[str]) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    candidates = [a for a in args if a is not type(None)]
    # Try each member silently; report once with every accepted form.
    for cand in candidates:
        trial: list[str] = []
        built = build(cand, value, path, trial, [])
        if not trial and built is not _FAILED:
            return built
    # One member of the value's own shape (a number for `float | dict`) says best what is wrong.
    same_shape = [c for c in candidates if _shape(c) == _shape(type(value))]
    if len(candidates) == 1 or len(same_shape) == 1:
        return build((same_shape or candidates)[0], value, path, problems, failed)
    problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return _FAILED


def _shape(tp: Any) -> str:
    """mapping, list or scalar: what a YAML value of type `tp` looks like."""
    origin = typing.get_origin(tp) or tp
    if origin is dict or dataclasses.is_dataclass(origin):
        return "mapping"
    return "list" if origin in (list, tuple) else "scalar"


def _build_scalar(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Size, bool, int, float, str or Any. An integer may also be written as a size (`2k`), a
    number as a numeric string, and a string as a number (`name: 7`)."""
    if tp is Size:
        try:
            return Size(parse_size(value))
        except ValueError as err:
            problems.append(f"{path}: {value!r} is not a size: {err}")
            return _FAILED
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true or false, got {value!r}")
        return _FAILED
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError:
                pass
        problems.append(f"{path}: expected an integer, got {value!r}")
        return _FAILED
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        # No setting means anything when infinite or not a number: nan would slip past every
        # comparison (a limit that never trips), inf would ruin the weights at the first step.
        problems.append(f"{path}: expected a finite number, got {value!r}")
        return _FAILED
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return _FAILED
    if tp is Any:
        return value
    raise TypeError(f"schema type {tp!r} at {path} is not supported")  # a bug in the schema


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Size:
        return "a size (100k, 50M, 2B)"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(item) else \
            f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _key(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _placeholder(tp: Any) -> Any:
    """A stand-in for a required field that failed, so the cross-field checks can still run."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, {}, "", [], [])
    if origin is list:
        return []
    if origin is dict or tp is dict:
        return {}
    return {str: "", int: 0, float: 0.0, bool: False}.get(tp)
