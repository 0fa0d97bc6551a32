"""Recipes: what the watch flow does to every new checkpoint, as a small YAML file.

```yaml
recipe_version: 1
method: dot                  # dot | pca | prune
ratio: 0.2                   # or  ratios: [0.1, 0.2, 0.3]  (one compression per ratio); 0 with config.mlp_ratio
mode: parallel               # parallel | sequential
layout: per-point            # per-point | global
config:                      # any other CompressionConfig field (nested dot / mlp options allowed)
  dot: {epsilon: 0.05}
  mlp_ratio: 0.3             # the MLP axis: fraction of intermediate neurons removed
  mlp: {method: lsq, ridge: 0.1}
calibration: {data: wikitext2, samples: 64, seqlen: 256, seed: 42}
evaluation: {ppl: true, ctx: 256, max_windows: 100, source: false, tasks: [], limit: null}
register_name: dotresize-my-run   # optional: registered model name in MLflow
```

A recipe expands into one :class:`Variant` per ratio. A variant's hash is the sha256 of its canonical, fully
resolved form (every default made explicit, so writing a default out does not change it); ``register_name`` is
not part of it. Every bad recipe raises :class:`RecipeError` with one line naming the key and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotresize.errors import DotResizeError
from storage import digest_of_digests
from storage.records import WATCH_RECIPE_VERSION, WatchVariant

#: the version of the recipe file format (``recipe_version:``; not the run recipe's, see storage/records.py)
RECIPE_FORMAT = WATCH_RECIPE_VERSION
#: config keys set by the recipe's own top-level keys (not allowed under ``config:``)
_RESERVED_CONFIG = ("method", "ratio", "mode", "layout", "seed", "version")


class RecipeError(DotResizeError, ValueError):
    """A recipe file is missing, unreadable or holds an unknown key or a bad value."""


# --- checks: each takes (value, key, origin) and returns the value to use, or raises RecipeError --------------------
Check = Callable[[Any, str, "str | None"], Any]


def _where(origin: str | None) -> str:
    return f"recipe {origin}" if origin else "recipe"


def _fail(origin: str | None, text: str) -> RecipeError:
    return RecipeError(f"{_where(origin)}: {text}")


def _integer(minimum: int | None, what: str | None = None) -> Check:
    """An integer (not a bool) >= ``minimum``; ``what`` words the error (default: positive / non-negative)."""
    def check(value: Any, key: str, origin: str | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise _fail(origin, f"{key} must be {what or ('a positive' if minimum else 'a non-negative') + ' integer'}"
                        + ("" if what else f", got {value!r}"))
        return value
    return check


def _optional(check: Check) -> Check:
    return lambda value, key, origin: None if value is None else check(value, key, origin)


def _flag(value: Any, key: str, origin: str | None) -> bool:
    if not isinstance(value, bool):
        raise _fail(origin, f"{key} must be true or false")
    return value


def _data(value: Any, key: str, origin: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(origin, f"{key} must be wikitext2 or a .txt/.jsonl file path")
    if value not in ("wikitext2",) and origin and not Path(value).is_absolute():
        # a relative calibration file is relative to the recipe file, not to wherever the flow runs
        candidate = (Path(origin).parent / value).resolve()
        if candidate.exists():
            return str(candidate)
    return value


def _tasks(value: Any, key: str, origin: str | None) -> list[str]:
    tasks = value or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise _fail(origin, f"{key} must be a list of task names")
    return tasks


def _ratio(value: Any, origin: str | None) -> float:
    """A ratio in (0, 1), or 0 (the residual stream untouched: config.mlp_ratio must then reduce the MLPs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0) \
            or not math.isfinite(float(value)):
        raise _fail(origin, f"ratio must be a number in (0, 1) (the fraction of width removed), got {value!r}")
    return float(value)


def _recipe_version(value: Any, key: str, origin: str | None) -> int:
    if value != RECIPE_FORMAT:
        raise _fail(origin, f"{key} {value!r} is not supported (this dotresize reads {RECIPE_FORMAT})")
    return value


def _ratios(value: Any, key: str, origin: str | None) -> list[float]:
    if not isinstance(value, list) or not value:
        raise _fail(origin, f"{key} must be a non-empty list of numbers in (0, 1)")
    return [_ratio(r, origin) for r in value]


def _config(value: Any, key: str, origin: str | None) -> dict:
    value = value or {}
    if not isinstance(value, dict):
        raise _fail(origin, f"{key} must be a mapping of CompressionConfig fields")
    reserved = sorted(set(value) & set(_RESERVED_CONFIG))
    if reserved:
        raise _fail(origin, f"{key}.{reserved[0]} is set by the recipe's top-level keys (method, ratio, mode, layout, "
                    "calibration.seed)")
    return value


def _register_name(value: Any, key: str, origin: str | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(origin, f"{key} must be a non-empty string")
    return value


def _anything(value: Any, key: str, origin: str | None) -> Any:
    return value  # checked later, by the compression config (method, mode, layout) or not at all (name, description)


@dataclass(frozen=True)
class Field:
    """One key of a recipe: its name, its default (used when absent) and the check of a given value."""

    name: str
    default: Any
    check: Check


_ABSENT = object()

#: the sections' keys, defaults and checks (in the order the errors list them)
CALIBRATION_FIELDS = (
    Field("data", "wikitext2", _data),
    Field("samples", 64, _integer(1)),
    Field("seqlen", 256, _integer(1)),
    Field("seed", 42, _integer(None, "an integer")),
)
EVALUATION_FIELDS = (
    Field("ppl", True, _flag),
    Field("ctx", 256, _integer(1)),
    Field("max_windows", 100, _integer(0)),
    Field("source", False, _flag),
    Field("tasks", [], _tasks),
    Field("limit", None, _optional(_integer(1))),
)
CALIBRATION_DEFAULTS = {f.name: f.default for f in CALIBRATION_FIELDS}
EVALUATION_DEFAULTS = {f.name: f.default for f in EVALUATION_FIELDS}


def _section(fields: tuple[Field, ...]) -> Check:
    """A mapping of ``fields`` (missing ones at their defaults), each value checked."""
    def check(value: Any, key: str, origin: str | None) -> dict:
        value = value or {}
        names = [f.name for f in fields]
        if not isinstance(value, dict):
            raise _fail(origin, f"{key} must be a mapping ({', '.join(names)}), got {value!r}")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise _fail(origin, f"unknown key {key}.{unknown[0]} (known: {', '.join(names)})")
        return {f.name: f.check(value.get(f.name, f.default), f"{key}.{f.name}", origin) for f in fields}
    return check


#: the recipe's top-level keys, in the order they are checked (``ratio`` and ``ratios``: exactly one of them)
FIELDS = (
    Field("recipe_version", RECIPE_FORMAT, _recipe_version),
    Field("ratio", _ABSENT, _optional(lambda v, k, o: [_ratio(v, o)])),
    Field("ratios", _ABSENT, _ratios),
    Field("method", "dot", _anything),
    Field("mode", "parallel", _anything),
    Field("layout", "per-point", _anything),
    Field("config", None, _config),
    Field("calibration", None, _section(CALIBRATION_FIELDS)),
    Field("evaluation", None, _section(EVALUATION_FIELDS)),
    Field("register_name", None, _optional(_register_name)),
    Field("name", None, _anything),
    Field("description", None, _anything),
)
TOP_KEYS = ("recipe_version", "method", "ratio", "ratios", "mode", "layout", "config", "calibration",
            "evaluation", "register_name", "name", "description")


@dataclass(frozen=True)
class Variant:
    """One compression a recipe asks for: the resolved recipe (what is hashed) and its hash."""

    resolved: dict
    sha256: str
    register_name: str | None

    @property
    def ratio(self) -> float:
        return self.resolved["ratio"]

    def record(self) -> WatchVariant:
        """The resolved recipe as its typed record (:class:`storage.records.WatchVariant`)."""
        return WatchVariant.from_dict(self.resolved)

    def compress_kwargs(self) -> dict:
        """Keyword arguments of :func:`flows.compress.compress_flow` for this variant."""
        r = self.resolved
        calibration, evaluation = r["calibration"], r["evaluation"]
        overrides = {k: v for k, v in r["config"].items() if k not in _RESERVED_CONFIG}
        kwargs = dict(ratio=r["ratio"], method=r["method"], mode=r["mode"], layout=r["layout"],
                      calib_data=calibration["data"], calib_samples=calibration["samples"],
                      calib_seqlen=calibration["seqlen"], seed=calibration["seed"], config_overrides=overrides,
                      ppl=evaluation["ppl"], ppl_source=evaluation["ppl"] and evaluation["source"],
                      ppl_ctx=evaluation["ctx"], ppl_max_windows=evaluation["max_windows"])
        if evaluation["tasks"]:
            kwargs.update(tasks=list(evaluation["tasks"]), limit=evaluation["limit"],
                          tasks_source=evaluation["source"])
        return kwargs


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str | None
    variants: tuple[Variant, ...]
    data: dict


def _values(data: Any, origin: str | None) -> dict[str, Any]:
    """Every top-level field's checked value (absent ones at their defaults), by the table :data:`FIELDS`."""
    if not isinstance(data, dict):
        raise _fail(origin, f"expected a mapping of recipe keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise _fail(origin, f"unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    values = {}
    for f in FIELDS:
        if f.name == "ratio" and ("ratio" in data) == ("ratios" in data):
            raise _fail(origin, "give exactly one of ratio (a number) or ratios (a list)")
        value = data.get(f.name, f.default)
        values[f.name] = value if value is _ABSENT else f.check(value, f.name, origin)
        if f.name == "ratios":
            values["ratios"] = ratios = values["ratio"] if value is _ABSENT else values["ratios"]
            if len(set(ratios)) != len(ratios):
                raise _fail(origin, "ratios lists a ratio twice")
    return values


def parse_recipe(data: Any, origin: str | None = None) -> Recipe:
    """Validate a recipe mapping and expand it into its variants."""
    from flows.compress import build_config

    values = _values(data, origin)
    calibration, evaluation = values["calibration"], values["evaluation"]
    variants = []
    for ratio in values["ratios"]:
        try:
            compression = build_config(ratio=ratio, method=values["method"], mode=values["mode"],
                                       layout_name=values["layout"], seed=calibration["seed"],
                                       overrides=values["config"])
        except DotResizeError as error:
            raise _fail(origin, str(error)) from None
        except (TypeError, ValueError) as error:
            raise _fail(origin, f"bad value in config ({error})") from None
        if not compression.residual_active and not compression.mlp_active:
            raise _fail(origin, "ratio 0 compresses nothing: give a ratio in (0, 1), or config.mlp_ratio to reduce "
                        "the MLPs only")
        resolved = WatchVariant(method=compression.method, ratio=ratio, mode=compression.mode,
                                layout=compression.layout, config=compression.to_dict(), calibration=calibration,
                                evaluation=evaluation).to_dict()
        variants.append(Variant(resolved, digest_of_digests(resolved), values["register_name"]))
    name = str(values["name"] or (Path(origin).stem if origin else "recipe"))
    return Recipe(name=name, path=origin, variants=tuple(variants), data=dict(data))


def load_recipe(recipe: str | dict | Recipe) -> Recipe:
    """A recipe from a YAML file path, a mapping, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    import yaml

    path = Path(str(recipe)).expanduser()
    if not path.is_file():
        raise RecipeError(f"recipe {recipe} does not exist: pass a YAML recipe file (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}") from None
    return parse_recipe(data, str(path.resolve()))


__all__ = ["Recipe", "Variant", "RecipeError", "load_recipe", "parse_recipe", "RECIPE_FORMAT", "FIELDS",
           "CALIBRATION_FIELDS", "EVALUATION_FIELDS", "Field"]
