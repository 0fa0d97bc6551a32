"""Thin Prefect tasks: each calls dotresize/ and storage/ and returns a small manifest (never tensors).

Every task computes its stage's content key, reuses a complete and verified output with that key (logging
``reused <stage> <key[:12]>``) or computes it (logging ``computing <stage> <key[:12]> (why)``), writes its
outputs atomically with their digests and its manifest last. The same key and completion check are the stage
tasks' Prefect cache policy (:mod:`tasks.cache`): a reused stage's task run is Cached in Prefect, with a JSON
result record in the run directory.
"""

from .assemble import absorb_task, evaluate_task, export_task, speed_task, zero_shot_task
from .capture import capture_task, sequential_capture_task
from .common import CODE_VERSIONS
from .mlp import mlp_sequential_task, mlp_task
from .prepare import calibration_task, inspect_task, plan_mlp_task, plan_task, resolve_source_task
from .solve import pool_task, solve_task

__all__ = ["resolve_source_task", "calibration_task", "inspect_task", "plan_task", "capture_task",
           "sequential_capture_task", "mlp_task", "mlp_sequential_task", "plan_mlp_task", "pool_task", "solve_task", "absorb_task", "export_task",
           "evaluate_task", "zero_shot_task", "speed_task", "CODE_VERSIONS"]
