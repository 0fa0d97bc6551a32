"""The watch flow: compress every checkpoint of a training run not yet compressed with a recipe, exactly once.

One tick (one run of :func:`watch_flow`):

1. find the checkpoints of ``source`` (a directory of ``checkpoint-*`` folders or ``.gguf`` files, a list of
   them, hub revisions where the hub is reachable, or an object-store prefix such as ``s3://bucket/checkpoints``);
2. leave any checkpoint that is still being written for the next tick (``storage.checkpoints``: no config, an
   unreadable or short safetensors/GGUF file, a shard the index names but that is not there, a missing marker
   file, or sizes that change across two looks ``settle_seconds`` apart; in an object store, sizes and ETags,
   and the checks on a local mirror of it, ``<home>/watched/...``, which the compression reads);
3. for every ready checkpoint and every variant (ratio) of the recipe, the *identity* is the source digest
   (sha256 of the weight files and the config/tokenizer files) + the variant's recipe hash. A registered MLflow
   model version tagged ``dotresize.identity`` with it means done; otherwise, under an exclusive lock on
   ``<home>/locks/<identity>.lock``, look again, then run :func:`flows.compress.compress_flow` as a subflow into
   the identity's own run directory, which registers the version with the identity tags.

Exactly once: the check, the compression and the registration of one identity happen under its lock, and a
version is only ever looked up by its identity tag, which is written with the version. A second watch run that
finds the lock taken leaves that checkpoint to its holder (``busy``; ``wait_for_lock`` waits instead). A crash
mid-way leaves no version and releases the lock (the OS drops ``flock`` locks of dead processes): the next tick
compresses it again, resuming the stages already in the identity's run directory, and re-registering reuses
the version of that MLflow run if the crash came after registration.

The lock is a local file next to the MLflow database, so it coordinates every watcher on this machine (and on
a shared filesystem that supports ``flock``); watchers on separate machines sharing only a remote tracking
server are not serialised by it.

The watcher confines itself to the watched folder: ``pattern`` matches checkpoint names only (``../*`` matches
nothing and is refused with a one-line error), paths are resolved, and a checkpoint that is or holds a symbolic
link resolving outside the folder is reported as ``refused`` (checked again just before it is compressed)
unless ``follow_symlinks``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dotresize.errors import DotResizeError
from storage import RunDir, digest_of_digests
from storage.checkpoints import (Checkpoint, DigestCache, check_pattern, escape, is_remote, mirror, remote_problem,
                                 remote_snapshot, scan, scan_remote, snapshot, static_problem)
from storage.locks import FileLock
from storage.records import IDENTITY_VERSION

from flows.recipe import Recipe, Variant, load_recipe

TAG_IDENTITY = "dotresize.identity"
TAG_RECIPE = "dotresize.recipe_sha256"
TAG_SOURCE = "dotresize.source_digest"
TAG_CHECKPOINT = "dotresize.checkpoint"
TAG_RECIPE_NAME = "dotresize.recipe_name"
TAG_WATCH_SOURCE = "dotresize.watch_source"
TAG_REVISION = "dotresize.revision"
TAG_CHECKPOINT_URL = "dotresize.checkpoint_url"

log = logging.getLogger("dotresize")


class WatchError(DotResizeError):
    """The watched source cannot be read, or some checkpoints could not be compressed."""


# --- identity -------------------------------------------------------------------------------------------------
def identity_of(source_digest: str, recipe_sha256: str) -> str:
    """The identity of "this checkpoint's content compressed with this recipe variant"."""
    return digest_of_digests({"identity": IDENTITY_VERSION, "source": source_digest, "recipe": recipe_sha256})


def source_meta(checkpoint: Checkpoint, cache: DigestCache | None = None) -> dict:
    """The source record compress_flow will compute for this checkpoint (same digest), with cached sha256s."""
    from dotresize.sources import resolve_source
    from tasks.source import _SIDE_FILES, source_digest

    cache = cache or DigestCache()
    source = resolve_source(checkpoint.spec)
    meta = {"spec": checkpoint.spec, "gguf_file": source.gguf_file,
            "weights_sha256": {p.name: cache.sha256(p) for p in source.weight_files}}
    if not source.gguf_file:
        meta["files_sha256"] = {name: cache.sha256(source.directory / name) for name in _SIDE_FILES
                                if (source.directory / name).is_file()}
    meta["digest"] = source_digest(meta)
    return meta


# --- where things go ------------------------------------------------------------------------------------------
def runs_root(runs_dir: str | None = None) -> Path:
    """Run directories of the watch: ``runs_dir``, else ``$DOTRESIZE_HOME/runs``, else ``./runs``."""
    if runs_dir:
        return Path(runs_dir).expanduser().resolve()
    if os.environ.get("DOTRESIZE_HOME"):
        return Path(os.environ["DOTRESIZE_HOME"]).expanduser().resolve() / "runs"
    return (Path.cwd() / "runs").resolve()


def _probe_run(root: Path) -> RunDir:
    """A run directory name under ``root``: what the MLflow home and tracking URI are computed from."""
    return RunDir(str(root / "_"))


def home_of(root: Path) -> Path:
    from flows.mlflow_logging import mlflow_home

    return mlflow_home(_probe_run(root))


def tracking_uri_of(root: Path) -> str:
    from flows.mlflow_logging import tracking_uri

    return tracking_uri(_probe_run(root))


def mirror_root(root: Path, url: str) -> Path:
    """Where the checkpoints found under a remote ``url`` are mirrored: ``<home>/watched/<scheme>/<path>``."""
    scheme, _, path = url.partition("://")
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return home_of(root) / "watched" / scheme / Path(*parts) if parts else home_of(root) / "watched" / scheme


def lock_path(root: Path, identity: str) -> Path:
    return home_of(root) / "locks" / f"{identity}.lock"


def run_dir_of(root: Path, checkpoint: Checkpoint, variant: Variant, identity: str) -> Path:
    from flows.compress import slug

    return root / f"{slug(checkpoint.name)}-{variant.resolved['method']}-{variant.ratio:g}-{identity[:12]}"


def _tracking_client(root: Path):
    """An MlflowClient of the watch's tracking URI (a fresh local database is created under a lock)."""
    from flows.mlflow_logging import tracking_client

    return tracking_client(tracking_uri_of(root))


def find_version(client, identity: str):
    """The registered model version with this identity tag (the oldest if ever more than one), else None."""
    versions = [v for v in client.search_model_versions(f"tags.`{TAG_IDENTITY}` = '{identity}'")
                if str(getattr(v, "status", "READY")) in ("READY", "ModelVersionStatus.READY")]
    if not versions:
        return None
    return min(versions, key=lambda v: int(v.version))


# --- sources ----------------------------------------------------------------------------------------------------
def _hub_checkpoints(repo: str, revisions: list[str]) -> list[Checkpoint]:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WatchError(f"hub revisions of {repo} need the Hugging Face hub, which is not reachable here "
                         "(HF_HUB_OFFLINE=1): watch a local directory of checkpoints instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise WatchError("hub revisions need huggingface_hub") from None
    out = []
    for revision in revisions:
        try:
            local = snapshot_download(repo, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"])
        except Exception as error:
            raise WatchError(f"cannot download {repo}@{revision} from the hub: {str(error).splitlines()[0]}") \
                from None
        out.append(Checkpoint(f"{repo}@{revision}", Path(local).resolve(), "hf-dir"))
    return out


def _find(source: Any, pattern: str, follow_symlinks: bool) -> tuple[list[tuple[Checkpoint, Path | None]],
                                                                     list[dict]]:
    """([(checkpoint, watched folder or None for hub snapshots)], refused)."""
    if isinstance(source, dict):
        if set(source) - {"hub", "revisions"} or not source.get("hub"):
            raise WatchError("a hub source is {hub: org/name, revisions: [rev, ...]}")
        found = _hub_checkpoints(str(source["hub"]), [str(r) for r in source.get("revisions") or ["main"]])
        return [(c, None) for c in found], []
    if isinstance(source, (list, tuple)):
        out: list[tuple[Checkpoint, Path | None]] = []
        refused: list[dict] = []
        for item in source:
            more, also = _find(item, pattern, follow_symlinks)
            out.extend(more)
            refused.extend(also)
        return out, refused
    text = str(source)
    if text.startswith("hub:"):
        repo, _, revisions = text[4:].partition("@")
        return [(c, None) for c in _hub_checkpoints(repo, [r for r in revisions.split(",") if r] or ["main"])], []
    path = Path(text).expanduser()
    if not path.exists():
        if "@" in text and "/" in text.split("@")[0] and not text.startswith((".", "/", "~")):
            repo, _, revision = text.partition("@")
            return [(c, None) for c in _hub_checkpoints(repo, [revision])], []
        raise WatchError(f"{text} does not exist: pass a directory of checkpoints, a checkpoint, or hub revisions "
                         "(hub:org/name@rev1,rev2)")
    found = scan(path, pattern, follow_symlinks)
    root = found.root if found.root.is_dir() else found.root.parent
    return [(c, root) for c in found.checkpoints], found.refused


def find_checkpoints(source: Any, pattern: str = "*", follow_symlinks: bool = False) -> list[Checkpoint]:
    """Checkpoints of ``source``: a directory (or one checkpoint), a list of them or of ``org/name@revision``
    hub ids, ``hub:org/name@rev1,rev2``, or ``{"hub": "org/name", "revisions": [...]}``. ``pattern`` matches the
    names of a directory's entries; checkpoints linking outside their directory are left out unless
    ``follow_symlinks``."""
    check_pattern(pattern)
    return [c for c, _ in _find(source, pattern, follow_symlinks)[0]]


def default_register_name(source: Any) -> str:
    from flows.compress import slug

    if isinstance(source, dict):
        return f"dotresize-{slug(str(source.get('hub', 'hub')))}"
    if isinstance(source, (list, tuple)):
        source = source[0] if source else "checkpoints"
    text = str(source)
    if text.startswith("hub:"):
        text = text[4:].split("@")[0]
    return f"dotresize-{slug(text.split('@')[0])}"


# --- the flow -------------------------------------------------------------------------------------------------
def _ready(checkpoints: list[Checkpoint], settle_seconds: float, marker: str | None) -> tuple[list, list]:
    """(ready, pending): pending ones with the reason; two looks ``settle_seconds`` apart for stability."""
    pending, candidates = [], []
    for checkpoint in checkpoints:
        problem = static_problem(checkpoint, marker)
        if problem:
            pending.append({"checkpoint": checkpoint.name, "reason": problem})
        else:
            candidates.append(checkpoint)
    first = {c.path: snapshot(c) for c in candidates}
    if candidates and settle_seconds > 0:
        time.sleep(settle_seconds)
    ready = []
    for checkpoint in candidates:
        if snapshot(checkpoint) != first[checkpoint.path]:
            pending.append({"checkpoint": checkpoint.name, "reason": "still being written (its files changed "
                                                                     f"within {settle_seconds:g} s)"})
            continue
        problem = static_problem(checkpoint, marker)  # complete after the wait too
        if problem:
            pending.append({"checkpoint": checkpoint.name, "reason": problem})
        else:
            ready.append(checkpoint)
    return ready, pending


def _remote_ready(url: str, pattern: str, settle_seconds: float, marker: str | None,
                  local_root: Path) -> tuple[list[str], list[Checkpoint], list[dict], dict[Path, str]]:
    """(names found, ready local mirrors, pending, {mirror path: remote URL}) of the checkpoints under ``url``:
    judged from two listings ``settle_seconds`` apart (an object appears whole, but a checkpoint's objects one at
    a time), then mirrored (once per content) and checked in full like a local checkpoint."""
    try:
        found = scan_remote(url, pattern)
        first = {c.url: remote_snapshot(c) for c in found}
    except OSError as error:
        raise WatchError(f"cannot list {url}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                         " (check the AWS settings: AWS_ENDPOINT_URL, credentials)") from None
    pending, candidates = [], []
    for checkpoint in found:
        problem = remote_problem(checkpoint, first[checkpoint.url], marker)
        if problem:
            pending.append({"checkpoint": checkpoint.name, "reason": problem})
        else:
            candidates.append(checkpoint)
    if candidates and settle_seconds > 0:
        time.sleep(settle_seconds)
    ready, origins = [], {}
    for checkpoint in candidates:
        again = remote_snapshot(checkpoint)
        if again != first[checkpoint.url]:
            pending.append({"checkpoint": checkpoint.name, "reason": "still being uploaded (its objects changed "
                                                                     f"within {settle_seconds:g} s)"})
            continue
        try:
            local = mirror(checkpoint, again, local_root)
        except (OSError, DotResizeError) as error:  # gone or changed while copied: the next tick looks again
            pending.append({"checkpoint": checkpoint.name, "reason": f"cannot copy it yet ({type(error).__name__}: "
                                                                     f"{str(error).splitlines()[0] if str(error) else ''})"})
            continue
        problem = static_problem(local, marker)  # the full checks, on the files the compression will read
        if problem:
            pending.append({"checkpoint": checkpoint.name, "reason": problem})
            continue
        ready.append(local)
        origins[local.path] = checkpoint.url
    return [c.name for c in found], ready, pending, origins


def _tags(checkpoint: Checkpoint, variant: Variant, identity: str, source: dict, recipe: Recipe,
          watch_source: Any, origin: str | None = None) -> dict[str, str]:
    from flows.mlflow_logging import TAG_RECIPE_LABEL

    # the registry alias current-<label> follows the latest checkpoint compressed with this recipe (variant)
    label = recipe.name if len(recipe.variants) == 1 else f"{recipe.name}-{variant.ratio * 100:g}"
    tags = {TAG_IDENTITY: identity, TAG_RECIPE: variant.sha256, TAG_SOURCE: source["digest"],
            TAG_CHECKPOINT: checkpoint.name, TAG_RECIPE_NAME: recipe.name, TAG_RECIPE_LABEL: label,
            TAG_WATCH_SOURCE: str(watch_source)[:500]}
    if "@" in checkpoint.name and checkpoint.path.parent.name == "snapshots":
        tags[TAG_REVISION] = checkpoint.path.name  # the hub commit of a snapshot
    if origin:
        tags[TAG_CHECKPOINT_URL] = origin[:500]  # where a mirrored checkpoint was found
    return tags


def _compress_one(checkpoint: Checkpoint, variant: Variant, identity: str, source: dict, recipe: Recipe, *,
                  root: Path, client, register_name: str, wait_for_lock: bool, lock_timeout: float | None,
                  watch_source: Any, extra: dict, origin: str | None = None) -> tuple[str, dict]:
    """("existing" | "compressed" | "busy", record) for one identity, under its lock."""
    from flows.compress import compress_flow

    logger = get_run_logger()
    record = {"checkpoint": checkpoint.name, "ratio": variant.ratio, "identity": identity}
    lock = FileLock(lock_path(root, identity), blocking=wait_for_lock, timeout=lock_timeout)
    with lock as held:
        if not held:
            logger.info("%s (ratio %g): another watch run holds %s (%s); left to it", checkpoint.name,
                        variant.ratio, lock.path.name[:16], lock.holder())
            return "busy", {**record, "holder": lock.holder()}
        existing = find_version(client, identity)
        if existing is not None:
            return "existing", {**record, "registered_model": existing.name, "model_version": int(existing.version)}
        run_dir = run_dir_of(root, checkpoint, variant, identity)
        logger.info("%s (ratio %g): compressing into %s", checkpoint.name, variant.ratio, run_dir)
        result = compress_flow(model=checkpoint.spec, run_dir=str(run_dir), mlflow=True,
                               register_name=register_name, progress=False, expect_source_digest=source["digest"],
                               tags=_tags(checkpoint, variant, identity, source, recipe, watch_source, origin),
                               **variant.compress_kwargs(), **extra)
        return "compressed", {**record, "registered_model": result["registered_model"],
                              "model_version": result["model_version"], "run_dir": result["run_dir"],
                              "mlflow_run_id": result["mlflow_run_id"], "model_sha256": result["model_sha256"],
                              "ppl": (result.get("ppl") or {}).get("ppl")}


@flow(name="dotresize-watch", persist_result=False, log_prints=False)
def watch_flow(source: Any, recipe: Any, runs_dir: str | None = None, pattern: str = "*",
               settle_seconds: float = 5.0, marker: str | None = None, register_name: str | None = None,
               wait_for_lock: bool = False, lock_timeout: float | None = None, n_workers: int | None = None,
               device: str | None = None, follow_symlinks: bool = False) -> dict:
    """One tick: compress and register every checkpoint of ``source`` not yet compressed with ``recipe``.

    ``source``: a directory of checkpoint folders / ``.gguf`` files (``pattern`` filters their names), a list,
    hub revisions (``hub:org/name@rev1,rev2``), or the same in an object store (``s3://bucket/prefix``, with the
    usual AWS settings; checkpoints are mirrored under ``<home>/watched/`` and compressed from there). ``recipe``: a YAML recipe file (see :mod:`flows.recipe`) or
    the same as a mapping. ``runs_dir``: where run directories go (default ``$DOTRESIZE_HOME/runs`` or
    ``./runs``; MLflow lives beside it as for ``dotresize compress``). ``settle_seconds``: a checkpoint's files
    must be unchanged for this long. ``marker``: a file a checkpoint must contain to count as complete (e.g.
    ``trainer_state.json``). ``register_name``: the registered model (default: the recipe's, else
    ``dotresize-<source name>``). ``follow_symlinks``: also compress checkpoints that are (or hold) symbolic
    links resolving outside the watched folder (refused by default).

    Returns ``{compressed, existing, busy, pending, refused, failed}`` (lists of records); raises
    :class:`WatchError` after the tick if any compression failed (the others are kept).
    """
    from flows.settings import apply_offline_defaults

    apply_offline_defaults()
    logger = get_run_logger()
    check_pattern(pattern)
    spec = load_recipe(recipe)
    root = runs_root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    register_name = register_name or spec.variants[0].register_name or default_register_name(source)
    client = _tracking_client(root)
    cache = DigestCache(home_of(root) / "digests.json")
    if isinstance(source, str) and is_remote(source):
        names, ready, pending, origins = _remote_ready(source, pattern, settle_seconds, marker,
                                                       mirror_root(root, source))
        folders: dict = {}
        refused: list[dict] = []
    else:
        found, refused = _find(source, pattern, follow_symlinks)
        folders = {c.path: folder for c, folder in found}
        names, origins = [c.name for c, _ in found], {}
        ready, pending = _ready([c for c, _ in found], settle_seconds, marker)
    report: dict[str, Any] = {"source": str(source), "recipe": spec.name,
                              "recipe_sha256": [v.sha256 for v in spec.variants], "runs_dir": str(root),
                              "registered_model": register_name, "checkpoints": names,
                              "compressed": [], "existing": [], "busy": [], "pending": pending,
                              "refused": refused, "failed": []}
    for item in refused:
        logger.warning("%s: refused: %s", item["checkpoint"], item["reason"])
    for item in pending:
        logger.info("%s: not ready (%s); left for the next tick", item["checkpoint"], item["reason"])
    extra = {k: v for k, v in {"n_workers": n_workers, "device": device}.items() if v is not None}
    for checkpoint in ready:
        folder = folders.get(checkpoint.path)
        leak = escape(checkpoint.path, folder) if folder is not None and not follow_symlinks else None
        if leak is not None:  # a link made since the folder was scanned
            item = {"checkpoint": checkpoint.name, "reason": f"a symbolic link leads outside the watched folder "
                                                             f"{folder} ({leak}): pass --follow-symlinks"}
            logger.warning("%s: refused: %s", item["checkpoint"], item["reason"])
            report["refused"].append(item)
            continue
        try:
            source_record = source_meta(checkpoint, cache)
        except (DotResizeError, OSError) as error:
            report["pending"].append({"checkpoint": checkpoint.name, "reason": str(error).splitlines()[0]})
            continue
        finally:
            cache.save()
        for variant in spec.variants:
            identity = identity_of(source_record["digest"], variant.sha256)
            existing = find_version(client, identity)
            if existing is not None:
                report["existing"].append({"checkpoint": checkpoint.name, "ratio": variant.ratio,
                                           "identity": identity, "registered_model": existing.name,
                                           "model_version": int(existing.version)})
                continue
            try:
                outcome, record = _compress_one(checkpoint, variant, identity, source_record, spec, root=root,
                                                client=client, register_name=register_name,
                                                wait_for_lock=wait_for_lock, lock_timeout=lock_timeout,
                                                watch_source=source, extra=extra,
                                                origin=origins.get(checkpoint.path))
            except Exception as error:  # one bad checkpoint does not stop the others
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                logger.error("%s (ratio %g) failed: %s", checkpoint.name, variant.ratio, message)
                report["failed"].append({"checkpoint": checkpoint.name, "ratio": variant.ratio,
                                         "identity": identity, "error": message})
                continue
            report[outcome].append(record)
            if outcome == "compressed":
                logger.info("%s (ratio %g): registered %s v%s", checkpoint.name, variant.ratio,
                            record["registered_model"], record["model_version"])
    logger.info("watch %s: %d compressed, %d already done, %d busy, %d not ready, %d refused, %d failed", source,
                len(report["compressed"]), len(report["existing"]), len(report["busy"]), len(report["pending"]),
                len(report["refused"]), len(report["failed"]))
    if report["failed"]:
        first = report["failed"][0]
        raise WatchError(f"{len(report['failed'])} compression(s) failed, first {first['checkpoint']} "
                         f"(ratio {first['ratio']:g}): {first['error']}")
    return report


def run_watch(**kwargs: Any) -> dict:
    """:func:`watch_flow` with the offline defaults (what ``dotresize watch`` calls)."""
    from flows.settings import apply_offline_defaults

    apply_offline_defaults()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return watch_flow(**kwargs)


__all__ = ["watch_flow", "run_watch", "identity_of", "find_checkpoints", "find_version", "source_meta",
           "WatchError", "TAG_IDENTITY", "TAG_RECIPE", "TAG_SOURCE"]
