"""The run directory: a local path or any fsspec URL, written atomically.

Local disks (and remote filesystems that rename): a temporary name, then a rename. Object stores (``s3://``,
``gs://``, ``az://``, ``memory://``) have no rename: there every file is written whole in one request (a single
PUT, or a multipart upload, which becomes visible only when it completes), so a reader sees the old object,
none, or the whole new one; a stage is complete only when its manifest (``stages/...``) or its Zarr ``complete``
attribute, written last, says so. ``s3://`` goes through s3fs: endpoint and credentials come from the usual AWS
settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``~/.aws``), so a Dask worker on another host needs nothing but the URL and those settings. Listings are never
cached (another process, a worker elsewhere, may have written since).

This module is the only place that knows the layout of a run (see ``architecture.md``)::

    <run>/recipe.yaml  source.json  calibration.json  calibration/input_ids.safetensors
         inspect/             the source's config, generation config and tokenizer (no weights: every stage
                              reads the source a layer at a time and fuses its norms on the fly)
         activations.zarr/    point_<p>/{acts, [sample], [kept]}  (+ pooled/{gram, abs_sum, sum} for global)
                              mlp_<l>/{gram, abs_sum, sum}: layer l's MLP intermediate statistics (MLP axis)
                              mlp_input_<l>/acts: layer l's input through the reduced MLPs (sequential MLP axis)
         mlp/                 layer_<l>.safetensors: layer l's MLP reduction (keep, removed, A)
         bases/               point_<p>.safetensors + point_<p>.json  (global.* for the global layout)
         layers/              layer_<l>.safetensors (one absorbed layer = one shard of the export)
         model/               the compressed HF directory: sharded safetensors (the layer files, hard-linked
                              where the filesystem allows) + index, config, tokenizer, lineage.json
         lineage.json  timings.json  mlflow.json  eval/  stages/<stage>/<name>.json (manifests)
         .prefect/<stage>/[<name>/]<key>.json   Prefect's result record of the task run that made or reused a
                              stage output with that key (hidden: the run's digests and copies skip it)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dotresize.permissions import apply_umask_tree

from .atomic import atomic_file, swap_dir, write_atomic
from .digests import sha256_bytes
from .errors import CorruptArtifactError, MissingArtifactError

log = logging.getLogger("dotresize.storage")

# --- layout -------------------------------------------------------------------------------------------------
RECIPE = "recipe.yaml"
SOURCE = "source.json"
CALIBRATION = "calibration.json"
CALIBRATION_IDS = "calibration/input_ids.safetensors"
INSPECT = "inspect"
ACTIVATIONS = "activations.zarr"
BASES = "bases"
LAYERS = "layers"
ENDS = "layers/ends.safetensors"
MODEL = "model"
LINEAGE = "lineage.json"
TIMINGS = "timings.json"
EVAL = "eval"
STAGES = "stages"
MLFLOW = "mlflow.json"
CONSOLE_LOG = "compress.log"
MLP = "mlp"
#: Prefect's result records of the stage tasks (tasks/cache.py): one small JSON per stage output and key
TASK_RECORDS = ".prefect"


def point_name(point: int | str) -> str:
    """``point_<p>`` for a slice point, or the name itself (``pooled``) for pseudo-points."""
    return f"point_{point}" if isinstance(point, int) else str(point)


def basis_name(point: int | str) -> str:
    return f"point_{point}" if isinstance(point, int) else "global"


def basis_file(point: int | str) -> str:
    return f"{BASES}/{basis_name(point)}.safetensors"


def basis_meta_file(point: int | str) -> str:
    return f"{BASES}/{basis_name(point)}.json"


def layer_file(layer: int) -> str:
    return f"{LAYERS}/layer_{layer}.safetensors"


def mlp_stats_name(layer: int) -> str:
    """The activation-store group of layer ``layer``'s MLP intermediate statistics."""
    return f"mlp_{layer}"


def mlp_input_name(layer: int) -> str:
    """The activation-store group of layer ``layer``'s input through the already-reduced MLPs (sequential)."""
    return f"mlp_input_{layer}"


def mlp_file(layer: int) -> str:
    """Layer ``layer``'s MLP reduction: kept and removed neurons and the map A."""
    return f"{MLP}/layer_{layer}.safetensors"


def shard_name(number: int, total: int) -> str:
    """Hugging Face's shard file name: ``model-00002-of-00031.safetensors`` (1-based)."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def eval_file(kind: str, target: str = "model") -> str:
    """The result file of evaluation ``kind`` (ppl, zeroshot, bench) of the compressed model or of its source."""
    return f"{EVAL}/{kind}.json" if target == "model" else f"{EVAL}/{kind}_source.json"


def is_eval_file(rel: str) -> bool:
    return rel.startswith(EVAL + "/")


def manifest_file(stage: str, name: str | None = None) -> str:
    return f"{STAGES}/{stage}.json" if name is None else f"{STAGES}/{stage}/{name}.json"


def task_record_file(stage: str, name: str | None, key: str) -> str:
    """Where the result record of the task run that produced (or reused) stage output ``stage[name]`` with content
    key ``key`` is kept: beside the outputs, so that losing the run directory loses it too."""
    return f"{TASK_RECORDS}/{stage}/{key}.json" if name is None else f"{TASK_RECORDS}/{stage}/{name}/{key}.json"


#: the OpenSSF model signing bundle inside a model directory (see :mod:`storage.signing`)
SIGNATURE = "model.sig"


def at(root: str | os.PathLike, rel: str = "") -> Path:
    """The local path of the layout entry ``rel`` (``/``-separated, e.g. :data:`MODEL` or ``eval_file("ppl")``)
    under the local directory ``root``: of a run, or of anything laid out like one (an MLflow run's artifacts)."""
    return Path(root).joinpath(*[part for part in rel.split("/") if part])


def _where(where) -> tuple[Any, str]:
    """(filesystem, path) of a local path, a URL or a :class:`RunDir`."""
    if isinstance(where, RunDir):
        return where.fs, where.path()
    if isinstance(where, (str, os.PathLike)) and "://" not in str(where):
        return None, os.path.abspath(os.path.expanduser(os.fspath(where)))
    run = RunDir(str(where))
    return run.fs, run.path()


def _isfile(fs, path: str, rel: str) -> bool:
    if fs is None:
        return os.path.isfile(os.path.join(path, *rel.split("/")))
    return fs.isfile(posixpath.join(path, rel))


def _isdir(fs, path: str, rel: str = "") -> bool:
    if fs is None:
        return os.path.isdir(os.path.join(path, *[p for p in rel.split("/") if p]))
    return fs.isdir(posixpath.join(path, rel) if rel else path)


def is_model_dir(where: str | os.PathLike | RunDir) -> bool:
    """Whether ``where`` (a local path, a URL) is a compressed model directory the pipeline exported: a directory
    holding its ``lineage.json`` (a run's ``model/``, a copy made with ``--out``, the model logged to MLflow)."""
    fs, path = _where(where)
    return _isdir(fs, path) and _isfile(fs, path, LINEAGE)


def is_run_dir(where: str | os.PathLike | RunDir) -> bool:
    """Whether ``where`` (a local path, a URL, a :class:`RunDir`) is a pipeline run directory whose export is done:
    it holds its stage manifests (``stages/``) and a model directory (``model/`` with its ``lineage.json``). The
    one test of "is this a run directory?" (evaluate, verify, lineage, sign, bench)."""
    fs, path = _where(where)
    return _isdir(fs, path, STAGES) and _isfile(fs, path, f"{MODEL}/{LINEAGE}")


def run_dir_of(path: str | os.PathLike | None) -> Path | None:
    """The local run directory when ``path`` is one or is the ``model/`` directory inside one, else None."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    p = p.resolve()
    for candidate in (p, p.parent) if p.name == MODEL else (p,):
        if is_run_dir(candidate):
            return candidate
    return None


def model_dir_of(path: str | os.PathLike) -> Path:
    """The model directory of ``path``: a run directory's ``model/``, else ``path`` itself."""
    p = Path(path).expanduser()
    return at(p, MODEL) if is_run_dir(p) else p


def read_mlflow_record(run_dir: str | os.PathLike | None) -> dict | None:
    """A local run directory's MLflow record (``mlflow.json``: tracking_uri, run_id, registered_model, version), or
    None when it has none; undecodable JSON raises :class:`CorruptArtifactError`."""
    if run_dir is None:
        return None
    path = at(run_dir, MLFLOW)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise CorruptArtifactError(f"{path} is not valid JSON: delete it (the next compression records the MLflow "
                                   "run again)") from None
    return record if isinstance(record, dict) else None


#: filesystems whose single write of a whole object is atomic and which have no (atomic) rename
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def open_url(url: str):
    """``(filesystem, path)`` of ``url``; remote filesystems without a listings cache (s3fs caches ``ls`` and
    ``info`` per process, so a file another process wrote would stay invisible)."""
    fs, root = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem) or getattr(fs, "dircache", None) is None:
        return fs, root
    if set(_protocols(fs)) & {"memory"}:
        return fs, root  # one process's dictionary: nothing to go stale
    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except TypeError:
        return fs, root


# --- the run directory ----------------------------------------------------------------------------------------
class RunDir:
    """A run directory on any fsspec filesystem; relative paths use ``/``."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        fs, root = open_url(self.url)
        self.fs = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        #: an object store: whole-object writes are atomic, there is no rename (see the module docstring)
        self.is_object_store = not self.is_local and bool(set(_protocols(fs)) & OBJECT_STORE_PROTOCOLS)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        if self.is_local:
            self.url = self.root

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def __reduce__(self):
        return (RunDir, (self.url,))

    # paths ----------------------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (a local absolute path for local runs)."""
        if not rel:
            return self.root
        return os.path.join(self.root, *rel.split("/")) if self.is_local else posixpath.join(self.root, rel)

    def uri(self, rel: str = "") -> str:
        """A URL naming ``rel`` (what manifests record)."""
        if self.is_local:
            return self.path(rel)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.path(rel)}"

    def local_path(self, rel: str = "") -> Path:
        if not self.is_local:
            raise ValueError(f"{self.url} is not a local run directory")
        return Path(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def listdir(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=self.fs.isdir(path))

    # atomic bytes ----------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` under a temporary name in the same directory, then rename it into place; on an object
        store, as one whole object (one PUT).

        A reader never sees a partial file: either the old content, or nothing, or the complete new one.
        Returns the sha256 of ``data``.
        """
        final = self.path(rel)
        if self.is_object_store:
            self.fs.pipe_file(final, bytes(data))  # atomic: the object appears whole or not at all
            return sha256_bytes(data)
        if self.is_local:
            write_atomic(final, data, fsync=True)
        else:
            self._through_temporary(final, lambda tmp: self.fs.pipe_file(tmp, data))
        return sha256_bytes(data)

    def _through_temporary(self, final: str, write) -> None:
        """``write(tmp)`` to a temporary name beside ``final`` on a remote filesystem with renames, then move it
        into place (the temporary is removed if anything fails)."""
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(final)}.tmp-{uuid.uuid4().hex}")
        try:
            write(tmp)
            if self.fs.exists(final):
                self.fs.rm(final)
            self.fs.mv(tmp, final)
        except BaseException:
            try:
                self.fs.rm(tmp)
            except Exception as error:  # never written, or the filesystem is gone: the first error is the one
                log.debug("%s not removed: %s", tmp, error)
            raise

    def read_bytes(self, rel: str, sha256: str | None = None) -> bytes:
        """Read a file; with ``sha256`` the content is checked and a mismatch raises :class:`CorruptArtifactError`."""
        path = self.path(rel)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise MissingArtifactError(f"{self.uri(rel)} is missing") from None
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise CorruptArtifactError(f"{self.uri(rel)} does not match its recorded sha256")
        return data

    def sha256(self, rel: str) -> str:
        """sha256 of a stored file (streamed for local files)."""
        import hashlib

        digest = hashlib.sha256()
        try:
            with self.fs.open(self.path(rel), "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        except FileNotFoundError:
            raise MissingArtifactError(f"{self.uri(rel)} is missing") from None
        return digest.hexdigest()

    def check_file(self, rel: str, sha256: str) -> tuple[bool, str]:
        """(True, "ok") when ``rel`` exists with the recorded digest, else (False, why)."""
        try:
            actual = self.sha256(rel)
        except MissingArtifactError:
            return False, f"{rel} is missing"
        if actual != sha256:
            return False, f"{rel} does not match its sha256 (corrupted)"
        return True, "ok"

    # JSON / text ------------------------------------------------------------------------------------------------
    def write_json(self, rel: str, data: Any) -> str:
        text = json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n"
        return self.write_bytes(rel, text.encode())

    def read_json(self, rel: str) -> Any | None:
        """The JSON at ``rel``, or None when missing; undecodable JSON raises :class:`CorruptArtifactError`."""
        try:
            data = self.read_bytes(rel)
        except MissingArtifactError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise CorruptArtifactError(f"{self.uri(rel)} is not valid JSON") from None

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    # tensors ----------------------------------------------------------------------------------------------------
    def save_tensors(self, rel: str, tensors: dict, metadata: dict[str, str] | None = None) -> str:
        """safetensors file, written atomically; returns its sha256 (the same tensors give the same bytes)."""
        from safetensors.torch import save, save_file

        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        if self.is_local:
            with atomic_file(self.path(rel), fsync=True) as staged:
                save_file(tensors, staged.path, metadata=metadata)
            return self.sha256(rel)
        return self.write_bytes(rel, save(tensors, metadata=metadata))

    def save_tensor_stream(self, rel: str, entries: list, metadata: dict[str, str] | None = None) -> str:
        """A safetensors file written a chunk of rows at a time (its header first, from the entries' names,
        shapes and dtypes), atomically; ``entries`` have ``name``, ``shape``, ``dtype`` and ``chunks()`` yielding
        the tensor's rows in order. Returns the file's sha256. Nothing but one chunk is ever in memory."""
        import hashlib
        import struct

        header, offset = {}, 0
        for entry in entries:
            nbytes = _numel(entry.shape) * _itemsize(entry.dtype)
            header[entry.name] = {"dtype": _SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        digest = hashlib.sha256()

        def write(path: str) -> None:
            with open(path, "wb") as handle:
                for block in (struct.pack("<Q", len(text)), text):
                    handle.write(block)
                    digest.update(block)
                for entry in entries:
                    written = 0
                    for chunk in entry.chunks():
                        data = chunk.detach().cpu().contiguous().to(entry.dtype).reshape(-1).view(torch_uint8()).numpy()
                        handle.write(data)
                        digest.update(data)
                        written += data.nbytes
                    if written != _numel(entry.shape) * _itemsize(entry.dtype):
                        raise ValueError(f"{entry.name}: {written} bytes produced for shape {entry.shape}")

        if self.is_local:
            with atomic_file(self.path(rel), fsync=True) as staged:
                write(staged.path)
            return digest.hexdigest()
        local_dir = tempfile.mkdtemp(prefix="dotresize-put-")
        try:
            tmp = os.path.join(local_dir, posixpath.basename(rel))
            write(tmp)
            self.put_file(tmp, rel)
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)
        return digest.hexdigest()

    def load_tensors(self, rel: str, sha256: str | None = None) -> dict:
        """Tensors of a safetensors file; with ``sha256`` the file is verified first."""
        from safetensors.torch import load, load_file

        if self.is_local:
            if sha256 is not None:
                ok, why = self.check_file(rel, sha256)
                if not ok:
                    raise (MissingArtifactError if "missing" in why else CorruptArtifactError)(
                        f"{self.uri(rel)}: {why}")
            elif not self.exists(rel):
                raise MissingArtifactError(f"{self.uri(rel)} is missing")
            try:
                return load_file(self.path(rel))
            except Exception as error:
                raise CorruptArtifactError(f"{self.uri(rel)} cannot be read: {error}") from None
        data = self.read_bytes(rel, sha256)
        try:
            return load(data)
        except Exception as error:
            raise CorruptArtifactError(f"{self.uri(rel)} cannot be read: {error}") from None

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        """Upload the complete local file ``local`` as ``rel`` (remote runs): on an object store in one request (a
        multipart upload for a large file is also visible only once complete), elsewhere through a temporary name
        and a rename. Nothing is read into memory as a whole."""
        final = self.path(rel)
        if self.is_object_store:
            self.fs.put_file(str(local), final)
            return
        self._through_temporary(final, lambda tmp: self.fs.put_file(str(local), tmp))

    # zarr -------------------------------------------------------------------------------------------------------
    def zarr_store(self, rel: str):
        """The Zarr store at ``rel``: a local directory, or an fsspec store on the same URL (each chunk and each
        metadata document is one whole object; the ``complete`` attribute, written last, marks a group done)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)
            return LocalStore(self.path(rel))
        options = {"use_listings_cache": False} if "memory" not in _protocols(self.fs) else {}
        try:
            return FsspecStore.from_url(self.uri(rel), storage_options=options or None)
        except TypeError:
            return FsspecStore.from_url(self.uri(rel))

    # directories (exports) ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged_dir(self, rel: str) -> Iterator[Path]:
        """A local directory to fill; on success it replaces ``rel`` as a whole.

        Local runs: the caller's directory is renamed into place (atomic). Object stores (no rename): every file
        is uploaded whole to its final name, objects of an earlier content that the new one lacks are deleted
        afterwards, and the JSON files (index, config, lineage) go last; the caller's manifest, written after
        this block, is what makes the directory complete. Other remote filesystems: uploaded under a temporary
        name and moved into place.
        """
        if self.is_local:
            final = self.local_path(rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            try:
                yield tmp
                apply_umask_tree(tmp)  # mkdtemp made it 0700; files written through mkstemp are 0600
                swap_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        tmp = Path(tempfile.mkdtemp(prefix="dotresize-stage-"))
        if self.is_object_store:
            try:
                yield tmp
                self._upload_tree(tmp, rel)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            yield tmp
            remote_tmp = self.path(f"{rel}.tmp-{uuid.uuid4().hex}")
            self.fs.put(str(tmp) + "/", remote_tmp, recursive=True)
            self.remove(rel)
            self.fs.mv(remote_tmp, self.path(rel), recursive=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _upload_tree(self, local: Path, rel: str) -> None:
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: (p.suffix == ".json", p.relative_to(local).as_posix()))
        names = {p.relative_to(local).as_posix() for p in files}
        base = self.path(rel)
        stale = [p for p in (self.fs.find(base) if self.fs.exists(base) else [])
                 if p[len(base):].lstrip("/") not in names]
        for path in files:
            self.put_file(path, f"{rel}/{path.relative_to(local).as_posix()}")
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def link_into(self, rel: str, target: Path) -> None:
        """Put the file ``rel`` at local path ``target``: a hard link where the filesystem allows (no second
        copy on disk), else a copy."""
        if self.is_local:
            try:
                os.link(self.path(rel), target)
                return
            except OSError:
                shutil.copyfile(self.path(rel), target)
                return
        self.fs.get(self.path(rel), str(target))

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[Path]:
        """A local path holding ``rel`` (the directory itself for local runs, a temporary download otherwise)."""
        if self.is_local:
            yield self.local_path(rel)
            return
        tmp = Path(tempfile.mkdtemp(prefix="dotresize-get-"))
        try:
            target = tmp / posixpath.basename(rel.rstrip("/"))
            if self.fs.isdir(self.path(rel)):
                self.fs.get(self.path(rel) + "/", str(target) + "/", recursive=True)
            else:
                self.fs.get(self.path(rel), str(target))
            yield target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def download(self, rel: str, target: str | os.PathLike) -> Path:
        """Copy ``rel`` (a file, or a directory without its hidden entries such as ``.lease``) to the local path
        ``target``; returns it."""
        target = Path(target)
        base = self.path(rel)
        if not self.fs.isdir(base):
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(base, str(target))
            return target
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.fs.find(base)):
            name = path[len(base):].lstrip("/\\").replace(os.sep, "/")
            if not name or any(part.startswith(".") for part in name.split("/")):
                continue
            local = target.joinpath(*name.split("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(local))
        return target

    def file_digests(self, rel: str) -> dict[str, str]:
        """sha256 of every file under a directory, keyed by path relative to it (hidden files skipped)."""
        out: dict[str, str] = {}
        base = self.path(rel)
        for path in sorted(self.fs.find(base)):
            name = path[len(base):].lstrip("/\\").replace(os.sep, "/")
            if any(part.startswith(".") for part in name.split("/")):
                continue
            out[name] = self.sha256(f"{rel}/{name}")
        return out


def torch_uint8():
    import torch

    return torch.uint8


def _numel(shape) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


class _SafetensorsDtypes(dict):
    def __missing__(self, dtype):
        import torch

        names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                 torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                 torch.bool: "BOOL"}
        self[dtype] = names[dtype]
        return self[dtype]


_SAFETENSORS_DTYPES = _SafetensorsDtypes()


def json_default(value: Any) -> Any:
    """What JSON gets for the few non-JSON values a manifest may hold (numpy scalars, sets and tuples, paths)."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, io.IOBase):
        raise TypeError("file objects are not JSON")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
