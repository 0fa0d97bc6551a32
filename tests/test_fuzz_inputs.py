"""Issue 12, item 4 (done-when 2): malformed model and calibration files, each given to a real ``dotresize
compress`` process, get exactly one ``dotresize: error:`` line, a non-zero exit, no traceback, and leave nothing
behind: no run directory, no ``--out``, no MLflow store. The checks run before Prefect and heavy imports, so
most cases take well under a second; a few run two at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import tiny_text, write_model_dir

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path, Path], list[str]]  # (case dir, a valid model dir copied there) -> extra CLI arguments
    expect: str                              # a piece of the error line


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _weights(model: Path) -> Path:
    return model / "model.safetensors"


def _model(mutate: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def make(case: Path, model: Path) -> list[str]:
        mutate(model)
        return ["--model", str(model)]
    return make


def _calibration(name: str, content: bytes | None) -> Callable[[Path, Path], list[str]]:
    def make(case: Path, model: Path) -> list[str]:
        path = case / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return ["--model", str(model), "--calib-data", str(path)]
    return make


def _gguf(content: bytes | None) -> Callable[[Path, Path], list[str]]:
    def make(case: Path, model: Path) -> list[str]:
        path = case / "model.gguf"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return ["--model", str(path)]
    return make


def _truncated_gguf(case: Path, model: Path) -> list[str]:
    """A real GGUF file (the tiny model's tensors and metadata, written with the gguf library), cut short."""
    import gguf
    import numpy as np

    path = case / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    for index in range(4):
        writer.add_tensor(f"blk.0.t{index}", np.ones((64, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return ["--model", str(path)]


def _set_config(**changes) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))
    return mutate


def _edit_header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        header, data = _header(_weights(model))
        edit(header)
        _write_header(_weights(model), header, data)
    return mutate


def _drop_tensor(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(_weights(model))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, _weights(model), metadata={"format": "pt"})


def _shard(index: dict) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return mutate


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _wrong_offsets(header: dict) -> None:
    name = _first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]


def _replace_weights(data: bytes | None) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        _weights(model).unlink()
        if data is None:
            _weights(model).mkdir()
        else:
            _weights(model).write_bytes(data)
    return mutate


def _truncate_weights(model: Path) -> None:
    raw = _weights(model).read_bytes()
    _weights(model).write_bytes(raw[: len(raw) // 2])


def _pad_weights(model: Path) -> None:
    with _weights(model).open("ab") as handle:
        handle.write(b"\0" * 64)


def _huge_header(model: Path) -> None:
    raw = _weights(model).read_bytes()
    _weights(model).write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])


def _text_header(text: bytes) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        _weights(model).write_bytes(struct.pack("<Q", len(text)) + text)
    return mutate


def _broken_index(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text("{oops")


def _broken_config(text: str) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / "config.json").write_text(text)
    return mutate


GARBAGE = bytes((i * 197 + 89) % 256 for i in range(4096))

CASES = [
    # safetensors weights
    Case("zero-length safetensors", _model(_replace_weights(b"")), "is truncated (0 bytes"),
    Case("truncated safetensors", _model(_truncate_weights), "model.safetensors"),
    Case("garbage safetensors", _model(_replace_weights(GARBAGE)), "model.safetensors"),
    Case("safetensors header longer than the file", _model(_huge_header), "not a complete safetensors file"),
    Case("safetensors header not JSON", _model(_text_header(b"{not json at all}")), "not JSON"),
    Case("safetensors header a JSON list", _model(_text_header(b"[1, 2, 3]")), "not a JSON object"),
    Case("tensor bytes do not match its shape", _model(_edit_header(_wrong_offsets)), "do not hold shape"),
    Case("safetensors padded after its data", _model(_pad_weights), "padded"),
    Case("model.safetensors is a directory", _model(_replace_weights(None)), "is a directory"),
    Case("shape-mismatched safetensors", _model(_set_config(intermediate_size=128)), "config.json implies"),
    Case("a tensor missing", _model(_drop_tensor), "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
    # shards and config
    Case("index.json not JSON", _model(_broken_index), "is not a valid index"),
    Case("index names a missing shard", _model(_shard({"weight_map": {"model.embed_tokens.weight":
                                                                       "model-00002-of-00002.safetensors"}})),
         "which is missing"),
    Case("index shard outside the directory", _model(_shard({"weight_map": {"x": "../model.safetensors"}})),
         "outside the model directory"),
    Case("index places a tensor in the wrong shard", _model(_shard({"weight_map": {"no.such.tensor":
                                                                                   "model.safetensors"}})),
         "does not hold it"),
    Case("config.json garbage", _model(_broken_config("\x00\x01 not json")), "config.json is not valid JSON"),
    Case("config.json a JSON list", _model(_broken_config("[]")), "config.json is not a JSON object"),
    Case("config.json of an unknown model type", _model(_set_config(model_type="no-such-model")),
         "cannot be read as a model config"),
    # GGUF
    Case("empty .gguf", _gguf(b""), "is truncated (0 bytes)"),
    Case("garbage .gguf", _gguf(GARBAGE), "no GGUF magic"),
    Case("truncated .gguf", _truncated_gguf, "is truncated"),
    Case(".gguf that is a directory", _gguf(None), "has no config.json"),
    # calibration files
    Case("non-UTF-8 .txt", _calibration("calib.txt", "caf\u00e9 au lait\n".encode("latin-1")), "is not UTF-8"),
    Case("empty .txt", _calibration("calib.txt", b""), "holds no text"),
    Case("whitespace-only .txt", _calibration("calib.txt", b" \n\t\n"), "holds no text"),
    Case("malformed .jsonl", _calibration("calib.jsonl", b'{"text": "w1 w2"}\n{"text": "w3\n'), "line 2 is not JSON"),
    Case("empty .jsonl", _calibration("calib.jsonl", b""), "holds no text"),
    Case("non-object .jsonl rows", _calibration("calib.jsonl", b'["w1 w2"]\n'), "line 1 is not an object"),
    Case("wrong-type text field", _calibration("calib.jsonl", b'{"text": 42}\n'), "string 'text' field"),
    Case("missing text field", _calibration("calib.jsonl", b'{"content": "w1"}\n'), "string 'text' field"),
    Case("binary .jsonl", _calibration("calib.jsonl", GARBAGE), "is not UTF-8"),
    Case("calibration path is a directory", _calibration("calib.txt", None), "is a directory"),
]


@pytest.fixture(scope="module")
def valid_model(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("valid") / "model", family="llama-untied", seed=1)


def _run_case(case: Case, root: Path, valid: Path, data_dir: Path) -> tuple[Case, Path, subprocess.CompletedProcess]:
    directory = root / case.name.replace(" ", "-").replace("/", "-")
    directory.mkdir()
    model = directory / "model"
    shutil.copytree(valid, model)
    extra = case.make(directory, model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOTRESIZE_HOME": str(directory / "home"),
           "DOTRESIZE_DATA_DIR": str(data_dir), "PREFECT_HOME": str(directory / "prefect")}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "-q", "compress", "--ratio", "0.25", "--calib-samples", "8",
            "--calib-seqlen", "32", "--run-dir", str(directory / "run"), "--out", str(directory / "out"), *extra]
    return case, directory, subprocess.run(argv, env=env, cwd=directory, capture_output=True, text=True,
                                           timeout=300)


def test_every_malformed_input_gets_one_line_and_leaves_nothing(tmp_path, valid_model, tiny_data_dir):
    assert len(CASES) >= 20
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: _run_case(case, tmp_path, valid_model, tiny_data_dir), CASES))
    problems = []
    for case, directory, result in results:
        lines = result.stderr.strip().splitlines()
        left = sorted(p.name for p in directory.iterdir() if p.name not in ("model", "model.gguf", "calib.txt",
                                                                          "calib.jsonl"))
        if (result.returncode == 0 or len(lines) != 1 or "Traceback" in result.stderr
                or not lines[0].startswith("dotresize: error: ") or case.expect not in lines[0] or left):
            problems.append(f"{case.name}: rc {result.returncode}, left {left}, stderr:\n{result.stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)
