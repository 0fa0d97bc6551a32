"""Thin Prefect tasks, one module per stage (``tasks/<stage>.py``, listed in :data:`tasks.stages.STAGES`): each
calls dotresize/ and storage/ and returns a small manifest (never tensors).

Every stage task computes its stage's content key, reuses a complete and verified output with that key (logging
``reused <stage> <key[:12]>``) or computes it (logging ``computing <stage> <key[:12]> (why)``), writes its
outputs atomically with their digests and its manifest last. The same key and completion check are the stage
tasks' Prefect cache policy (:mod:`tasks.cache`): a reused stage's task run is Cached in Prefect, with a JSON
result record in the run directory.
"""

from .absorb import absorb_task
from .calibration import calibration_task
from .capture import capture_task, sequential_capture_task
from .evaluate import evaluate_task, speed_task, zero_shot_task
from .export import export_task
from .inspect import inspect_task
from .lineage import lineage_task
from .mlp import mlp_sequential_task, mlp_task
from .plan import plan_mlp_task, plan_task
from .pool import pool_task
from .register import register_task
from .solve import solve_task
from .source import resolve_source_task
from .stages import STAGES

__all__ = ["resolve_source_task", "inspect_task", "calibration_task", "plan_task", "plan_mlp_task", "capture_task",
           "sequential_capture_task", "mlp_task", "mlp_sequential_task", "pool_task", "solve_task", "absorb_task",
           "export_task", "evaluate_task", "zero_shot_task", "speed_task", "lineage_task", "register_task", "STAGES"]
