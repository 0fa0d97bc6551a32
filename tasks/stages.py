"""The stages of a compression: one table, one module per stage.

Every stage ``<name>`` is a Prefect task (or tasks: sequential mode, zero-shot and speed evaluation are further
tasks of their stage) named ``<name>`` in ``tasks/<name>.py`` (a hyphen in a name would be an underscore). Its
log label is ``<name>[<item>]`` and its manifests are ``stages/<name>/...``. ``code_version`` is part of every
content key the stage computes: bump it when the stage's output for the same inputs changes, and every run
recomputes that stage (and what depends on it) instead of reusing a stale output. ``outputs`` names the entries
of the run layout (:mod:`storage.rundir`) the stage writes; ``key_inputs`` what its content key is made of.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from storage import rundir as layout


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name, code version, what its key is made of, and what it writes."""

    name: str
    code_version: str | None      # None: the stage computes no content key (it writes nothing reusable)
    key_inputs: tuple[str, ...]
    outputs: tuple[str, ...]      # run-layout entries (storage.rundir), patterns with <item> for per-item outputs
    tasks: tuple[str, ...]        # the task objects' names in the stage's module

    @property
    def module_name(self) -> str:
        return "tasks." + self.name.replace("-", "_")

    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    def task_objects(self) -> list:
        module = self.module()
        return [getattr(module, name) for name in self.tasks]


def _item(pattern) -> str:
    return pattern("<item>")


#: the pipeline's stages, in the order a parallel per-point run meets them
STAGES: tuple[Stage, ...] = (
    Stage("source", None, ("model files' sha256", "calibration text"), (), ("resolve_source_task",)),
    Stage("inspect", "1", ("source digest", "trust_remote_code"), (layout.INSPECT,), ("inspect_task",)),
    Stage("calibration", "1", ("source digest", "text sha256", "samples", "seqlen", "seed"),
          (layout.CALIBRATION_IDS, layout.CALIBRATION), ("calibration_task",)),
    Stage("plan", None, ("inspect", "config"), (), ("plan_task",)),
    Stage("capture", "2", ("inspect", "calibration", "batches", "previous layer's capture / bases (sequential)"),
          (layout.ACTIVATIONS,), ("capture_task", "sequential_capture_task")),
    Stage("mlp", "1", ("capture or calibration", "width", "method", "keep rule or set"),
          (_item(layout.mlp_file),), ("mlp_task", "mlp_sequential_task")),
    Stage("pool", "2", ("captures", "pooling", "statistics"), (layout.ACTIVATIONS,), ("pool_task",)),
    Stage("solve", "2", ("capture", "statistics", "method and its options", "width", "device"),
          (_item(layout.basis_file), _item(layout.basis_meta_file)), ("solve_task",)),
    Stage("absorb", "2", ("inspect", "bases", "layout", "dtype", "device", "mlp"), (_item(layout.layer_file),),
          ("absorb_task",)),
    Stage("export", "3", ("inspect", "config", "widths", "ends' bases", "layers", "dtype"),
          (layout.ENDS, layout.MODEL), ("export_task",)),
    Stage("evaluate", "1", ("model sha256", "protocol", "precision"),
          (layout.eval_file("<item>"), layout.eval_file("<item>", "source")),
          ("evaluate_task", "zero_shot_task", "speed_task")),
    Stage("lineage", None, ("stage manifests", "evaluations", "tags"), (layout.LINEAGE,), ("lineage_task",)),
    Stage("register", None, ("export", "evaluations", "lineage sha256"), (layout.MLFLOW,), ("register_task",)),
)

STAGE_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def code_version(stage: str) -> str:
    """The code version of ``stage`` (part of its content keys)."""
    version = STAGE_BY_NAME[stage].code_version
    if version is None:
        raise KeyError(f"stage {stage!r} computes no content key")
    return version


__all__ = ["Stage", "STAGES", "STAGE_BY_NAME", "code_version"]
