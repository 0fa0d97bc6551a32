"""Calibration and evaluation text: where it comes from, how it is tokenised and sampled.

Named data sets resolve to a local data directory first (``DOTRESIZE_DATA_DIR``; by default ``../shared/data``
beside the checkout or the working directory), then to the standard dataset through ``datasets`` when the
network is reachable, else to a clear error saying how to point at local files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import CalibrationError, DataNotFoundError

DATA_DIR_ENV = "DOTRESIZE_DATA_DIR"

#: named sets -> (file inside the data dir, (hub dataset, config, split) fallback)
NAMED_TEXTS = {
    "wikitext2": ("wikitext-2/wiki.valid.tokens", ("wikitext", "wikitext-2-v1", "validation")),
    "wikitext2-test": ("wikitext-2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
}


@dataclass(frozen=True)
class TextSource:
    """A text with its provenance: dataset id, file and sha256 of the exact bytes read."""

    id: str
    path: str | None
    sha256: str
    text: str

    def meta(self) -> dict:
        data = asdict(self)
        data.pop("text")
        data["characters"] = len(self.text)
        return data


def default_data_dirs() -> list[Path]:
    repo_root = Path(__file__).resolve().parent.parent
    return [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]


def resolve_data_dir() -> Path | None:
    """The local data directory: ``$DOTRESIZE_DATA_DIR`` if set, else ``../shared/data`` when it exists."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"{DATA_DIR_ENV}={configured} is not a directory: point it at the data directory")
        return path.resolve()
    for candidate in default_data_dirs():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_text(raw: bytes, name: str) -> str:
    """``raw`` as UTF-8 text (``\\r\\n`` read as ``\\n``) holding more than blanks; else a one-line
    :class:`CalibrationError` about ``name`` (the file, or the option naming it)."""
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as error:
        raise CalibrationError(f"{name} is not UTF-8 text (byte {error.start} is 0x{raw[error.start]:02x}): save it "
                               "as UTF-8") from None
    if not text.strip():
        raise CalibrationError(f"{name} holds no text: pass a file with text in it")
    return text


def jsonl_rows(text: str, name: str) -> list[str]:
    """The string ``text`` field of every non-blank line of a JSONL text; else a one-line :class:`CalibrationError`
    about ``name`` and the line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CalibrationError(f"{name}: line {number} is not JSON; every JSONL row must be an object with a "
                                   "string 'text' field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CalibrationError(f"{name}: line {number} is not an object with a string 'text' field, as every "
                                   "JSONL row must be")
        rows.append(row["text"])
    return rows


def _read_file(path: Path, dataset_id: str) -> TextSource:
    """A local text: UTF-8 (a ``.jsonl`` file: one JSON object with a string ``text`` per non-blank line, the
    rows joined by blank lines). Anything else is a one-line :class:`CalibrationError` naming the place."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataNotFoundError(f"{path} cannot be read ({error.strerror}): fix its permissions") from None
    text = decode_text(raw, str(path))
    if path.suffix == ".jsonl":
        text = "\n\n".join(jsonl_rows(text, str(path)))
    elif path.name == "wiki.test.raw":
        # the raw test split: one row per line, joined with blank lines as the standard protocol does
        text = "\n\n".join(line for line in text.split("\n") if line)
    return TextSource(id=dataset_id, path=str(path), sha256=sha256_bytes(raw), text=text)


def _from_hub(name: str, spec: tuple[str, str, str]) -> TextSource:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataNotFoundError(
            f"data set {name!r} is not in a local data directory and the hub is offline: set {DATA_DIR_ENV} to a "
            f"directory holding {NAMED_TEXTS[name][0]}, or pass a text/JSONL file"
        )
    try:
        import datasets

        rows = datasets.load_dataset(spec[0], spec[1], split=spec[2])["text"]
    except Exception as error:  # network, missing package, ...
        raise DataNotFoundError(
            f"data set {name!r} is not local and could not be fetched ({type(error).__name__}): set {DATA_DIR_ENV} "
            f"to a directory holding {NAMED_TEXTS[name][0]}, or pass a text/JSONL file"
        ) from None
    text = "\n\n".join(rows)
    return TextSource(id=f"hf:{spec[0]}/{spec[1]}:{spec[2]}", path=None, sha256=sha256_bytes(text.encode()),
                      text=text)


def load_text(name_or_path: str) -> TextSource:
    """A named data set (``wikitext2``, ``wikitext2-test``) or a local ``.txt`` / ``.jsonl`` file."""
    if name_or_path in NAMED_TEXTS:
        relative, hub = NAMED_TEXTS[name_or_path]
        data_dir = resolve_data_dir()
        if data_dir is not None and (data_dir / relative).is_file():
            return _read_file(data_dir / relative, name_or_path)
        return _from_hub(name_or_path, hub)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise DataNotFoundError(f"{name_or_path} is a directory: pass a .txt or .jsonl file or one of "
                                f"{', '.join(NAMED_TEXTS)}")
    if not path.is_file():
        raise DataNotFoundError(
            f"no data file {name_or_path}: pass an existing .txt or .jsonl file or one of {', '.join(NAMED_TEXTS)}"
        )
    return _read_file(path.resolve(), f"file:{path.name}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens (one long 1-D tensor)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(token_ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` distinct non-overlapping windows of ``seqlen`` tokens, chosen reproducibly from ``seed``.

    The text is cut into ``len // seqlen`` windows. Asking for more windows than that is an error naming the
    number available (never silently fewer: the recipe records what was asked for, and the run must be that).
    """
    if samples < 1 or seqlen < 2:
        raise CalibrationError("calibration needs at least 1 sample of at least 2 tokens")
    windows = token_ids.numel() // seqlen
    if windows == 0:
        raise CalibrationError(
            f"the calibration text has {token_ids.numel()} tokens, fewer than one sequence of {seqlen}: "
            "use a longer text or a shorter --calib-seqlen"
        )
    if samples > windows:
        raise CalibrationError(
            f"{samples} calibration samples asked for, but the text holds {windows} windows of {seqlen} tokens "
            f"({token_ids.numel()} tokens): ask for {windows} or fewer, use a longer text or a shorter sequence"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:samples]
    chosen = torch.sort(chosen).values
    grid = token_ids[: windows * seqlen].view(windows, seqlen)
    return grid[chosen].clone()


@dataclass(frozen=True)
class Calibration:
    """Calibration token windows plus the provenance recorded in lineage."""

    input_ids: torch.Tensor
    source: dict

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def meta(self) -> dict:
        return {**self.source, "samples": int(self.input_ids.shape[0]), "seqlen": int(self.input_ids.shape[1]),
                "tokens": self.tokens,
                "input_ids_sha256": sha256_bytes(self.input_ids.to(torch.int64).numpy().tobytes())}


def calibration_set(tokenizer, source: str = "wikitext2", *, samples: int = 64, seqlen: int = 256,
                    seed: int = 42) -> Calibration:
    """Sample calibration windows from a named set or a local file."""
    text = load_text(source)
    ids = sample_windows(tokenize(tokenizer, text.text), samples, seqlen, seed)
    return Calibration(ids, {**text.meta(), "seed": seed})
