"""The pipeline's records: typed, versioned, with an exact JSON round trip, and every schema version in one place.

A record is a frozen dataclass; ``to_dict()`` gives exactly the dict the pipeline has always written (so run keys,
digests and the bytes of every file stay as they were) and ``from_dict()`` reads it back; ``from_dict(d).to_dict()
== d`` for every dict the pipeline writes. Reading a record of a version this dotresize does not know raises
:class:`RecordVersionError`, one line that says what to do.

* :class:`StageManifest` -- ``stages/<stage>[/<name>].json``, the completion marker of a stage output;
* :class:`Lineage` -- ``lineage.json`` (in the run directory and in ``model/``): first written by the export stage
  (version :data:`EXPORT_LINEAGE_VERSION`), completed by the lineage stage after the evaluations
  (:data:`LINEAGE_VERSION`);
* :class:`RunRecipe` -- what determines a compression run (config, source, calibration): the run key's input;
* :class:`WatchVariant` -- one resolved variant of a watch recipe (``flows/recipe.py``), whose hash is the
  variant's identity. It shares the key name ``recipe_version`` with the run recipe for compatibility (the key is
  hashed), but its version is its own: :data:`WATCH_RECIPE_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dotresize.errors import DotResizeError

from .errors import StorageError

# --- every version of a stored schema or key scheme ------------------------------------------------------------
#: the stage manifest (``stages/...json``); version 1 writes no version key (absent means 1)
MANIFEST_VERSION = 1
#: the complete lineage.json (after the evaluations)
LINEAGE_VERSION = 2
#: the first lineage.json, written by the export stage (no evaluations, stage outputs or code version yet)
EXPORT_LINEAGE_VERSION = 1
READABLE_LINEAGE_VERSIONS = (EXPORT_LINEAGE_VERSION, LINEAGE_VERSION)
#: the run recipe (``recipe_version``: what the run key is computed from)
RUN_RECIPE_VERSION = 1
#: a watch recipe file and its resolved variants (also spelled ``recipe_version`` in the file)
WATCH_RECIPE_VERSION = 1
#: the scheme of stage content keys (bump to invalidate every stored stage at once)
KEY_SCHEME = 1
#: the scheme of a run's key (``flows/compress.py run_key_of``)
RUN_KEY_VERSION = "1"
#: the scheme of a watch identity (checkpoint content + recipe variant)
IDENTITY_VERSION = "1"
#: the attributes of a point group in the activation store
ACTIVATIONS_FORMAT = 1


class RecordVersionError(DotResizeError, StorageError, ValueError):
    """A stored record has a version (or a shape) this dotresize cannot read."""


#: what to do about a record of another version, by the kind of record
_ADVICE = {
    "stage manifest": "run it with the dotresize that wrote it, or delete the run directory to compute it again",
    "run recipe": "run it with the dotresize that wrote it, or delete the run directory to compute it again",
    "lineage.json": "read it with the dotresize that wrote it (or a newer one)",
    "watch recipe": "use a recipe_version this dotresize reads, or the dotresize the recipe was written for",
}


def _check_version(kind: str, version: Any, readable: tuple, where: str | None) -> int:
    if isinstance(version, bool) or version not in readable:
        place = f"{where}: " if where else ""
        raise RecordVersionError(f"{place}{kind} version {version!r} is not one this dotresize reads "
                                 f"({', '.join(map(str, readable))}): {_ADVICE[kind]}")
    return int(version)


def _mapping(kind: str, data: Any, where: str | None) -> dict:
    if not isinstance(data, Mapping):
        place = f"{where}: " if where else ""
        raise RecordVersionError(f"{place}a {kind} must be a JSON object, got {type(data).__name__}: delete it and "
                                 "run again")
    return dict(data)


def _required(kind: str, data: dict, keys: tuple[str, ...], where: str | None) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        place = f"{where}: " if where else ""
        raise RecordVersionError(f"{place}this {kind} lacks {', '.join(missing)}: it was not written by this "
                                 "dotresize; delete it and run again")


class _Record:
    """JSON helpers every record shares (``to_dict`` / ``from_dict`` are the record's own)."""

    def to_json(self) -> str:
        """The record as the run directory stores it (sorted keys, two-space indent, final newline)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, text: str | bytes, where: str | None = None):
        return cls.from_dict(json.loads(text), where)  # type: ignore[attr-defined]


# --- the stage manifest ------------------------------------------------------------------------------------------
_MANIFEST_CORE = ("stage", "name", "key", "uri", "started", "finished", "seconds")


@dataclass(frozen=True)
class StageManifest(_Record):
    """A stage output's completion marker: ``{stage, name, key, uri, started, finished, seconds, complete}`` and the
    stage's own fields (``body``: ``files`` {relative path: sha256}, ``shapes``, ``digest``, ...), written after
    every file it names. A core field that is None is not in the dict (``name`` always is: None for a stage with
    one output)."""

    stage: str
    name: str | None
    key: str
    uri: str | None = None
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    body: Mapping[str, Any] = field(default_factory=dict)
    complete: bool | None = True
    version: int = MANIFEST_VERSION

    @classmethod
    def finish(cls, *, stage: str, name: str | None, key: str, uri: str, started: float, body: Mapping[str, Any],
               finished: float) -> "StageManifest":
        """The complete manifest of an output computed from ``started`` to ``finished``: the body's fields over the
        stage, name, key and uri, the times over the body's (``seconds`` rounded to the microsecond)."""
        data = {"stage": stage, "name": name, "key": key, "uri": uri, **body, "started": started,
                "finished": finished, "seconds": round(finished - started, 6), "complete": True}
        data.pop("reused", None)
        return cls.from_dict(data)

    @property
    def files(self) -> dict[str, str]:
        return dict(self.body.get("files") or {})

    @property
    def label(self) -> str:
        return self.stage if self.name is None else f"{self.stage}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        out = {**self.body, "stage": self.stage, "name": self.name, "key": self.key}
        for name in ("uri", "started", "finished", "seconds", "complete"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.version != 1:
            out["manifest_version"] = self.version
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "StageManifest":
        data = _mapping("stage manifest", data, where)
        version = _check_version("stage manifest", data.pop("manifest_version", 1), (MANIFEST_VERSION,), where)
        _required("stage manifest", data, ("stage", "key"), where)
        core = {k: data.pop(k, None) for k in _MANIFEST_CORE}
        complete = data.pop("complete", None)
        return cls(**core, body=data, complete=complete, version=version)


# --- lineage.json ------------------------------------------------------------------------------------------------
#: what the export stage records (version 1)
_EXPORT_LINEAGE_FIELDS = ("run_key", "recipe", "source", "calibration", "stages", "model", "weights_file",
                          "versions")
#: what the lineage stage adds (version 2)
_COMPLETE_LINEAGE_FIELDS = ("recipe_sha256", "code", "stage_outputs", "evaluation", "tags")


@dataclass(frozen=True)
class Lineage(_Record):
    """lineage.json: everything a compressed model came from, with digests.

    The export stage fills the first eight fields (version :data:`EXPORT_LINEAGE_VERSION`); :meth:`completed`
    adds the recipe's digest, the code version, every stage output's digests, the evaluations and the tags
    (version :data:`LINEAGE_VERSION`). An optional field not in the document is None (and stays out of
    :meth:`to_dict`).
    ``model`` is ``{file of the model directory: sha256}`` without lineage.json itself."""

    # what every lineage.json holds (the export stage's)
    run_key: str
    recipe: dict
    source: dict
    calibration: dict
    stages: dict
    model: dict
    weights_file: str | None = None  # (absent from the first lineage documents: the model.safetensors then)
    versions: dict | None = None
    #: keys of the document this dotresize does not name (kept as they are)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # what the lineage stage adds
    recipe_sha256: str | None = None
    code: dict | None = None
    stage_outputs: dict | None = None
    evaluation: dict | None = None
    tags: dict | None = None
    version: int = LINEAGE_VERSION

    @classmethod
    def from_export(cls, *, run_key: str, recipe: dict, source: dict, calibration: dict, stages: dict, model: dict,
                    weights_file: str, versions: dict) -> "Lineage":
        """The export stage's lineage (version :data:`EXPORT_LINEAGE_VERSION`)."""
        return cls(run_key=run_key, recipe=recipe, source=source, calibration=calibration, stages=stages,
                   model=model, weights_file=weights_file, versions=versions, version=EXPORT_LINEAGE_VERSION)

    def completed(self, *, recipe_sha256: str, code: dict, versions: dict, stage_outputs: dict, evaluation: dict,
                  tags: Mapping | None) -> "Lineage":
        """The final lineage (version :data:`LINEAGE_VERSION`): ``tags`` as sorted strings, the solves' bases
        added to ``stage_outputs`` (they have no manifest), and lineage.json itself left out of ``model``."""
        from .rundir import LINEAGE

        outputs = dict(stage_outputs)
        for point, basis in ((self.stages or {}).get("bases") or {}).items():
            outputs[f"solve/{point}"] = {"key": basis.get("key"), "files": {_basis_file(point): basis.get("sha256")}}
        return dataclasses.replace(
            self, recipe_sha256=recipe_sha256, code=code, versions=versions, stage_outputs=outputs,
            evaluation=evaluation, tags={str(k): str(v) for k, v in sorted((tags or {}).items())},
            model={k: v for k, v in (self.model or {}).items() if k != LINEAGE}, version=LINEAGE_VERSION)

    @staticmethod
    def stage_outputs_of(manifests: Mapping[str, "StageManifest"]) -> dict[str, dict]:
        """The ``stage_outputs`` entries of the given manifests (by label, as :func:`storage.stage_manifests`
        gives them): ``{key, [digest], [points], [files]}``, lineage.json itself left out of the files."""
        from .rundir import LINEAGE

        out: dict[str, dict] = {}
        for label, manifest in manifests.items():
            entry: dict[str, Any] = {"key": manifest.key}
            for name in ("digest", "points"):
                if manifest.body.get(name):
                    entry[name] = manifest.body[name]
            files = {k: v for k, v in manifest.files.items() if not k.endswith(LINEAGE)}
            if files:
                entry["files"] = files
            out[label] = entry
        return out

    # reading --------------------------------------------------------------------------------------------------
    @staticmethod
    def model_files_of(data: Any) -> dict[str, str]:
        """``model`` ({file: sha256}) of a lineage document read as plain JSON, whatever its version or state
        (``{}`` when it has none): what a check of a possibly damaged lineage.json can still use."""
        model = data.get("model") if isinstance(data, Mapping) else None
        return dict(model) if isinstance(model, Mapping) else {}

    def stage_output_files(self) -> dict[str, str]:
        """``{run-relative path: sha256}`` of every file a stage output recorded (evaluation files included)."""
        out: dict[str, str] = {}
        for entry in (self.stage_outputs or {}).values():
            out.update(entry.get("files") or {})
        for entry in (self.evaluation or {}).values():
            if entry.get("file") and entry.get("sha256"):
                out[entry["file"]] = entry["sha256"]
        return out

    def captured_points(self) -> dict[str, str]:
        """``{point: digest}`` of every captured point (one capture output, or one per point)."""
        points: dict[str, str] = {}
        for name, entry in (self.stage_outputs or {}).items():
            if name == "capture" and entry.get("points"):
                points.update(entry["points"])
            elif name.startswith("capture/") and entry.get("digest"):
                points[name.split("/", 1)[1]] = entry["digest"]
        return points

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extra, "lineage_version": self.version}
        for name in (*_EXPORT_LINEAGE_FIELDS, *_COMPLETE_LINEAGE_FIELDS):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "Lineage":
        data = _mapping("lineage record", data, where)
        version = _check_version("lineage.json", data.pop("lineage_version", None), READABLE_LINEAGE_VERSIONS, where)
        _required("lineage record", data, _EXPORT_LINEAGE_FIELDS[:6], where)
        named = {k: data.pop(k) for k in (*_EXPORT_LINEAGE_FIELDS, *_COMPLETE_LINEAGE_FIELDS) if k in data}
        return cls(**named, extra=data, version=version)


def _basis_file(point: Any) -> str:
    from .rundir import basis_file

    return basis_file(int(point) if str(point).isdigit() else point)


# --- the run recipe ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecipe(_Record):
    """What determines a compression run besides the code: the config (its plain form), the source (``spec`` and
    ``digest``) and the calibration settings. Its dict is what the run key is computed from."""

    config: dict
    source: dict
    calibration: dict
    version: int = RUN_RECIPE_VERSION

    @classmethod
    def make(cls, config, source: Mapping[str, Any], calibration: dict) -> "RunRecipe":
        """From a :class:`dotresize.CompressionConfig` (or its dict) and a resolved source record."""
        plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return cls(config=plain, source={"spec": source["spec"], "digest": source["digest"]},
                   calibration=calibration)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe_version": self.version, "config": self.config, "source": self.source,
                "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "RunRecipe":
        data = _mapping("run recipe", data, where)
        version = _check_version("run recipe", data.pop("recipe_version", None), (RUN_RECIPE_VERSION,), where)
        _required("run recipe", data, ("config", "source", "calibration"), where)
        if set(data) - {"config", "source", "calibration"}:
            raise RecordVersionError(f"{where + ': ' if where else ''}the run recipe has unknown keys "
                                     f"{sorted(set(data) - {'config', 'source', 'calibration'})}: read it with the "
                                     "dotresize that wrote it")
        return cls(config=data["config"], source=data["source"], calibration=data["calibration"], version=version)


# --- a watch recipe's resolved variant ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WatchVariant(_Record):
    """One compression a watch recipe asks for, every default spelled out: its dict is hashed into the variant's
    identity, so it keeps the file's key name ``recipe_version`` (with :data:`WATCH_RECIPE_VERSION`, not the run
    recipe's version)."""

    method: str
    ratio: float
    mode: str
    layout: str
    config: dict
    calibration: dict
    evaluation: dict
    version: int = WATCH_RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"recipe_version": self.version, "method": self.method, "ratio": self.ratio, "mode": self.mode,
                "layout": self.layout, "config": self.config, "calibration": dict(self.calibration),
                "evaluation": dict(self.evaluation)}

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> "WatchVariant":
        data = _mapping("watch recipe variant", data, where)
        version = _check_version("watch recipe", data.pop("recipe_version", None), (WATCH_RECIPE_VERSION,), where)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "version"]
        _required("watch recipe variant", data, tuple(names), where)
        return cls(**{k: data[k] for k in names}, version=version)


RECORDS = (StageManifest, Lineage, RunRecipe, WatchVariant)

__all__ = ["StageManifest", "Lineage", "RunRecipe", "WatchVariant", "RecordVersionError", "RECORDS",
           "MANIFEST_VERSION", "LINEAGE_VERSION", "EXPORT_LINEAGE_VERSION", "READABLE_LINEAGE_VERSIONS",
           "RUN_RECIPE_VERSION", "WATCH_RECIPE_VERSION", "KEY_SCHEME", "RUN_KEY_VERSION", "IDENTITY_VERSION",
           "ACTIVATIONS_FORMAT"]
