"""The plan stage: the width of every slice point and, on the MLP axis, every layer's kept MLP neurons."""

from __future__ import annotations

from types import SimpleNamespace

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import RunDir

from .common import config_of
from .inspect import load_inspected

#: the stage (its log label and Prefect task name; tasks/stages.py)
NAME = "plan"


@task(name=NAME, cache_policy=NO_CACHE, persist_result=False)
def plan_task(inspect: dict, recipe: dict) -> list[int]:
    """Width of every slice point (``dotresize.api.plan_widths`` on the source's dimensions)."""
    from dotresize.api import plan_widths

    shape = SimpleNamespace(hidden_size=inspect["hidden_size"], num_points=inspect["num_points"],
                            num_attention_heads=inspect["num_attention_heads"], family=inspect.get("family"))
    return plan_widths(shape, config_of(recipe))


def plan_mlp_task(run: RunDir, inspect: dict, recipe: dict) -> list[int]:
    """Kept intermediate neurons of every layer (``dotresize.mlp.model.plan_mlp_widths``)."""
    from dotresize.mlp.model import plan_mlp_widths

    size = inspect.get("intermediate_size")
    if size is None:  # an inspect stage of an earlier version: its stored config has it
        from dotresize.adapters import intermediate_size_of

        size = intermediate_size_of(load_inspected(run, inspect)[0])
    if not size:
        from dotresize.errors import InvalidConfigError

        raise InvalidConfigError(f"this {inspect.get('family', '')} model's config has no intermediate_size: the MLP "
                                 "axis (mlp_ratio / mlp_widths) needs one; compress without it")
    return plan_mlp_widths(config_of(recipe), int(size), int(inspect["num_layers"]))


__all__ = ["plan_task", "plan_mlp_task"]
