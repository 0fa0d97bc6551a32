"""Typed, versioned compression configuration with an exact JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidConfigError

CONFIG_VERSION = 1

METHODS = ("dot", "pca", "prune", "random")
MODES = ("parallel", "sequential")
LAYOUTS = ("per-point", "global")
COSTS = ("l2", "l1")
COST_NORMALIZATIONS = ("max", "median", "mean", "q90")
MARGINALS = ("uniform", "mass")
TARGET_RULES = ("mean_abs", "rms")
DECOMPRESSIONS = ("pinv", "plan", "lsq")
SOLVERS = ("torch", "pot")
GLOBAL_POOLING = ("trace", "sum")


@dataclass(frozen=True)
class DotOptions:
    """Options of the DOTResize basis (method.md, decision 2)."""

    # Defaults chosen by the quality benchmark (benchmarks/README.md "Results"): a max-normalised L2 cost with
    # epsilon 0.2 gave WikiText-2 ppl 168 on SmolLM2-135M at 20 % where median-normalised epsilon 0.05 gave 524.
    epsilon: float = 0.2
    cost: str = "l2"
    cost_normalization: str = "max"
    marginals: str = "uniform"
    targets: str = "mean_abs"
    decompression: str = "pinv"
    solver: str = "torch"
    tol: float = 1e-9
    max_iter: int = 5000
    max_cond: float = 1e8
    sample_tokens: int = 8192

    def validate(self) -> None:
        _check_choice("dot.cost", self.cost, COSTS)
        _check_choice("dot.cost_normalization", self.cost_normalization, COST_NORMALIZATIONS)
        _check_choice("dot.marginals", self.marginals, MARGINALS)
        _check_choice("dot.targets", self.targets, TARGET_RULES)
        _check_choice("dot.decompression", self.decompression, DECOMPRESSIONS)
        _check_choice("dot.solver", self.solver, SOLVERS)
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise InvalidConfigError(f"dot epsilon must be a positive number, got {self.epsilon}")
        if self.max_iter < 1 or self.tol <= 0:
            raise InvalidConfigError("dot max_iter must be >= 1 and tol > 0")
        if self.sample_tokens < 1:
            raise InvalidConfigError("dot sample_tokens must be >= 1")


@dataclass(frozen=True)
class CompressionConfig:
    """Everything that determines a compression, besides the source model and calibration data.

    ``ratio`` is the slicing ratio of the residual-stream width: d = floor((1 - ratio) * D) rounded down to
    a multiple of ``round_to``. ``widths`` (2L+1 values) overrides it per point. ``keep_sets`` optionally gives,
    per point, the neuron indices a ``dot`` basis uses as targets or a ``prune`` basis keeps.
    """

    method: str = "dot"
    ratio: float = 0.2
    mode: str = "parallel"
    layout: str = "per-point"
    round_to: int = 8
    slice_head: bool = False
    widths: tuple[int, ...] | None = None
    keep_sets: tuple[tuple[int, ...], ...] | None = None
    seed: int = 42
    pca_damping: float = 0.01
    global_pooling: str = "trace"
    outlier_tokens: float | None = None
    batch_size: int = 8
    dot: DotOptions = field(default_factory=DotOptions)
    version: int = CONFIG_VERSION

    def validate(self) -> "CompressionConfig":
        _check_choice("method", self.method, METHODS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("global_pooling", self.global_pooling, GLOBAL_POOLING)
        if not (0.0 <= self.ratio < 1.0):
            raise InvalidConfigError(f"ratio must be in [0, 1) (the fraction of width removed), got {self.ratio}")
        if self.round_to < 1:
            raise InvalidConfigError(f"round_to must be >= 1, got {self.round_to}")
        if self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.layout == "global" and self.mode != "parallel":
            raise InvalidConfigError("layout 'global' needs mode 'parallel' (one basis from all points' statistics)")
        if self.outlier_tokens is not None and not self.outlier_tokens > 1.0:
            raise InvalidConfigError("outlier_tokens is a multiple of the median token norm and must be > 1")
        if self.version != CONFIG_VERSION:
            raise InvalidConfigError(f"config version {self.version} is not supported (expected {CONFIG_VERSION})")
        self.dot.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidConfigError(f"unknown compression config keys: {sorted(unknown)}")
        dot = data.pop("dot", {}) or {}
        dot_known = {f.name for f in dataclasses.fields(DotOptions)}
        if set(dot) - dot_known:
            raise InvalidConfigError(f"unknown dot option keys: {sorted(set(dot) - dot_known)}")
        if data.get("widths") is not None:
            data["widths"] = tuple(int(w) for w in data["widths"])
        if data.get("keep_sets") is not None:
            data["keep_sets"] = tuple(tuple(int(i) for i in s) for s in data["keep_sets"])
        return cls(dot=DotOptions(**dot), **data)

    @classmethod
    def from_json(cls, text: str) -> "CompressionConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "CompressionConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
