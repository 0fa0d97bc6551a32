"""The pool stage (global layout): every point's statistics pooled into one, for the single global basis."""

from __future__ import annotations

import time

from storage import ActivationStore, RunDir

from .cache import stage_task
from .common import (Probe, computing, config_of, finish_manifest, point_stats, reused, stage_key, statistics_parts,
                     stats_arrays, stored_or)

#: the stage (its log label, manifests and Prefect task name; tasks/stages.py)
NAME = "pool"


def pool_probe(run_url: str, captures: list[dict], recipe: dict, verify: bool = True, **_) -> Probe:
    run = RunDir(run_url)
    config = config_of(recipe)
    key = stage_key(NAME, captures=sorted({c["key"] for c in captures}), pooling=config.global_pooling,
                    statistics=statistics_parts(config))
    store = ActivationStore(run)
    ok, why = store.status("pooled", key, verify=verify)
    if not ok:
        return Probe(run, NAME, None, key, False, why)
    fallback = {"stage": NAME, "name": None, "key": key, "uri": run.uri(), "seconds": 0.0}
    return Probe(run, NAME, None, key, True, manifest={**stored_or(run, NAME, None, key, fallback),
                                                        "digest": store.digest("pooled")})


@stage_task(pool_probe, name=NAME)
def pool_task(run_url: str, captures: list[dict], calibration: dict, recipe: dict, num_points: int,
              verify: bool = True) -> dict:
    """Pool every point's statistics into one (``dotresize.statistics.pool_stats``) for the global basis."""
    from dotresize.statistics import pool_stats

    probe = pool_probe(run_url, captures, recipe, verify)
    if probe.ok:
        return reused(NAME, None, probe.key, probe.manifest)
    run, key, why = probe.run, probe.key, probe.why
    config = config_of(recipe)
    store = ActivationStore(run)
    computing(NAME, None, key, why)
    started = time.time()
    pooled = pool_stats([point_stats(store, p, calibration, config) for p in range(num_points)],
                        config.global_pooling)
    arrays, attrs = stats_arrays(pooled)
    store.create_stats_group("pooled", key=key, stats=arrays, attrs=attrs)
    return finish_manifest(run, NAME, None, key, started, {"digest": store.digest("pooled")})



__all__ = ["pool_task"]
