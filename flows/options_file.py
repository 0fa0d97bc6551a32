"""``dotresize compress --recipe FILE``: a recipe (the watch's format, :mod:`flows.recipe`) run once.

The recipe is validated as the watch validates it (one line per bad key) and must name one ratio. It becomes
compress options placed before the command line's own, so argparse checks every value as if it had been typed and
an option given on the command line wins. Config fields with an option of their own become that option
(``config.mlp_ratio`` -> ``--mlp-ratio``, ``config.dot.epsilon`` -> ``--epsilon``); any other config field becomes
``--set KEY=VALUE`` (which the command line can also give).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECIPE_OPTION = "--recipe"

#: config fields (dotted) with an option of their own
CONFIG_FLAGS = {
    "batch_size": "--batch-size", "round_to": "--round-to", "slice_head": "--slice-head",
    "outlier_tokens": "--outlier-tokens", "mlp_ratio": "--mlp-ratio",
    "dot.epsilon": "--epsilon", "dot.cost": "--cost", "dot.cost_normalization": "--cost-normalization",
    "dot.marginals": "--marginals", "dot.targets": "--targets", "dot.decompression": "--decompression",
    "dot.solver": "--solver",
    "mlp.method": "--mlp-method", "mlp.keep_rule": "--mlp-keep-rule", "mlp.ridge": "--mlp-ridge",
}
SWITCHES = ("--slice-head", "--ppl")
#: config fields that are groups of options
GROUPS = ("dot", "mlp", "mlp.dot")
CALIBRATION_FLAGS = {"data": "--calib-data", "samples": "--calib-samples", "seqlen": "--calib-seqlen",
                     "seed": "--seed"}
EVALUATION_FLAGS = {"ctx": "--ctx", "max_windows": "--max-windows", "limit": "--limit"}


class RecipeFileError(ValueError):
    """A recipe file that cannot be used; its message is one line that says what to fix."""


def _recipe_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of ``--recipe`` and argv without it (None when absent)."""
    out, path, skip = [], None, False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == RECIPE_OPTION:
            if index + 1 >= len(argv):
                raise RecipeFileError("--recipe needs a file: --recipe recipes/NAME.yaml")
            path, skip = argv[index + 1], True
        elif arg.startswith(RECIPE_OPTION + "="):
            path = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return path, out


def _flat(config: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of a config mapping; nested option groups (dot, mlp, mlp.dot) are walked into."""
    out = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flat(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, list, tuple)) or value is None else str(value)


def _option(flag: str, value: Any) -> list[str]:
    if flag in SWITCHES:
        return [flag] if value else []
    return [flag, _text(value)]


def recipe_arguments(path: str | Path) -> list[str]:
    """The compress options a recipe file stands for."""
    from .recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(str(path))
    except RecipeError as error:
        raise RecipeFileError(str(error)) from None
    if len(recipe.variants) != 1:
        raise RecipeFileError(f"recipe {path} lists {len(recipe.variants)} ratios: compress runs one (give "
                              "ratio: R), the watch runs every one")
    data = recipe.data
    arguments = ["--ratio", _text(recipe.variants[0].ratio)]
    for key in ("method", "mode", "layout"):
        if key in data:
            arguments += ["--" + key, str(data[key])]
    for key, value in (data.get("calibration") or {}).items():
        arguments += _option(CALIBRATION_FLAGS[key], value)
    evaluation = data.get("evaluation") or {}
    for key, value in evaluation.items():
        if key == "ppl":
            arguments += _option("--ppl", value)
        elif key == "tasks" and value:
            arguments += ["--tasks", value if isinstance(value, str) else ",".join(value)]
        elif key in EVALUATION_FLAGS and value is not None:
            arguments += [EVALUATION_FLAGS[key], _text(value)]
    if data.get("register_name"):
        arguments += ["--register-name", str(data["register_name"])]
    for key, value in _flat(data.get("config") or {}):
        flag = CONFIG_FLAGS.get(key)
        arguments += _option(flag, value) if flag else ["--set", f"{key}={json.dumps(value)}"]
    return arguments


def expand_recipe(argv: list[str]) -> list[str]:
    """``argv`` with ``compress --recipe FILE`` replaced by the recipe's options, before the command line's."""
    if "compress" not in argv:
        return argv
    command = argv.index("compress")
    path, rest = _recipe_path(argv[command + 1:])
    if path is None:
        return argv
    return argv[:command + 1] + recipe_arguments(path) + rest


def apply_settings(data: dict, settings: list[str]) -> dict:
    """``--set KEY=VALUE`` (dotted keys, YAML/JSON values) applied in order to a config's plain form."""
    import yaml

    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {setting!r}: write KEY=VALUE (e.g. --set mlp.dot.epsilon=0.1)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"--set {setting!r}: the value is not valid YAML/JSON") from None
        if key.strip() in GROUPS and not isinstance(value, dict):
            raise ValueError(f"--set {setting!r}: {key.strip()} is a group of options: set one of them "
                             f"(--set {key.strip()}.NAME=VALUE)")
        target, parts = data, key.strip().split(".")
        for part in parts[:-1]:
            nested = target.get(part)
            if nested is None:
                nested = target[part] = {}
            if not isinstance(nested, dict):
                raise ValueError(f"--set {setting!r}: {part} is not a group of options")
            target = nested
        target[parts[-1]] = value
    return data


__all__ = ["expand_recipe", "recipe_arguments", "apply_settings", "RecipeFileError", "RECIPE_OPTION"]
