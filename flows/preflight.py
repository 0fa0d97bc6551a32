"""Every input of ``dotresize compress`` checked before any work: one line per problem, nothing created.

:func:`check_compress` runs first in the command. The cheap checks come first and import nothing heavy, so a
bad path or file is refused in well under a second:

* paths: ``--out`` never equals, contains or sits inside the run directory, the MLflow store
  (``<home>/mlflow.db``, ``<home>/mlartifacts``), the source model or the calibration file; ``--overwrite``
  replaces only a previous dotresize export (one holding ``dotresize.json`` or ``lineage.json``); the run
  directory, every directory already in it (a read-only Zarr store), ``--out``'s parent and the MLflow home
  are writable; with ``--no-wait``, no other process holds the run directory;
* model files: ``config.json`` parses; every safetensors header parses, its tensors' offsets tile the file and
  the file has exactly that length; a sharded checkpoint's index names present shards holding its tensors; a
  ``.gguf`` file's header, metadata and tensor table parse and it holds every tensor's bytes;
* a calibration file decodes as UTF-8 and a ``.jsonl`` file is one object with a string ``text`` per line.

Then, with transformers: the config loads and its family is supported; the tensor shapes the config implies (a
meta-device model, no memory) match the files'; the tokenizer loads and the calibration text holds the requested
windows (a request for more is refused with the number available, see :func:`dotresize.data.sample_windows`);
and the run's estimated size (:mod:`storage.estimate`) fits in the free space.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from dotresize.export import COMPRESSION_FILE
from storage.rundir import LINEAGE

#: export markers: a directory holding one of these is a previous dotresize export (``--overwrite`` may replace it)
EXPORT_MARKERS = (COMPRESSION_FILE, LINEAGE)
NAMED_DATA = ("wikitext2", "wikitext2-test")
#: safetensors dtypes and their element sizes
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
              "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8, "F4": 1,
              "F6_E2M3": 1, "F6_E3M2": 1}
_MAX_HEADER = 100 * 1024 * 1024


class PreflightError(Exception):
    """An input of the command is unusable; the message (one line) says what to change."""


@dataclass(frozen=True)
class Paths:
    """Where the command will write (local paths resolved; ``run`` is None for the default or a remote URL)."""

    run: Path | None
    run_pattern: str | None      # the default run directory, as a glob under ./runs
    out: Path | None
    mlflow_home: Path | None
    protected: tuple[Path, ...]  # the MLflow store files


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class Checked:
    """What the checks learned (used for messages and the disk estimate)."""

    paths: Paths
    parameters: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    windows: int | None = None
    estimate_bytes: int | None = None


# --- entry point -----------------------------------------------------------------------------------------------
def check_compress(args, compression=None) -> Checked:
    """All checks for ``dotresize compress`` (``args`` as parsed; ``compression``, the CompressionConfig, against
    the model's shape when given); raises :class:`PreflightError` on the first problem, or the one-line
    :class:`dotresize.DotResizeError` of the source/data resolution."""
    paths = check_paths(args)
    model_path = _local_model_path(args.model)
    tensors = check_model_files(model_path) if model_path is not None else None
    if args.calib_data not in NAMED_DATA:
        check_calibration_file(args.calib_data)
    return _check_with_transformers(args, paths, tensors, compression)


# --- paths -----------------------------------------------------------------------------------------------------
def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _overlap(a: Path, b: Path) -> bool:
    return _inside(a, b) or _inside(b, a)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(path: Path, what: str) -> None:
    """``path`` (existing or to be created) can be written: the directory itself when it exists, else its
    nearest existing ancestor. ``os.access`` honours read-only mounts for root too."""
    target = _existing_ancestor(path)
    if not target.is_dir():
        raise PreflightError(f"{what} {path}: {target} is a file, not a directory: choose another path")
    if not os.access(target, os.W_OK | os.X_OK):
        where = "" if target == path else f" (its nearest existing parent {target} is not)"
        raise PreflightError(f"{what} {path} is not writable{where}: choose a writable location or fix its "
                             "permissions")


def _check_tree_writable(root: Path, what: str) -> None:
    """Every directory already under ``root`` is writable (stages rewrite files in them)."""
    for directory, _, _ in os.walk(root):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PreflightError(f"{what} holds {directory}, which is not writable (read-only store or "
                                 "permissions): make it writable, or choose another --run-dir")


def _mlflow_store(run: Path | None, default_parent: Path) -> tuple[Path | None, tuple[Path, ...]]:
    """The MLflow home and the store paths ``--out`` must keep off (as flows/mlflow_logging.py chooses them)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if os.environ.get("DOTRESIZE_HOME"):
        home = _resolved(os.environ["DOTRESIZE_HOME"])
    elif run is not None:
        home = run.parent
    else:
        home = default_parent
    if uri:
        if uri.startswith("sqlite:///"):
            return None, (_resolved(uri[len("sqlite:///"):]),)
        if uri.startswith("file://"):
            return None, (_resolved(uri[len("file://"):]),)
        if "://" not in uri:
            return None, (_resolved(uri),)
        return None, ()
    return home, _mlflow_store_files(home)


def _mlflow_store_files(home: Path) -> tuple[Path, Path]:
    """The default MLflow store under ``home``: its database and its artifact root."""
    return home / "mlflow.db", home / "mlartifacts"


def check_paths(args) -> Paths:
    """Run directory, ``--out`` and MLflow store: writable, and ``--out`` overlapping none of them."""
    remote_run = bool(args.run_dir) and _is_url(args.run_dir)
    in_memory = getattr(args, "in_memory", False)
    run = None if (in_memory or remote_run or not args.run_dir) else _resolved(args.run_dir)
    # the default run directory is ./runs/<model>-<method>-<12 hex digits of the run key>
    pattern = None if (in_memory or args.run_dir) else f"*-{args.method}-" + "[0-9a-f]" * 12
    runs_parent = _resolved(Path.cwd() / "runs")
    mlflow = not in_memory and not args.no_mlflow
    home, protected = _mlflow_store(run, runs_parent) if mlflow else (None, ())
    if remote_run and mlflow and not os.environ.get("DOTRESIZE_HOME") and not os.environ.get("MLFLOW_TRACKING_URI"):
        home = _resolved(Path.home() / ".dotresize")
        protected = _mlflow_store_files(home)
    out = _resolved(args.out) if args.out else None
    if out is not None:
        _check_out(args, out, run, pattern, runs_parent, protected)
    if run is not None:
        if run.exists() and not run.is_dir():
            raise PreflightError(f"--run-dir {run} is a file: pass a directory")
        _check_writable_dir(run, "run directory")
        if run.is_dir():
            _check_tree_writable(run, f"run directory {run}")
    elif not in_memory and not remote_run:  # ./runs/<model>-<method>-<key>: the key is known once the run starts
        _check_writable_dir(runs_parent, "run directory parent")
    if home is not None:
        _check_writable_dir(home, "MLflow home (DOTRESIZE_HOME, else the run directory's parent)")
        database = _mlflow_store_files(home)[0]
        if database.exists() and not os.access(database, os.W_OK):
            raise PreflightError(f"the MLflow database {database} is not writable: fix its permissions, set "
                                 "DOTRESIZE_HOME elsewhere, or pass --no-mlflow")
    if getattr(args, "no_wait", False) and run is not None and run.is_dir():
        _check_not_busy(str(run))
    return Paths(run=run, run_pattern=pattern, out=out, mlflow_home=home, protected=protected)


def _check_out(args, out: Path, run: Path | None, pattern: str | None, runs_parent: Path,
               protected: tuple[Path, ...]) -> None:
    if run is not None and _overlap(out, run):
        raise PreflightError(f"--out {out} overlaps the run directory {run}: choose an --out outside it (and not "
                             "holding it)")
    if pattern is not None:
        if _inside(runs_parent, out):
            raise PreflightError(f"--out {out} holds the run directories in {runs_parent}: choose another --out "
                                 "(or pass --run-dir elsewhere)")
        for parent in (out, *out.parents):
            if parent.parent == runs_parent and fnmatch.fnmatchcase(parent.name, pattern):
                raise PreflightError(f"--out {out} lies inside a run directory ({parent}): choose an --out outside "
                                     "it")
    for store in protected:
        if _overlap(out, store):
            raise PreflightError(f"--out {out} overlaps the MLflow store {store}: choose another --out")
    for what, spec in (("the source model", args.model), ("the calibration file", args.calib_data)):
        if spec and spec not in NAMED_DATA and Path(spec).expanduser().exists() and _overlap(
                out, _resolved(spec)):
            raise PreflightError(f"--out {out} overlaps {what} {_resolved(spec)}: choose another --out")
    if out.exists():
        if not out.is_dir():
            raise PreflightError(f"output path {out} exists and is not a directory: choose another --out")
        if any(out.iterdir()):
            if not args.overwrite:
                raise PreflightError(f"output directory {out} exists and is not empty: choose another --out or pass "
                                     "--overwrite (which replaces only a previous dotresize export)")
            if not is_export(out):
                raise PreflightError(f"--overwrite replaces only a previous dotresize export, and {out} is not one "
                                     f"(no {' or '.join(EXPORT_MARKERS)}): choose another --out")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PreflightError(f"--out {out} is not writable: choose a writable location or fix its permissions")
    _check_writable_dir(out.parent, f"--out {out}: its parent")


def is_export(path: Path) -> bool:
    """A previous dotresize export (what ``--overwrite`` may replace)."""
    return path.is_dir() and any((path / marker).is_file() for marker in EXPORT_MARKERS)


def busy_message(run, record) -> str:
    """The one line of ``--no-wait`` for a run directory whose lease ``record`` another process holds."""
    return (f"run {run.uri()} is in use by {record.describe()}: wait for it to finish, or run without --no-wait "
            "to wait for it")


def _check_not_busy(run_url: str) -> None:
    from storage.lease import RunLease

    lease = RunLease(run_url)
    holder = lease.holder()
    if holder is not None:
        raise PreflightError(busy_message(lease.run, holder))


# --- model files -----------------------------------------------------------------------------------------------
def _local_model_path(spec: str | None) -> Path | None:
    """The local file or directory ``--model`` names, or None (the packaged default, a hub id, a missing path:
    :func:`dotresize.sources.resolve_source` says what is wrong with those)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _problem(path: Path, why: str) -> PreflightError:
    return PreflightError(f"model file {path} {why}: re-download or re-export the model")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensors of a safetensors file, after checking that the header parses, every tensor's byte range matches
    its dtype and shape, the ranges tile the data section and the file has exactly that length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise _problem(path, f"is truncated ({size} bytes, no safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > _MAX_HEADER or 8 + length > size:
                raise _problem(path, f"is not a complete safetensors file (header of {length} bytes in a "
                                     f"{size}-byte file)")
            header = json.loads(handle.read(length))
    except IsADirectoryError:
        raise PreflightError(f"{path} is a directory, not a safetensors file: remove it or move it aside") from None
    except PermissionError:
        raise PreflightError(f"model file {path} cannot be read (permission denied): fix its permissions") from None
    except (ValueError, UnicodeDecodeError):
        raise _problem(path, "has an unreadable safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise _problem(path, "has a safetensors header that is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _problem(path, f"has a malformed header entry for tensor {name!r}") from None
        if dtype not in _ST_DTYPES or any(d < 0 for d in shape):
            raise _problem(path, f"has tensor {name!r} of unknown dtype {dtype!r} or negative shape {list(shape)}")
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype] or begin < 0:
            raise _problem(path, f"has tensor {name!r} whose {end - begin} bytes do not hold shape {list(shape)} "
                                 f"of {dtype}")
        tensors[name] = TensorInfo(dtype, shape, path.name)
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise _problem(path, "has overlapping or gapped tensor data")
        position = end
    if size != 8 + length + position:
        raise _problem(path, f"is truncated or padded ({size} bytes, its header describes {8 + length + position})")
    return tensors


def _check_index(directory: Path, index: Path, headers: dict[str, dict[str, TensorInfo]]) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise PreflightError(f"{index} is not a valid index (a JSON object with a 'weight_map' of tensor -> shard "
                             "file): re-download or re-export the model") from None
    for tensor, shard in weight_map.items():
        if Path(shard).name != shard or shard in (".", ".."):
            raise PreflightError(f"{index} names shard {shard!r} outside the model directory: re-export the model")
        if shard not in headers:
            raise PreflightError(f"{index} lists shard {shard}, which is missing from {directory}: re-download the "
                                 "model")
        if tensor not in headers[shard]:
            raise PreflightError(f"{index} places tensor {tensor!r} in {shard}, which does not hold it: re-download "
                                 "or re-export the model")


def check_model_files(path: Path) -> dict[str, TensorInfo] | None:
    """Headers and sizes of a local model (a directory or a ``.gguf`` file); returns the safetensors tensors
    (None for GGUF)."""
    if path.is_file():
        if path.suffix != ".gguf":
            return None  # resolve_source refuses it in one line
        _check_gguf(path)
        return None
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf(ggufs[0])
        return None
    config = path / "config.json"
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PreflightError(f"{config} is not valid JSON: re-download or re-export the model") from None
    if not isinstance(parsed, dict):
        raise PreflightError(f"{config} is not a JSON object: re-download or re-export the model")
    headers = {p.name: read_safetensors_header(p) for p in sorted(path.glob("*.safetensors"))}
    for index in sorted(path.glob("*.safetensors.index.json")):
        _check_index(path, index, headers)
    tensors: dict[str, TensorInfo] = {}
    for header in headers.values():
        tensors.update(header)
    return tensors


def _check_gguf(path: Path) -> None:
    if path.is_dir():
        raise PreflightError(f"{path} is a directory, not a GGUF file: pass the .gguf file itself")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise PreflightError(f"model file {path} cannot be read ({error.strerror}): fix its permissions") from None
    if len(magic) < 4:
        raise _problem(path, f"is truncated ({len(magic)} bytes)")
    if magic != b"GGUF":
        raise _problem(path, "is not a GGUF file (no GGUF magic at its start)")
    from storage.checkpoints import gguf_problem

    problem = gguf_problem(path)
    if problem is not None:
        detail = problem.removeprefix(path.name).lstrip(": ")
        if "incomplete" in detail:
            raise _problem(path, f"is truncated: {detail.removeprefix('is ')}")
        raise _problem(path, "is not a complete GGUF file (its header, metadata or tensor table cannot be read)")


# --- calibration file ------------------------------------------------------------------------------------------
def check_calibration_file(spec: str) -> None:
    """The rules :func:`dotresize.data.load_text` applies to a file (its own functions), before any work."""
    from dotresize.data import decode_text, jsonl_rows
    from dotresize.errors import CalibrationError

    path = Path(spec).expanduser()
    if path.is_dir():
        raise PreflightError(f"--calib-data {spec} is a directory: pass a .txt or .jsonl file or one of "
                             f"{', '.join(NAMED_DATA)}")
    if not path.is_file():
        raise PreflightError(f"no data file {spec}: pass an existing .txt or .jsonl file or one of "
                             f"{', '.join(NAMED_DATA)}")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise PreflightError(f"--calib-data {spec} cannot be read ({error.strerror}): fix its permissions") from None
    try:
        text = decode_text(raw, f"--calib-data {spec}")
        if path.suffix == ".jsonl":
            jsonl_rows(text, f"--calib-data {spec}")
    except CalibrationError as error:
        raise PreflightError(str(error)) from None


# --- checks that need transformers -----------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _check_mlp_plan(compression, config, layers: int) -> None:
    """The MLP axis' widths / keep-sets fit the model (one line: layer count, indices below the intermediate size)."""
    if compression is None or not compression.mlp_active:
        return
    from dotresize.mlp.model import plan_mlp_widths

    from dotresize.adapters import intermediate_size_of

    intermediate = int(intermediate_size_of(config) or 0)
    if intermediate < 1:
        raise PreflightError(f"{type(config).__name__} has no intermediate_size: the MLP axis (--mlp-ratio) needs "
                             "one; compress without it")
    plan_mlp_widths(compression, intermediate, layers)  # InvalidConfigError: one line


def _check_with_transformers(args, paths: Paths, tensors: dict[str, TensorInfo] | None,
                             compression=None) -> Checked:
    from dotresize.adapters import adapter_class_for_config, check_layout, intermediate_size_of
    from dotresize.data import load_text, tokenize
    from dotresize.sources import resolve_source

    source = resolve_source(args.model)  # one-line errors for a missing path, an offline hub id, pickles
    if source.gguf_file:
        _check_gguf(source.directory / source.gguf_file)
    config = _load_config(source, args.trust_remote_code)
    adapter = adapter_class_for_config(config)  # one line naming the supported families
    if compression is not None:  # a family without a stock form of the global layout refuses it in one line
        check_layout(adapter, compression.layout, compression.residual_active)
    parameters = _check_shapes(source, config, tensors, args.trust_remote_code)
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    _check_mlp_plan(compression, config, layers)
    text = load_text(args.calib_data)  # the authoritative decoding (one-line CalibrationError / DataNotFoundError)
    windows = _check_windows(source, text, args, tokenize)
    estimate = _check_space(args, paths, parameters, hidden, layers, tensors,
                            int(intermediate_size_of(config) or 0))
    return Checked(paths, parameters, hidden, layers, windows, estimate)


def _load_config(source, trust_remote_code: bool):
    from dotresize.sources import load_config

    try:
        return load_config(source, trust_remote_code)
    except Exception as error:
        if type(error).__module__.startswith("dotresize"):
            raise
        where = source.directory / (source.gguf_file or "config.json")
        raise PreflightError(f"{where} cannot be read as a model config ({_first_line(error)}): re-download or "
                             "re-export the model") from None


def _check_shapes(source, config, tensors: dict[str, TensorInfo] | None, trust_remote_code: bool) -> int | None:
    """Shapes the config implies (a meta-device model) against the files' headers; returns the parameter count."""
    import warnings

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise PreflightError(f"{source.directory / 'config.json'} describes no buildable model "
                             f"({_first_line(error)}): re-download or re-export the model") from None
    # tied parameters (lm_head -> embed_tokens) are one tensor in the files: one group of names, counted once
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    group_of = {name: key for key, names in groups.items() for name in names}
    for target, tied_to in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in group_of and tied_to in group_of and group_of[target] != group_of[tied_to]:
            moved = groups.pop(group_of[target])
            groups[group_of[tied_to]].extend(moved)
            group_of.update({name: group_of[tied_to] for name in moved})
    parameters = sum(model.get_parameter(names[0]).numel() for names in groups.values())
    if tensors is None or source.gguf_file:
        return parameters
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in expected.items():
        found = tensors.get(name)
        if found is not None and found.shape != shape:
            raise PreflightError(f"{source.directory / found.file}: tensor {name!r} has shape {list(found.shape)} but "
                                 f"config.json implies {list(shape)}: the weights do not belong to this config")
    if any(name in tensors for name in expected):  # the files use the model's names: every parameter must be there
        for names in groups.values():
            if not any(name in tensors for name in names):
                raise PreflightError(f"{source.directory} lacks tensor {names[0]!r} that config.json implies: the "
                                     "checkpoint is incomplete; re-download or re-export it")
    return parameters


def _check_windows(source, text, args, tokenize) -> int:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **source.load_kwargs())
    except Exception as error:
        raise PreflightError(f"the tokenizer of {source.directory} cannot be loaded ({_first_line(error)}): "
                             "re-download or re-export the model") from None
    tokens = int(tokenize(tokenizer, text.text).numel())
    windows = tokens // args.calib_seqlen
    name = args.calib_data
    if windows < args.calib_samples:
        if windows == 0:
            raise PreflightError(f"the calibration text {name} has {tokens} tokens, fewer than one sequence of "
                                 f"{args.calib_seqlen}: use a longer text or a shorter --calib-seqlen")
        raise PreflightError(f"--calib-samples {args.calib_samples} asks for more windows than the calibration text "
                             f"{name} holds: {windows} windows of {args.calib_seqlen} tokens ({tokens} tokens); pass "
                             f"--calib-samples {windows} or fewer, a longer text, or a shorter --calib-seqlen")
    return windows


def _kept_width(hidden: int, args) -> int:
    width = int(math.floor((1.0 - args.ratio) * hidden))
    round_to = getattr(args, "round_to", 1) or 1
    return max(round_to, width // round_to * round_to)


def _du(path: Path) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def _check_space(args, paths: Paths, parameters: int | None, hidden: int, layers: int,
                 tensors: dict[str, TensorInfo] | None, intermediate: int = 0) -> int | None:
    from storage.estimate import dtype_bytes, estimate_run_bytes, human

    if parameters is None:
        return None
    # the export's dtype: --export-dtype, else the source's at rest (most of its floating tensors; GGUF: float32)
    dtypes = [t.dtype for t in (tensors or {}).values() if t.dtype in ("F32", "F16", "BF16", "F64")]
    export_dtype = getattr(args, "export_dtype", None) or (max(set(dtypes), key=dtypes.count) if dtypes else None)
    export_bytes = dtype_bytes(export_dtype, default=4)
    estimate = estimate_run_bytes(num_layers=layers, hidden_size=hidden, kept_width=_kept_width(hidden, args),
                                  calibration_tokens=args.calib_samples * args.calib_seqlen, parameters=parameters,
                                  export_bytes_per_parameter=export_bytes,
                                  intermediate_size=intermediate if getattr(args, "mlp_ratio", 0) else 0,
                                  mlp_kept=int((1.0 - getattr(args, "mlp_ratio", 0.0)) * intermediate),
                                  mlp_sequential=getattr(args, "mode", "parallel") == "sequential")
    needs: dict[Path, list[tuple[str, int]]] = {}

    def need(where: Path | None, what: str, nbytes: int) -> None:
        if where is not None and nbytes > 0:
            needs.setdefault(_existing_ancestor(where), []).append((what, nbytes))

    if not getattr(args, "in_memory", False):
        run = paths.run if paths.run is not None else (None if args.run_dir else Path.cwd() / "runs")
        existing = _du(paths.run) if paths.run is not None and paths.run.is_dir() else 0
        need(run, "the run directory", estimate.total - existing)
        if paths.mlflow_home is not None:
            need(paths.mlflow_home, "the model logged to MLflow", estimate.export)
    need(paths.out, "--out", estimate.export)
    by_device: dict[int, tuple[Path, list[tuple[str, int]]]] = {}
    for where, items in needs.items():
        device = where.stat().st_dev
        place, listed = by_device.get(device, (where, []))
        by_device[device] = (place, listed + items)
    for place, items in by_device.values():
        total = sum(n for _, n in items)
        free = shutil.disk_usage(place).free
        if total > free:
            parts = ", ".join(f"{what} {human(n)}" for what, n in items)
            raise PreflightError(f"not enough free space on the filesystem of {place}: this run needs about "
                                 f"{human(total)} ({parts}; activations {human(estimate.activations)} for "
                                 f"{args.calib_samples} x {args.calib_seqlen} calibration tokens) and "
                                 f"{human(free)} are free: free some space, choose another --run-dir/--out, or use "
                                 "fewer --calib-samples")
    return estimate.total


__all__ = ["check_compress", "check_paths", "check_model_files", "check_calibration_file",
           "read_safetensors_header", "is_export", "busy_message", "PreflightError", "Checked", "EXPORT_MARKERS"]
