"""A model checkpoint read a tensor at a time: safetensors (single file or sharded with an index) or GGUF.

Nothing here loads a whole model. A safetensors shard is opened only while the tensors asked for are copied out
of it (memory-mapped by ``safetensors.safe_open``, closed right after, so no mapping of a 16 GB checkpoint stays
resident); a GGUF tensor is dequantised on its own through the ``gguf`` reader with transformers' name mapping
and per-architecture fixes. Tensors come back in their dtype at rest (bfloat16/float16/float32; quantised GGUF
tensors as float32): the caller casts a layer to float32 only while it works on it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .errors import SourceNotFoundError, UnsafeWeightsError

#: safetensors dtype names → torch dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
INDEX_FILE = "model.safetensors.index.json"
#: GGUF tensors whose rows can be dequantised on their own (no per-architecture row permutation)
_ROW_SLICEABLE = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint says about one tensor before it is read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None   # None: a quantised GGUF type (read back as float32)
    file: str

    @property
    def numel(self) -> int:
        total = 1
        for d in self.shape:
            total *= int(d)
        return total


class TensorReader:
    """Tensor-at-a-time access to a checkpoint, by Hugging Face state-dict name."""

    def infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, materialised (each owns its memory), in their dtype at rest."""
        raise NotImplementedError

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor (the embedding matrix or head, a chunk at a time)."""
        return self.read([name])[name][start:stop].clone()

    def names(self) -> list[str]:
        return list(self.infos())

    def __contains__(self, name: str) -> bool:
        return name in self.infos()


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise SourceNotFoundError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024 * 1024:
            raise SourceNotFoundError(f"{path} has an unreadable safetensors header")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise SourceNotFoundError(f"{path} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise SourceNotFoundError(f"{path} has an unreadable safetensors header")
    return header


class SafetensorsReader(TensorReader):
    """A directory of ``*.safetensors`` (one file, or shards listed by ``model.safetensors.index.json``)."""

    def __init__(self, directory: str | os.PathLike, files: list[Path] | None = None):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if files is None:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [self.directory / f for f in sorted(set(weight_map.values()))]
            else:
                files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise SourceNotFoundError(f"{self.directory} has no *.safetensors weights")
        self._infos: dict[str, TensorInfo] = {}
        for path in files:
            for name, meta in _safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(meta.get("dtype"))
                if dtype is None:
                    raise UnsafeWeightsError(f"{path.name}: tensor {name!r} has unsupported dtype {meta.get('dtype')}")
                self._infos[name] = TensorInfo(name, tuple(int(d) for d in meta["shape"]), dtype, path.name)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self._infos[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(self.directory / file, framework="pt") as handle:  # unmapped again on exit
                for name in wanted:
                    out[name] = handle.get_tensor(name)
        return out

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.directory / self._infos[name].file, framework="pt") as handle:
            return handle.get_slice(name)[start:stop]


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF file's tensor table: where its bytes are and how to view them."""

    name: str
    qtype: int
    dims: tuple[int, ...]      # GGUF order (fastest first); the HF shape is reversed
    offset: int                # absolute offset of its data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def _gguf_string(handle) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > 1 << 30:
        raise ValueError("string too long")
    data = handle.read(length)
    if len(data) != length:
        raise EOFError
    return data.decode("utf-8", errors="replace")


def _gguf_value(handle, kind: int, keep: bool):
    """Read (``keep``) or skip one metadata value; arrays are always skipped (the tokenizer's 100k strings are
    never materialised)."""
    if kind in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[kind]
        data = handle.read(struct.calcsize(fmt))
        if len(data) != struct.calcsize(fmt):
            raise EOFError
        return struct.unpack(fmt, data)[0]
    if kind == 8:
        if keep:
            return _gguf_string(handle)
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(length, os.SEEK_CUR)
        return None
    if kind == 9:
        (item, count) = struct.unpack("<IQ", handle.read(12))
        if item in _GGUF_SCALARS:
            handle.seek(count * struct.calcsize(_GGUF_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_value(handle, item, False)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_tensor_table(path: str | os.PathLike) -> tuple[dict[str, object], list[GGUFTensor], int]:
    """(scalar and string metadata, tensor table, file size) of a GGUF file, reading only its header.

    Raises ``ValueError``/``EOFError``/``struct.error`` on a file that is not (a complete header of) GGUF.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version, count, kvs = struct.unpack("<IQQ", handle.read(20))
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        meta: dict[str, object] = {}
        for _ in range(kvs):
            key = _gguf_string(handle)
            (kind,) = struct.unpack("<I", handle.read(4))
            value = _gguf_value(handle, kind, keep=True)
            if value is not None:
                meta[key] = value
        entries = []
        for _ in range(count):
            name = _gguf_string(handle)
            (ndims,) = struct.unpack("<I", handle.read(4))
            dims = struct.unpack(f"<{ndims}Q", handle.read(8 * ndims))
            qtype, offset = struct.unpack("<IQ", handle.read(12))
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            numel = 1
            for d in dims:
                numel *= int(d)
            entries.append((name, qtype, tuple(int(d) for d in dims), offset, numel * type_size // block))
        alignment = int(meta.get("general.alignment", 32) or 32)
        start = handle.tell()
        start += (-start) % alignment
    return meta, [GGUFTensor(n, q, d, start + o, b) for n, q, d, o, b in entries], size


class GGUFReader(TensorReader):
    """One GGUF file, tensor by tensor: ``gguf`` dequantises each on its own; transformers' tables map names.

    Only the header is parsed (no metadata array is materialised) and a tensor's bytes are read only when it is
    dequantised (no mapping of the file stays resident), so a reader costs a few kilobytes however large the file. The per-architecture fixes
    transformers applies on load (q/k row permutation for Llama, ``norm − 1`` for Gemma) are applied to every
    tensor read, so a tensor equals what ``from_pretrained(gguf_file=...)`` gives.
    """

    def __init__(self, path: str | os.PathLike, config: PretrainedConfig):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = Path(path)
        try:
            meta, table, size = gguf_tensor_table(self.path)
        except (ValueError, EOFError, struct.error, KeyError) as error:
            raise SourceNotFoundError(f"{self.path} is not a readable GGUF file ({error}): re-download it") from None
        architecture = str(meta.get("general.architecture", ""))
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        self._mapping = _gguf_name_map(skeleton, self._processor, config)
        self._tensors: dict[str, GGUFTensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        plain = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
        for tensor in table:
            hf = self._mapping.get(tensor.name)
            if hf is None:
                continue
            if tensor.offset + tensor.nbytes > size:
                raise SourceNotFoundError(f"{self.path} is truncated ({size} bytes; tensor {tensor.name} ends at "
                                          f"{tensor.offset + tensor.nbytes}): re-download it")
            self._tensors[hf] = tensor
            self._infos[hf] = TensorInfo(hf, tensor.shape, plain.get(tensor.qtype), self.path.name)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _data(self, tensor: GGUFTensor, rows: slice | None = None):
        """The tensor's bytes (or a block of its rows), read from the file as ``gguf.dequantize`` expects them."""
        import numpy as np
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(tensor.qtype)
        items = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                 28: np.float64}
        if tensor.qtype in items:
            dtype, shape = items[tensor.qtype], tensor.shape
        else:
            dtype, shape = np.uint8, quant_shape_to_byte_shape(tensor.shape, qtype)
        row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        first, last = (0, shape[0]) if rows is None else (rows.start, min(rows.stop, shape[0]))
        itemsize = np.dtype(dtype).itemsize
        data = np.fromfile(self.path, dtype=dtype, count=(last - first) * row_items,
                           offset=tensor.offset + first * row_items * itemsize)
        return data.reshape((last - first, *shape[1:])), qtype

    def _dequantised(self, tensor: GGUFTensor, rows: slice | None = None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        data, qtype = self._data(tensor, rows)
        weights = dequantize(data, qtype)
        weights = self._processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self._mapping,
                                          parsed_parameters={}).weights
        return torch.from_numpy(np.require(weights, requirements=["C", "W", "O"]))  # copies only a view

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self._dequantised(self._tensors[name]) for name in names}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._tensors[name]
        if len(tensor.dims) != 2 or tensor.name not in _ROW_SLICEABLE:  # processors may permute other rows
            return super().read_rows(name, start, stop)
        return self._dequantised(tensor, slice(start, stop))  # quantised blocks never span rows


def _gguf_name_map(skeleton, processor, config: PretrainedConfig) -> dict[str, str]:
    """GGUF tensor name → HF state-dict name, from gguf's standard name table (what transformers'
    ``get_gguf_hf_weights_map`` computes for a causal LM, without its per-submodule recursion)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_type = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                  "cohere": "command-r"}.get(config.model_type, config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise SourceNotFoundError(f"GGUF files of model type {config.model_type!r} cannot be read by gguf "
                                  f"{_gguf_version()}: convert the checkpoint to safetensors")
    table = get_tensor_name_map(arch, int(config.num_hidden_layers))
    mapping = {}
    for hf_name in skeleton.state_dict():
        hf_name = processor.preprocess_name(hf_name)
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base) if suffix in ("weight", "bias") else table.get_name(hf_name)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}" if suffix in ("weight", "bias") else gguf_name] = hf_name
    return mapping


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def open_reader(directory: Path, gguf_file: str | None, config: PretrainedConfig,
                weight_files: list[Path] | None = None) -> TensorReader:
    """The reader for a resolved source (``dotresize.sources.ModelSource``'s directory and GGUF file)."""
    if gguf_file:
        return GGUFReader(directory / gguf_file, config)
    return SafetensorsReader(directory, weight_files)


def storage_dtype(reader: TensorReader, names: Iterable[str]) -> torch.dtype:
    """The dtype most of ``names`` are stored in (quantised GGUF tensors count as float32)."""
    counts: dict[torch.dtype, int] = {}
    for name in names:
        info = reader.infos()[name]
        dtype = info.dtype or torch.float32
        counts[dtype] = counts.get(dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else torch.float32
