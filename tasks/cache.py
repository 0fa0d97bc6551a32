"""Prefect's cache machinery over the stages' own content keys: a rerun's reused stages are Cached task runs.

Every stage task computes its content key and reuses a complete, verified output with that key (its completion
marker is written last; see storage/). :class:`StageCache` is the Prefect cache policy of those tasks. Its key is
the URL of the task run's *result record* in the run directory (``.prefect/<stage>/[<name>/]<content key>.json``,
:func:`storage.rundir.task_record_file`), and before handing it to Prefect it runs the stage's own check (the
task's *probe*: the same key computation and completion check the task body starts with):

* outputs complete and verified with this key, and a record of that same computation (same key, same
  ``finished`` time as the completion marker): Prefect reads the record and reports the task run as **Cached**;
  the task body does not run (the log still says ``reused <stage>``);
* outputs missing, stale or corrupted: the record, if any, is deleted first, so Prefect runs the task, which
  recomputes the outputs, and the manifest it returns becomes the new record;
* outputs complete but no record of them (a run directory of an earlier version, a kill between the marker and
  the record, a stage recomputed through ``task.fn``): the record is deleted and the task runs, reuses the
  outputs (after its own check) and records them; the next run is Cached.

A cache hit therefore never stands for outputs that are missing or invalid: correctness rests on the completion
markers, and Prefect reports what they say. The records live in the run directory (an ``s3://`` run's in the
object store), so every Dask worker that can read the run reads them, and losing the run directory loses them.
They are JSON (Prefect's ``JSONSerializer`` without object hooks): nothing is pickled, and a record that is not
plain JSON (a pickle record planted in a shared bucket) is refused, never deserialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem
from prefect.serializers import JSONSerializer

from storage import RunDir
from storage import rundir as layout
from storage.errors import StorageError
from storage.rundir import json_default

from .common import Probe, reused


# --- the records: plain JSON in the run directory ---------------------------------------------------------------
def record_default(value: Any) -> Any:
    """Non-JSON values of a record: as the run directory's manifests write them; an exception (Prefect serialises a
    failed task's exception before handing it to the storage, which drops it) as its type and first line."""
    if isinstance(value, BaseException):
        lines = str(value).strip().splitlines()
        return {"exception": type(value).__name__, "message": lines[0] if lines else ""}
    return json_default(value)


#: the records' serializer: standard JSON both ways, no object hook on reading (nothing is imported or built)
RECORD_SERIALIZER = JSONSerializer(object_encoder=f"{__name__}.record_default", object_decoder=None)


def plain_json_record(content: bytes) -> dict:
    """The parsed result record, if it is one :data:`RECORD_SERIALIZER` wrote; else ``ValueError`` (a record whose
    serializer is pickle, or JSON with an object hook, is never handed to Prefect to deserialise)."""
    record = json.loads(content)
    serializer = (record.get("metadata") or {}).get("serializer") if isinstance(record, dict) else None
    if (not isinstance(serializer, dict) or serializer.get("type") != "json"
            or serializer.get("jsonlib", "json") != "json" or serializer.get("object_decoder") is not None
            or serializer.get("loads_kwargs")):
        raise ValueError("not a plain-JSON result record")
    if not isinstance(record.get("result"), str):
        raise ValueError("a result record without a JSON result")
    return record


def _split(url: str) -> tuple[RunDir, str]:
    """(run directory, relative path) of a record's URL (``<run>/.prefect/...``)."""
    head, sep, tail = str(url).rpartition(f"/{layout.TASK_RECORDS}/")
    if not sep or not head:
        raise ValueError(f"{url} is not a task record of a run directory")
    return RunDir(head), f"{layout.TASK_RECORDS}/{tail}"


class RunDirRecords(WritableFileSystem):
    """Prefect result storage of the stage tasks: a record's path is its whole URL in its run directory (the key
    :class:`StageCache` computes), written like every run file (atomically: temporary + rename, or one PUT)."""

    _block_type_name = "dotresize run-directory records"

    def _resolve_path(self, path: str) -> None:
        """Keys are whole URLs: no base path (Prefect asks; None leaves the key as it is)."""
        return None

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        run, rel = _split(path)
        data = run.read_bytes(rel)  # MissingArtifactError (Prefect: no record) when absent
        plain_json_record(data)
        return data

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> None:
        """Writes a stage's record; a failed task's exception (Prefect keys it by a random id, not by a record
        URL) is not kept: the failure is in the task run's state and the log, and the next run recomputes."""
        try:
            run, rel = _split(path)
        except ValueError:
            return
        run.write_bytes(rel, content)

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> None:
        self.write_path(path, content)


RUN_DIR_RECORDS = RunDirRecords()


def read_record(run: RunDir, rel: str) -> dict | None:
    """The result (a manifest) of the record at ``rel``, or None when there is none or it is not plain JSON."""
    try:
        result = json.loads(plain_json_record(run.read_bytes(rel))["result"])
    except (StorageError, ValueError):
        return None
    return result if isinstance(result, dict) else None


# --- the cache policy -------------------------------------------------------------------------------------------
@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy of a stage task: the key is the URL of the task's result record in the run directory,
    named by the stage's content key; a record only stands while the stage's outputs are complete and verified
    (see the module docstring). ``probe`` takes the task's parameters and returns a :class:`Probe`."""

    probe: Callable[..., Probe] | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if self.probe is None:
            return None
        probe = self.probe(**inputs)
        if probe.ok and _records_this_computation(probe):
            reused(probe.stage, probe.name, probe.key, probe.manifest or {})  # the log line, as the task says it
        else:  # never let a record stand for outputs that are not there (or for another computation of them)
            probe.run.remove(probe.record_file)
        return probe.run.uri(probe.record_file)


def _records_this_computation(probe: Probe) -> bool:
    record = read_record(probe.run, probe.record_file)
    return record is not None and record.get("key") == probe.key and record.get("finished") == probe.finished


def stage_task(probe: Callable[..., Probe], **options: Any):
    """``@task(**options)`` with :class:`StageCache` over ``probe`` and JSON result records in the run directory.

    The records' storage is set after the task is made: its location comes from each key (a URL in the task's run
    directory), so it has no configuration to save on the Prefect server, which ``task(result_storage=...)``
    requires of a block. ``Task.with_options`` passes the storage to that check again and refuses these tasks:
    decorate the function with another ``stage_task`` instead."""

    def decorate(fn):
        made = task(cache_policy=StageCache(probe=probe), persist_result=True, result_serializer=RECORD_SERIALIZER,
                    **options)(fn)
        made.result_storage = RUN_DIR_RECORDS
        return made

    return decorate


__all__ = ["Probe", "StageCache", "RunDirRecords", "RECORD_SERIALIZER", "stage_task", "read_record",
           "plain_json_record"]
