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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotresize.errors import DotResizeError
from storage import digest_of_digests

RECIPE_FORMAT = 1
TOP_KEYS = ("recipe_version", "method", "ratio", "ratios", "mode", "layout", "config", "calibration",
            "evaluation", "register_name", "name", "description")
CALIBRATION_DEFAULTS = {"data": "wikitext2", "samples": 64, "seqlen": 256, "seed": 42}
EVALUATION_DEFAULTS = {"ppl": True, "ctx": 256, "max_windows": 100, "source": False, "tasks": [], "limit": None}
#: config keys set by the recipe's own top-level keys (not allowed under ``config:``)
_RESERVED_CONFIG = ("method", "ratio", "mode", "layout", "seed", "version")


class RecipeError(DotResizeError, ValueError):
    """A recipe file is missing, unreadable or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class Variant:
    """One compression a recipe asks for: the resolved recipe (what is hashed) and its hash."""

    resolved: dict
    sha256: str
    register_name: str | None

    @property
    def ratio(self) -> float:
        return self.resolved["ratio"]

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


def _where(origin: str | None) -> str:
    return f"recipe {origin}" if origin else "recipe"


def _positive_int(value: Any, key: str, origin: str | None, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise RecipeError(f"{_where(origin)}: {key} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"integer, got {value!r}")
    return value


def _section(data: dict, key: str, defaults: dict, origin: str | None) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise RecipeError(f"{_where(origin)}: {key} must be a mapping ({', '.join(defaults)}), got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise RecipeError(f"{_where(origin)}: unknown key {key}.{unknown[0]} (known: {', '.join(defaults)})")
    return {**defaults, **value}


def _ratio(value: Any, origin: str | None) -> float:
    """A ratio in (0, 1), or 0 (the residual stream untouched: config.mlp_ratio must then reduce the MLPs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0) \
            or not math.isfinite(float(value)):
        raise RecipeError(f"{_where(origin)}: ratio must be a number in (0, 1) (the fraction of width removed), "
                          f"got {value!r}")
    return float(value)


def parse_recipe(data: Any, origin: str | None = None) -> Recipe:
    """Validate a recipe mapping and expand it into its variants."""
    from flows.compress import build_config

    if not isinstance(data, dict):
        raise RecipeError(f"{_where(origin)}: expected a mapping of recipe keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise RecipeError(f"{_where(origin)}: unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    version = data.get("recipe_version", RECIPE_FORMAT)
    if version != RECIPE_FORMAT:
        raise RecipeError(f"{_where(origin)}: recipe_version {version!r} is not supported (this dotresize reads "
                          f"{RECIPE_FORMAT})")
    if ("ratio" in data) == ("ratios" in data):
        raise RecipeError(f"{_where(origin)}: give exactly one of ratio (a number) or ratios (a list)")
    if "ratios" in data:
        if not isinstance(data["ratios"], list) or not data["ratios"]:
            raise RecipeError(f"{_where(origin)}: ratios must be a non-empty list of numbers in (0, 1)")
        ratios = [_ratio(r, origin) for r in data["ratios"]]
    else:
        ratios = [_ratio(data["ratio"], origin)]
    if len(set(ratios)) != len(ratios):
        raise RecipeError(f"{_where(origin)}: ratios lists a ratio twice")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise RecipeError(f"{_where(origin)}: config must be a mapping of CompressionConfig fields")
    reserved = sorted(set(config) & set(_RESERVED_CONFIG))
    if reserved:
        raise RecipeError(f"{_where(origin)}: config.{reserved[0]} is set by the recipe's top-level keys "
                          "(method, ratio, mode, layout, calibration.seed)")
    calibration = _section(data, "calibration", CALIBRATION_DEFAULTS, origin)
    evaluation = _section(data, "evaluation", EVALUATION_DEFAULTS, origin)
    if not isinstance(calibration["data"], str) or not calibration["data"]:
        raise RecipeError(f"{_where(origin)}: calibration.data must be wikitext2 or a .txt/.jsonl file path")
    _positive_int(calibration["samples"], "calibration.samples", origin)
    _positive_int(calibration["seqlen"], "calibration.seqlen", origin)
    if isinstance(calibration["seed"], bool) or not isinstance(calibration["seed"], int):
        raise RecipeError(f"{_where(origin)}: calibration.seed must be an integer")
    for flag in ("ppl", "source"):
        if not isinstance(evaluation[flag], bool):
            raise RecipeError(f"{_where(origin)}: evaluation.{flag} must be true or false")
    _positive_int(evaluation["ctx"], "evaluation.ctx", origin)
    _positive_int(evaluation["max_windows"], "evaluation.max_windows", origin, allow_zero=True)
    tasks = evaluation["tasks"] or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise RecipeError(f"{_where(origin)}: evaluation.tasks must be a list of task names")
    evaluation["tasks"] = tasks
    if evaluation["limit"] is not None:
        _positive_int(evaluation["limit"], "evaluation.limit", origin)
    register_name = data.get("register_name")
    if register_name is not None and (not isinstance(register_name, str) or not register_name.strip()):
        raise RecipeError(f"{_where(origin)}: register_name must be a non-empty string")
    if calibration["data"] not in ("wikitext2",) and origin and not Path(calibration["data"]).is_absolute():
        # a relative calibration file is relative to the recipe file, not to wherever the flow runs
        candidate = (Path(origin).parent / calibration["data"]).resolve()
        if candidate.exists():
            calibration["data"] = str(candidate)

    variants = []
    for ratio in ratios:
        try:
            compression = build_config(ratio=ratio, method=data.get("method", "dot"),
                                       mode=data.get("mode", "parallel"),
                                       layout_name=data.get("layout", "per-point"), seed=calibration["seed"],
                                       overrides=config)
        except DotResizeError as error:
            raise RecipeError(f"{_where(origin)}: {error}") from None
        except (TypeError, ValueError) as error:
            raise RecipeError(f"{_where(origin)}: bad value in config ({error})") from None
        if not compression.residual_active and not compression.mlp_active:
            raise RecipeError(f"{_where(origin)}: ratio 0 compresses nothing: give a ratio in (0, 1), or "
                              "config.mlp_ratio to reduce the MLPs only")
        resolved = {"recipe_version": RECIPE_FORMAT, "method": compression.method, "ratio": ratio,
                    "mode": compression.mode, "layout": compression.layout, "config": compression.to_dict(),
                    "calibration": dict(calibration), "evaluation": dict(evaluation)}
        variants.append(Variant(resolved, digest_of_digests(resolved), register_name))
    name = str(data.get("name") or (Path(origin).stem if origin else "recipe"))
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


__all__ = ["Recipe", "Variant", "RecipeError", "load_recipe", "parse_recipe", "RECIPE_FORMAT"]
