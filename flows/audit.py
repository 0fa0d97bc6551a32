"""``dotresize lineage`` and ``dotresize verify``: read and check the lineage of a compressed model.

A target is a compressed model directory (a run's ``model/``, a copy made with ``--out``, or a run directory)
or a registered model in MLflow, ``models:/<name>/<version>`` (or ``models:/<name>@<alias>``).

``verify`` recomputes the sha256 of every file and compares it with every record that names it:

* each model file (weights, config, tokenizer, code, ...) against ``lineage.json`` and against the model files
  logged to the MLflow run;
* ``lineage.json`` itself (it cannot hold its own digest) against the ``dotresize.lineage_sha256`` tag of the
  MLflow run and of the model version, and against the ``lineage.json`` artifacts logged with the run;
* the weights (``model.safetensors``, or a sharded export's index) against the version's ``model_sha256`` tag;
* the source checkpoint's files and the run directory's stage outputs and evaluation files against
  ``lineage.json``, where they still exist (a deleted intermediate is reported as not checked).

With a public key (or a certificate chain), ``model.sig`` is checked first: an OpenSSF model signing bundle over
every file of the model directory, ``lineage.json`` included (:mod:`storage.signing`). It is what makes a copy
trustworthy on its own: ``lineage.json`` can be rewritten together with the files it describes, a signature by a
key the user holds cannot. MLflow is an extra witness, used when a record of the model is found and reachable,
and required only with ``require_mlflow``.

Any disagreement is a :class:`VerifyError` naming the file and both digests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from dotresize.digests import sha256_file
from dotresize.errors import DotResizeError
from storage import rundir as layout
from storage.lineage import (
    Mismatch,
    check_activations,
    check_files,
    compare,
    file_digests,
    model_digests,
    source_files,
)
from storage.records import Lineage, RecordVersionError
from storage.rundir import LINEAGE, SIGNATURE

from .mlflow_logging import MODEL_ARTIFACT  # an MLflow run's artifacts are laid out like the run directory

log = logging.getLogger("dotresize")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


EXPERIMENT = "dotresize"
MLMODEL = "MLmodel"
TAG_LINEAGE = "dotresize.lineage_sha256"


class LineageError(DotResizeError):
    """The target has no lineage to show or check (no lineage.json, unknown registered model, ...)."""


class VerifyError(DotResizeError):
    """A recomputed digest disagrees with lineage.json or the MLflow record."""


@dataclass
class MlflowRecord:
    tracking_uri: str
    run_id: str
    run_tags: dict
    artifact_dir: Path | None              # local directory of the run's artifacts (downloaded if remote)
    registered_model: str | None = None
    version: str | None = None
    version_tags: dict = field(default_factory=dict)

    def label(self) -> str:
        where = f"MLflow run {self.run_id}"
        if self.registered_model:
            where += f" ({self.registered_model} v{self.version})"
        return where


@dataclass
class Target:
    spec: str
    model_dir: Path
    run_dir: Path | None
    lineage: dict                          # lineage.json as read ({} when it is not JSON)
    lineage_sha256: str
    record: MlflowRecord | None
    from_registry: bool = False
    _temp: list = field(default_factory=list)
    searched_mlflow: bool = True

    def document(self) -> Lineage:
        """lineage.json as a :class:`storage.records.Lineage`; one of a version this dotresize does not read (or
        no lineage record at all) raises :class:`LineageError` (a one-line message)."""
        try:
            return Lineage.from_dict(self.lineage, str(self.model_dir / LINEAGE))
        except RecordVersionError as error:
            raise LineageError(str(error)) from None

    def close(self) -> None:
        for path in self._temp:
            shutil.rmtree(path, ignore_errors=True)
        self._temp.clear()


# --- resolving a target -----------------------------------------------------------------------------------------
def _default_uris(explicit: str | None, near: Path | None = None) -> list[str]:
    uris = []
    for candidate in (explicit, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate:
            uris.append(candidate)
    homes = []
    if os.environ.get("DOTRESIZE_HOME"):
        homes.append(Path(os.environ["DOTRESIZE_HOME"]).expanduser())
    if near is not None:
        homes += [near.parent, near.parent.parent, near.parent.parent.parent]
    homes.append(Path.cwd() / "runs")
    for home in homes:
        db = (home / "mlflow.db").resolve()
        if db.is_file() and f"sqlite:///{db}" not in uris:
            uris.append(f"sqlite:///{db}")
    return uris


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def _artifact_dir(client, run, temp: list) -> Path | None:
    uri = run.info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path if parsed.scheme else uri))
        return path if path.is_dir() else None
    tmp = Path(tempfile.mkdtemp(prefix="dotresize-verify-"))
    temp.append(tmp)
    try:
        return Path(client.download_artifacts(run.info.run_id, "", str(tmp)))
    except Exception as error:  # an unreachable artifact store: the record is checked without its artifacts
        log.debug("MLflow artifacts of run %s not readable: %s", run.info.run_id, _first_line(error))
        return None


def _record(uri: str, run_id: str, temp: list, name: str | None = None, version: str | None = None
            ) -> MlflowRecord:
    client = _client(uri)
    run = client.get_run(run_id)
    record = MlflowRecord(tracking_uri=uri, run_id=run_id, run_tags=dict(run.data.tags),
                          artifact_dir=_artifact_dir(client, run, temp))
    if name is None:
        versions = [v for v in _search_versions(client, f"run_id = '{run_id}'")]
        if versions:
            latest = max(versions, key=lambda v: int(v.version))
            name, version = latest.name, latest.version
    if name is not None:
        mv = client.get_model_version(name, str(version))
        record.registered_model, record.version, record.version_tags = name, str(mv.version), dict(mv.tags)
    return record


def _search_versions(client, filter_string: str) -> list:
    try:
        return list(client.search_model_versions(filter_string))
    except Exception as error:  # no registry at this tracking URI: no registered version to compare
        log.debug("MLflow model versions (%s) not searchable: %s", filter_string, _first_line(error))
        return []


def weights_file(lineage: dict, model_dir: Path) -> str:
    """The file whose sha256 is the model's digest (the MLflow tag ``model_sha256``): ``model.safetensors``, or
    for a sharded export its index (which records every shard's sha256); lineage.json names it when it can."""
    from dotresize.checkpoint import INDEX_FILE
    from dotresize.shards import SINGLE_FILE

    named = lineage.get("weights_file")
    if named:
        return str(named)
    for candidate in (SINGLE_FILE, INDEX_FILE):
        if candidate in Lineage.model_files_of(lineage) or (model_dir / candidate).is_file():
            return candidate
    return SINGLE_FILE


def _find_record(model_dir: Path, run_dir: Path | None, lineage: dict, lineage_sha: str, tracking_uri: str | None,
                 temp: list) -> MlflowRecord | None:
    """The MLflow run that logged this model: ``<run>/mlflow.json`` if any, else a run tagged with the same
    model sha256 (preferring one whose lineage digest tag matches this lineage.json)."""
    if run_dir is not None and layout.at(run_dir, layout.MLFLOW).is_file() and not tracking_uri:
        try:
            saved = layout.read_mlflow_record(run_dir) or {}
            uri = str(saved.get("tracking_uri") or "")
            if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
                raise FileNotFoundError(uri)  # a moved run directory: never create an empty database there
            if saved.get("run_id") and saved.get("tracking_uri"):
                return _record(saved["tracking_uri"], saved["run_id"], temp, saved.get("registered_model"),
                               saved.get("version"))
        except Exception as error:  # the recorded tracking store is gone or moved: search by digest below
            log.debug("MLflow record of %s not usable: %s", layout.at(run_dir, layout.MLFLOW), _first_line(error))
    weights = weights_file(lineage, model_dir)
    model_sha = Lineage.model_files_of(lineage).get(weights)
    if not model_sha and (model_dir / weights).is_file():  # lineage.json unreadable
        model_sha = sha256_file(model_dir / weights)
    if not model_sha:
        return None
    for uri in _default_uris(tracking_uri, model_dir):
        try:
            client = _client(uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                continue
            runs = client.search_runs([experiment.experiment_id],
                                      f"tags.`dotresize.model_sha256` = '{model_sha}'",
                                      order_by=["attributes.start_time DESC"], max_results=50)
        except Exception as error:  # a store that cannot be searched is not a witness: try the next one
            log.debug("MLflow store %s not searchable: %s", uri, _first_line(error))
            continue
        if runs:
            matching = [r for r in runs if r.data.tags.get(TAG_LINEAGE) == lineage_sha]
            return _record(uri, (matching or runs)[0].info.run_id, temp)
    return None


def _is_remote(spec: str) -> bool:
    scheme = urlparse(spec).scheme
    return "://" in spec and len(scheme) > 1 and scheme not in ("file", "models")


def _download_target(spec: str, temp: list) -> Path:
    """A local copy of a run directory or model directory stored at a URL (``s3://...``; the endpoint and
    credentials come from the usual settings of that filesystem): the model, and for a run directory its records
    and stage outputs too, so that every check below runs on what the store holds."""
    from storage import RunDir

    run = RunDir(spec)
    if not (layout.is_run_dir(run) or layout.is_model_dir(run)):
        raise LineageError(f"{spec} holds no {LINEAGE}: pass a run directory or a model directory exported by the "
                           "dotresize pipeline")
    tmp = Path(tempfile.mkdtemp(prefix="dotresize-verify-"))
    temp.append(tmp)
    name = Path(run.path().rstrip("/")).name or "run"
    return run.download("", tmp / name)


def _parse_models_uri(spec: str) -> tuple[str, str | None, str | None]:
    rest = spec[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise LineageError(f"{spec}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return name, version, None


def resolve_target(spec: str, tracking_uri: str | None = None, use_mlflow: bool = True) -> Target:
    """Find the model files, lineage.json and the MLflow record of ``spec``."""
    temp: list = []
    if spec.startswith("models:/"):
        name, version, alias = _parse_models_uri(spec)
        errors = []
        for uri in _default_uris(tracking_uri):
            client = _client(uri)
            try:
                mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name,
                                                                                                            version)
            except Exception as error:
                errors.append(str(error).splitlines()[0])
                continue
            record = _record(uri, mv.run_id, temp, name, mv.version)
            model_dir = layout.at(record.artifact_dir, MODEL_ARTIFACT) if record.artifact_dir is not None else None
            if model_dir is None or not layout.is_model_dir(model_dir):
                raise LineageError(f"{spec}: the model artifacts of MLflow run {mv.run_id} have no {LINEAGE}")
            run_dir = Path(record.run_tags["dotresize.run_dir"]) if record.run_tags.get("dotresize.run_dir") else None
            lineage_path = model_dir / LINEAGE
            return Target(spec, model_dir, run_dir if run_dir and run_dir.is_dir() else None,
                          json.loads(lineage_path.read_text()), sha256_file(lineage_path), record,
                          from_registry=True, _temp=temp)
        hint = errors[0] if errors else "no MLflow tracking database found"
        raise LineageError(f"{spec} is not a registered model version ({hint}): set MLFLOW_TRACKING_URI or "
                           "DOTRESIZE_HOME, or pass --tracking-uri")
    if _is_remote(spec):  # an object store (s3://bucket/run or .../model): checked on a local copy
        spec_local = _download_target(spec, temp)
    else:
        spec_local = spec
    path = Path(spec_local).expanduser().resolve()
    if not path.exists():
        raise LineageError(f"{spec} does not exist: pass a compressed model directory or models:/<name>/<version>")
    run_dir = layout.run_dir_of(path)  # path is a run directory, or the model directory inside one
    if run_dir is not None:
        path = layout.at(run_dir, layout.MODEL)  # (a run's own lineage.json is a copy of its model's)
    lineage_path = path / LINEAGE
    if not layout.is_model_dir(path):
        raise LineageError(f"{path} has no {LINEAGE}: it is not a model directory exported by the dotresize pipeline")
    try:
        lineage = json.loads(lineage_path.read_text())
    except ValueError:
        lineage = {}
    lineage_sha = sha256_file(lineage_path)
    record = _find_record(path, run_dir, lineage, lineage_sha, tracking_uri, temp) if use_mlflow else None
    return Target(spec, path, run_dir, lineage, lineage_sha, record, _temp=temp, searched_mlflow=use_mlflow)


# --- verify -----------------------------------------------------------------------------------------------------
@dataclass
class Report:
    target: Target
    checks: list = field(default_factory=list)      # (ok, text)
    mismatches: list = field(default_factory=list)  # Mismatch
    signature: dict | None = None                   # what model.sig says and whether it was checked

    def add(self, mismatches: list[Mismatch], ok_text: str, bad_text: str | None = None) -> None:
        self.mismatches.extend(mismatches)
        self.checks.append((not mismatches, ok_text if not mismatches else (bad_text or ok_text)))

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify_target(target: Target, require_mlflow: bool = False, check_source: bool = True,
                  public_key: str | None = None, certificate_chain: tuple[str, ...] | list[str] = ()) -> Report:
    """Every check of the module docstring. ``public_key`` / ``certificate_chain``: check ``model.sig`` against
    them (a missing or foreign signature is then a mismatch). ``require_mlflow``: no MLflow record is a mismatch
    (otherwise MLflow is checked only where a record is found)."""
    report = Report(target)
    record = target.record
    _verify_signature(report, target, public_key, tuple(certificate_chain))  # it covers lineage.json too
    if record is not None:  # lineage.json next: every other check trusts it
        _verify_lineage_digest(report, target, record)
    if not Lineage.model_files_of(target.lineage):
        report.add([Mismatch(LINEAGE, "a JSON lineage record with model digests",
                             f"an unreadable file (sha256 {target.lineage_sha256})", "verify")],
                   "", f"{LINEAGE} is not a readable lineage record")
        return report
    try:
        lineage = target.document()
    except LineageError as error:
        report.add([Mismatch(LINEAGE, "a lineage record this dotresize reads", f"{error} (sha256 "
                             f"{target.lineage_sha256})", "verify")], "", f"{LINEAGE} cannot be read here")
        return report
    # 1. every model file against lineage.json
    exclude = (LINEAGE, SIGNATURE, MLMODEL) if target.from_registry else (LINEAGE, SIGNATURE)  # + MLflow's file
    found = compare(dict(lineage.model), file_digests(target.model_dir, exclude=exclude), LINEAGE)
    report.add(found, f"{len(lineage.model)} model files match {LINEAGE}",
               f"model files disagree with {LINEAGE}")
    # 2. the model files against the MLflow record
    if record is None:
        if require_mlflow:
            report.add([Mismatch(LINEAGE, "an MLflow run that logged this model", "none found", "MLflow")], "",
                       "no MLflow record of this model (set MLFLOW_TRACKING_URI/DOTRESIZE_HOME or pass "
                       "--tracking-uri; drop --require-mlflow to check a copy on its own)")
        else:
            report.checks.append((True, "MLflow: no record of this model here (an extra witness, not required)"
                                  if target.searched_mlflow else "MLflow record not checked (--no-mlflow)"))
    else:
        _verify_against_mlflow(report, target, record)
    # 3. what the lineage names outside the model directory, where it still exists
    if check_source:
        directory, recorded = source_files(lineage.source or {})
        if directory is None:
            report.checks.append((True, "source checkpoint not present here: not checked"))
        else:
            found, checked, skipped = check_files(directory, recorded, f"{LINEAGE} (source)", missing_ok=True)
            report.add([Mismatch(f"source {m.file}", m.expected, m.actual, m.against) for m in found],
                       f"source {directory}: {checked} files match" + (f", {skipped} not present" if skipped else ""),
                       f"source {directory} differs from what was compressed")
    if target.run_dir is not None:
        outputs = lineage.stage_output_files()
        outputs = {k: v for k, v in outputs.items() if not k.startswith(f"{layout.MODEL}/")}  # checked above
        evaluations = {k: v for k, v in outputs.items() if layout.is_eval_file(k)}
        outputs = {k: v for k, v in outputs.items() if k not in evaluations}
        found, checked, skipped = check_files(target.run_dir, outputs, f"{LINEAGE} (stage outputs)",
                                              missing_ok=True)
        report.add(found, f"run directory: {checked} stage output files match"
                   + (f", {skipped} not present" if skipped else ""), "run directory stage outputs differ")
        # an evaluation file may be legitimately rewritten later (dotresize evaluate RUN with other settings);
        # lineage.json keeps the results it recorded (and is itself checked above), so this is a note
        changed, _, _ = check_files(target.run_dir, evaluations, LINEAGE, missing_ok=True)
        for mismatch in changed:
            report.checks.append((True, f"note: {mismatch.file} was rewritten after {LINEAGE} recorded it "
                                        f"(re-evaluated?); {LINEAGE} keeps the recorded results"))
        points = lineage.captured_points()
        if points:
            found, checked, skipped = check_activations(target.run_dir, points, f"{LINEAGE} (capture)")
            report.add(found, f"activations: {checked} points re-hashed and match"
                       + (f", {skipped} not present" if skipped else ""), "captured activations differ")
    return report


def _verify_signature(report: Report, target: Target, public_key: str | None,
                      certificate_chain: tuple[str, ...]) -> None:
    """model.sig against the key or certificate chain; without either, only a note of what it claims."""
    from storage.signing import signature_info, verify_model_dir

    info = signature_info(target.model_dir)
    report.signature = None if info is None else {**info, "checked": False}
    if public_key is None and not certificate_chain:
        if info is None:
            report.checks.append((True, f"note: no {SIGNATURE}: nothing but {LINEAGE} vouches for these files "
                                        "(sign with `dotresize sign`, check with --public-key)"))
        else:
            claimed = info.get("key_fingerprint") or info.get("certificate_subject") or info.get("mode")
            report.checks.append((True, f"note: {SIGNATURE} (by {str(claimed)[:16]}) not checked: pass "
                                        "--public-key KEY.pub (or --certificate-chain) to check it"))
        return
    # MLflow adds an MLmodel file to the logged model directory: not part of what was signed
    check = verify_model_dir(target.model_dir, public_key=public_key, certificate_chain=certificate_chain,
                             ignore=(MLMODEL,) if target.from_registry else ())
    report.signature = {**(info or {"file": SIGNATURE}), "checked": True, "ok": check.ok, "signer": check.signer}
    report.add(check.mismatches, f"{SIGNATURE}: all {check.files} files ({LINEAGE} included) signed by "
               f"{check.signer}", f"{SIGNATURE} does not vouch for these files")


def _verify_lineage_digest(report: Report, target: Target, record: MlflowRecord) -> None:
    """lineage.json (and the copies logged to MLflow) against the ``dotresize.lineage_sha256`` tags."""
    label = record.label()
    tag = record.run_tags.get(TAG_LINEAGE)
    problems = []
    if tag is None:
        problems.append(Mismatch(LINEAGE, "(no dotresize.lineage_sha256 tag)", target.lineage_sha256,
                                 f"{label} tag {TAG_LINEAGE}"))
    elif tag != target.lineage_sha256:
        problems.append(Mismatch(LINEAGE, tag, target.lineage_sha256, f"{label} tag {TAG_LINEAGE}"))
    version_tag = record.version_tags.get(TAG_LINEAGE)
    if version_tag is not None and version_tag != target.lineage_sha256:
        problems.append(Mismatch(LINEAGE, version_tag, target.lineage_sha256,
                                 f"{record.registered_model} v{record.version} tag {TAG_LINEAGE}"))
    artifacts = record.artifact_dir
    if artifacts is not None and tag is not None:
        for rel in (LINEAGE, f"{MODEL_ARTIFACT}/{LINEAGE}"):
            path = layout.at(artifacts, rel)
            if path.is_file() and sha256_file(path) != tag:
                problems.append(Mismatch(f"MLflow artifact {rel}", tag, sha256_file(path),
                                         f"{label} tag {TAG_LINEAGE}"))
    report.add(problems, f"{LINEAGE} (sha256 {target.lineage_sha256}) matches {label}",
               f"{LINEAGE} disagrees with {label}")


def _verify_against_mlflow(report: Report, target: Target, record: MlflowRecord) -> None:
    label = record.label()
    artifacts = record.artifact_dir
    version_sha = record.version_tags.get("model_sha256")
    weights = weights_file(target.lineage, target.model_dir)
    actual = sha256_file(target.model_dir / weights) if (target.model_dir / weights).is_file() else "missing"
    if version_sha is not None:
        report.add([] if version_sha == actual else
                   [Mismatch(weights, version_sha, actual,
                             f"{record.registered_model} v{record.version} tag model_sha256")],
                   f"{weights} matches the registered version's model_sha256",
                   f"{weights} disagrees with the registered version")
    logged_dir = layout.at(artifacts, MODEL_ARTIFACT) if artifacts is not None else None
    if logged_dir is None or not logged_dir.is_dir():
        report.add([Mismatch(f"{MODEL_ARTIFACT}/", "logged model files", "none readable", label)], "",
                   f"the model files logged to {label} cannot be read")
        return
    if target.from_registry:
        return  # the target's files are the logged ones: checked against lineage.json above
    logged = file_digests(logged_dir, exclude=(LINEAGE, SIGNATURE, MLMODEL))
    found = compare(logged, model_digests(target.model_dir), f"{label} model artifacts")
    report.add(found, f"{len(logged)} model files match the files logged to {label}",
               f"model files disagree with the files logged to {label}")


def render_report(report: Report) -> str:
    target = report.target
    lines = [f"verify {target.spec}" + (f"  ({target.record.label()}, {target.record.tracking_uri})"
                                        if target.record else "")]
    for ok, text in report.checks:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {text}")
    for mismatch in report.mismatches:
        lines.append(f"    {mismatch.line()}")
    lines.append("verified: every digest matches" if report.ok else
                 f"FAILED: {len(report.mismatches)} mismatch(es)")
    return "\n".join(lines)


def verify_error(report: Report) -> VerifyError:
    first = report.mismatches[0]
    more = f" (and {len(report.mismatches) - 1} more)" if len(report.mismatches) > 1 else ""
    return VerifyError(f"verify {report.target.spec} failed: {first.line()}{more}")


# --- lineage ----------------------------------------------------------------------------------------------------
def _short(digest: Any) -> str:
    return str(digest) if digest else "-"


def render_lineage(target: Target) -> str:
    """The chain from the source checkpoint to the artifact, one stage per block."""
    doc = target.document()
    source, calibration = doc.source or {}, doc.calibration or {}
    config = (doc.recipe or {}).get("config") or {}
    lines = [f"lineage of {target.spec}", ""]
    lines.append(f"source       {source.get('spec')}  ({source.get('kind')}, revision {source.get('revision') or '-'})")
    lines.append(f"  digest     {_short(source.get('digest'))}")
    for name, sha in sorted((source.get("weights_sha256") or {}).items()):
        lines.append(f"  weights    {name}  sha256 {sha}")
    for name, sha in sorted((source.get("files_sha256") or {}).items()):
        lines.append(f"  file       {name}  sha256 {sha}")
    lines.append("")
    lines.append(f"calibration  {calibration.get('id')}  ({calibration.get('path') or '-'})")
    lines.append(f"  text       sha256 {_short(calibration.get('sha256'))}")
    lines.append(f"  sample     {calibration.get('samples')} x {calibration.get('seqlen')} = "
                 f"{calibration.get('tokens')} tokens, seed {calibration.get('seed')}")
    lines.append(f"  token ids  sha256 {_short(calibration.get('input_ids_sha256'))}")
    lines.append("")
    lines.append(f"recipe       sha256 {_short(doc.recipe_sha256)}  (compression recipe: config, calibration, "
                 f"source; run key {_short(doc.run_key)})")
    lines.append(f"  method     {config.get('method')} ratio {config.get('ratio')}, {config.get('mode')}, "
                 f"{config.get('layout')} layout, seed {config.get('seed')}")
    if config.get("method") == "dot":
        dot = config.get("dot") or {}
        lines.append("  dot        " + ", ".join(f"{k} {dot[k]}" for k in ("epsilon", "cost", "cost_normalization",
                                                                            "marginals", "targets", "decompression",
                                                                            "solver") if k in dot))
    for key, value in sorted((doc.tags or {}).items()):
        lines.append(f"  tag        {key} = {value}")
    code, versions = doc.code or {}, doc.versions or {}
    lines.append("")
    commit = code.get("git_commit")
    lines.append(f"code         {code.get('package', 'dotresize')} {code.get('version', versions.get('dotresize'))}"
                 + (f", git {commit}{' (uncommitted changes)' if code.get('git_dirty') else ''}" if commit else
                    ", no git commit recorded"))
    lines.append("  versions   " + ", ".join(f"{k} {versions[k]}" for k in ("python", "torch", "transformers", "POT",
                                                                             "lm-eval", "safetensors", "prefect",
                                                                             "mlflow") if k in versions))
    lines.append("")
    outputs = doc.stage_outputs or {}
    if outputs:
        lines.append(f"stages       {len(outputs)} stage outputs")
        for name, entry in outputs.items():
            digest = entry.get("digest") or (f"{len(entry.get('files') or {})} files" if entry.get("files")
                                             else (f"{len(entry.get('points') or {})} points"
                                                   if entry.get("points") else "-"))
            lines.append(f"  {name:<22} key {str(entry.get('key'))[:16]}  {digest}")
    else:
        stages = doc.stages or {}
        lines.append(f"stages       {', '.join(stages)}")
    lines.append("")
    evaluation = doc.evaluation or {}
    if evaluation:
        for name, entry in sorted(evaluation.items()):
            result = entry.get("result") or {}
            if "ppl" in result:
                summary = (f"perplexity {result['ppl']:.4f} on {(result.get('dataset') or {}).get('id')} (ctx "
                           f"{result.get('ctx')}, {result.get('windows')} windows)")
            elif "tasks" in result:
                summary = ", ".join(f"{task} acc {m.get('acc'):.4f}" for task, m in (result["tasks"] or {}).items()
                                    if isinstance(m, dict) and isinstance(m.get("acc"), (int, float)))
            else:
                summary = ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, (int, float)))[:200]
            lines.append(f"evaluation   {name}: {summary}")
            lines.append(f"  file       {entry.get('file')}  sha256 {entry.get('sha256')}")
    else:
        lines.append("evaluation   none recorded")
    lines.append("")
    lines.append(f"artifact     {target.model_dir}")
    lines.append(f"  {LINEAGE:<28} sha256 {target.lineage_sha256}")
    for name, sha in sorted((doc.model or {}).items()):
        lines.append(f"  {name:<28} sha256 {sha}")
    lines.append(_signature_line(target))
    record = target.record
    if record is not None:
        lines.append(f"mlflow       run {record.run_id} ({record.tracking_uri})")
        if record.registered_model:
            lines.append(f"  registered models:/{record.registered_model}/{record.version}")
    else:
        lines.append("mlflow       no record found")
    return "\n".join(lines)


def _signature_line(target: Target) -> str:
    from storage.signing import signature_info

    info = signature_info(target.model_dir)
    if info is None:
        return "signature    none (sign with `dotresize sign DIR --private-key KEY`)"
    if info.get("readable") is False:
        return f"signature    {SIGNATURE} unreadable (sha256 {info['sha256']})"
    who = (f"key {info['key_fingerprint']}" if info.get("key_fingerprint")
           else info.get("certificate_subject") or info.get("mode"))
    return (f"signature    {SIGNATURE} over {info.get('files')} files, {info.get('mode')} mode, by {who} "
            "(unverified here: `dotresize verify --public-key KEY.pub`)")


def lineage_json(target: Target) -> dict:
    from storage.signing import signature_info

    record = target.record
    return {"target": target.spec, "model_dir": str(target.model_dir), "lineage_sha256": target.lineage_sha256,
            "signature": signature_info(target.model_dir),
            "mlflow": None if record is None else {
                "tracking_uri": record.tracking_uri, "run_id": record.run_id,
                "registered_model": record.registered_model, "version": record.version},
            "lineage": target.lineage}


__all__ = ["resolve_target", "verify_target", "render_report", "render_lineage", "lineage_json", "verify_error",
           "LineageError", "VerifyError"]
