"""The register stage: the compression logged to MLflow (params, metrics, artifacts, lineage sha256) and its model
registered as a new version; ``mlflow.json`` in the run records it. The logging itself is MLflow composition and
lives in :mod:`flows.mlflow_logging`; this module is its Prefect task.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

#: the stage (its log label and Prefect task name; tasks/stages.py)
NAME = "register"


@task(name=NAME, cache_policy=NO_CACHE, persist_result=False)
def register_task(run_url: str, bundle: dict, register_name: str | None = None) -> dict:
    """Log the compression described by ``bundle`` to MLflow and register its model (once per model sha256)."""
    from flows.mlflow_logging import log_compression

    return log_compression(run_url, bundle, register_name)


__all__ = ["register_task"]
