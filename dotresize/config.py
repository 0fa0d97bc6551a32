"""Typed, versioned compression configuration with an exact JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidConfigError

#: version 2 added the MLP's intermediate width (``mlp_ratio``, ``mlp_widths``, ``mlp``). A config that leaves the
#: MLP alone serialises exactly as version 1 did (its MLP keys omitted, ``"version": 1``), so every recipe digest,
#: stage key and run key of such a config is unchanged; both versions are read.
CONFIG_VERSION = 2
READABLE_VERSIONS = (1, 2)

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
#: MLP keep-set rules: ``energy`` ‖h_j‖²; ``output`` ‖h_j‖²·‖W_down[:, j]‖² (the neuron's output energy if it were
#: alone); ``obs`` greedy backward elimination by the output error left after the ``lsq`` correction (Optimal Brain
#: Surgeon)
KEEP_RULES = ("output", "energy", "obs")
MLP_METHODS = ("prune", "lsq", "dot")
DOT_COSTS = ("l2", "cosine")
#: ``uniform``: balanced OT, uniform masses on S and K (Sinkhorn); ``row``: only the removed side is constrained,
#: so each removed neuron's row is softmax(−C/ε) over the kept neurons (closed form, no Sinkhorn)
DOT_MARGINALS = ("uniform", "row")
#: scale c_s of a removed neuron's row p_s (Σ p_s = 1) in h_s ≈ c_s·h_K·p_s: least squares, 1, or matched norms
SCALE_RULES = ("lsq", "none", "norm")


@dataclass(frozen=True)
class MlpDotOptions:
    """Options of the transport-plan map (``prior``: the plan is the ridge's prior instead of the map itself).

    Defaults from benchmarks/results/mlp-smollm2 (SmolLM2-135M, keep 1072 of 1536): cosine cost with ε 0.03 gave
    ppl 63.4, the best L2 plan (max-normalised, ε 0.003) 64.3, prune 69.5 — and lsq 56.3.
    """

    epsilon: float = 0.03
    cost: str = "cosine"
    cost_normalization: str = "max"
    marginals: str = "uniform"
    scale: str = "lsq"
    prior: bool = False
    tol: float = 1e-9
    max_iter: int = 5000

    def validate(self) -> "MlpDotOptions":
        _check_choice("mlp dot cost", self.cost, DOT_COSTS)
        _check_choice("mlp dot cost_normalization", self.cost_normalization, COST_NORMALIZATIONS)
        _check_choice("mlp dot marginals", self.marginals, DOT_MARGINALS)
        _check_choice("mlp dot scale", self.scale, SCALE_RULES)
        _check_sinkhorn("mlp dot", self.epsilon, self.tol, self.max_iter)
        return self


@dataclass(frozen=True)
class MlpOptions:
    """How one MLP is reduced: the map (``method``), the keep-set rule and the ridge λ relative to mean diag G_KK.

    Defaults from benchmarks/results/mlp-smollm2: ``lsq`` with λ 0.1 and the ``output`` rule was best (ppl 56.3 at keep
    1072 of 1536; λ 0 56.95, λ 1 58.5; the ``obs`` keep-set lowered every layer's output error yet gave 61.7).
    """

    method: str = "lsq"
    keep_rule: str = "output"
    ridge: float = 0.1
    round_to: int = 8
    dot: MlpDotOptions = field(default_factory=MlpDotOptions)

    def validate(self) -> "MlpOptions":
        _check_choice("mlp method", self.method, MLP_METHODS)
        _check_choice("mlp keep rule", self.keep_rule, KEEP_RULES)
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise InvalidConfigError(f"mlp ridge must be a finite number >= 0, got {self.ridge}")
        if self.round_to < 1:
            raise InvalidConfigError(f"mlp round_to must be >= 1, got {self.round_to}")
        if self.method == "dot" and self.dot.prior and self.ridge == 0:
            raise InvalidConfigError("mlp dot prior needs ridge > 0 (with ridge 0 the prior has no effect)")
        self.dot.validate()
        return self

    def replace(self, **changes: Any) -> "MlpOptions":
        return dataclasses.replace(self, **changes)


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
        _check_sinkhorn("dot", self.epsilon, self.tol, self.max_iter)
        if self.sample_tokens < 1:
            raise InvalidConfigError("dot sample_tokens must be >= 1")


@dataclass(frozen=True)
class CompressionConfig:
    """Everything that determines a compression, besides the source model and calibration data.

    ``ratio`` is the slicing ratio of the residual-stream width: d = floor((1 - ratio) * D) rounded down to
    a multiple of ``round_to``. ``widths`` (2L+1 values) overrides it per point. ``keep_sets`` optionally gives,
    per point, the neuron indices a ``dot`` basis uses as targets or a ``prune`` basis keeps.

    The MLP's intermediate width is a second axis (method.md decision 9): ``mlp_ratio`` is the fraction of every
    layer's I intermediate neurons removed (m = floor((1 - mlp_ratio) * I) rounded down to a multiple of
    ``mlp.round_to``), ``mlp_widths`` (one value per layer) a per-layer schedule instead, and ``mlp`` how the
    neurons are chosen and the removed ones mapped (``mlp.method``: prune, lsq, dot). ``mlp_ratio`` 0 without
    ``mlp_widths`` leaves the MLPs untouched. ``mlp_keep_sets`` (one index list per layer) names the neurons each
    layer keeps instead of a rule; its lengths are the widths (with neither ``mlp_ratio`` nor ``mlp_widths``).
    With the MLP axis on, ``ratio`` 0 (and no ``widths``) compresses
    the MLPs only.
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
    mlp_ratio: float = 0.0
    mlp_widths: tuple[int, ...] | None = None
    mlp_keep_sets: tuple[tuple[int, ...], ...] | None = None
    mlp: MlpOptions = field(default_factory=MlpOptions)
    version: int = CONFIG_VERSION

    @property
    def mlp_method(self) -> str:
        """The map of the removed MLP neurons (``mlp.method``)."""
        return self.mlp.method

    @property
    def mlp_active(self) -> bool:
        """Whether the MLP's intermediate width is reduced at all."""
        return self.mlp_ratio > 0 or self.mlp_widths is not None or self.mlp_keep_sets is not None

    @property
    def residual_active(self) -> bool:
        """Whether the residual stream is compressed: always without the MLP axis (every existing behaviour,
        ratio 0 included); with it, only for ratio > 0 or explicit ``widths``."""
        return not self.mlp_active or self.ratio > 0 or self.widths is not None

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
        if self.layout == "global" and self.mode != "parallel" and self.residual_active:  # (MLPs alone: any mode)
            raise InvalidConfigError("layout 'global' needs mode 'parallel' (one basis from all points' statistics)")
        if self.outlier_tokens is not None and not self.outlier_tokens > 1.0:
            raise InvalidConfigError("outlier_tokens is a multiple of the median token norm and must be > 1")
        if self.version not in READABLE_VERSIONS:
            raise InvalidConfigError(f"config version {self.version} is not supported (expected {CONFIG_VERSION})")
        self.dot.validate()
        self._validate_mlp()
        return self

    def _validate_mlp(self) -> None:
        if not (isinstance(self.mlp_ratio, (int, float)) and 0.0 <= self.mlp_ratio < 1.0):
            raise InvalidConfigError(f"mlp_ratio must be in [0, 1) (the fraction of MLP neurons removed), got "
                                     f"{self.mlp_ratio}")
        if self.mlp_widths is not None:
            if self.mlp_ratio > 0:
                raise InvalidConfigError("give mlp_ratio or mlp_widths (a per-layer schedule), not both")
            if len(self.mlp_widths) == 0 or any(not isinstance(w, int) or w < 1 for w in self.mlp_widths):
                raise InvalidConfigError("mlp_widths must list one positive integer width per layer")
        if self.mlp_keep_sets is not None:
            if self.mlp_ratio > 0 or self.mlp_widths is not None:
                raise InvalidConfigError("mlp_keep_sets fixes every layer's width: give it without mlp_ratio or "
                                         "mlp_widths")
            for layer, kept in enumerate(self.mlp_keep_sets):
                if not kept or any(not isinstance(i, int) or i < 0 for i in kept) or len(set(kept)) != len(kept):
                    raise InvalidConfigError(f"mlp_keep_sets[{layer}] must be a non-empty list of distinct neuron "
                                             "indices >= 0")
        if self.mlp_active and self.version < 2:
            raise InvalidConfigError(f"config version {self.version} has no MLP axis: use version {CONFIG_VERSION}")
        self.mlp.validate()

    def to_dict(self) -> dict[str, Any]:
        """The plain form (JSON-ready). MLP fields at their defaults are left out and such a dict says version 1:
        exactly the form (and digest) the same config had before the MLP axis existed."""
        data = _plain(dataclasses.asdict(self))
        for key, default in _mlp_defaults().items():
            if data[key] == default:
                del data[key]
        data["version"] = CONFIG_VERSION if any(key in data for key in _mlp_defaults()) else 1
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidConfigError(f"unknown compression config keys: {sorted(unknown)}")
        version = data.pop("version", CONFIG_VERSION)
        if version not in READABLE_VERSIONS:
            raise InvalidConfigError(f"config version {version} is not supported (expected {CONFIG_VERSION})")
        dot = data.pop("dot", {}) or {}
        dot_known = {f.name for f in dataclasses.fields(DotOptions)}
        if set(dot) - dot_known:
            raise InvalidConfigError(f"unknown dot option keys: {sorted(set(dot) - dot_known)}")
        mlp = _mlp_options(data.pop("mlp", {}) or {})
        if data.get("mlp_widths") is not None:
            data["mlp_widths"] = tuple(int(w) for w in data["mlp_widths"])
        if data.get("widths") is not None:
            data["widths"] = tuple(int(w) for w in data["widths"])
        for name in ("keep_sets", "mlp_keep_sets"):
            if data.get(name) is not None:
                data[name] = tuple(tuple(int(i) for i in s) for s in data[name])
        return cls(dot=DotOptions(**dot), mlp=mlp, **data)  # read as the current version

    @classmethod
    def from_json(cls, text: str) -> "CompressionConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "CompressionConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_sinkhorn(name: str, epsilon: float, tol: float, max_iter: int) -> None:
    """The Sinkhorn settings of ``name`` (``dot``, ``mlp dot``): ε a positive finite number, max_iter >= 1, tol > 0
    (a NaN tol too is refused)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise InvalidConfigError(f"{name} epsilon must be a positive number, got {epsilon}")
    if max_iter < 1 or not tol > 0:
        raise InvalidConfigError(f"{name} max_iter must be >= 1 and tol > 0")


def checked_widths(values, count: int, full: int, *, key: str, per: str, noun: str, within: str = "") -> list[int]:
    """An explicit width list (``widths``, ``mlp_widths``) as ints, refused unless it has ``count`` values (one
    ``per`` ...) each in [1, ``full``] (``noun`` and ``within`` name them in the message)."""
    widths = [int(w) for w in values]
    if len(widths) != count:
        raise InvalidConfigError(f"{key} must list {count} values ({per}), got {len(widths)}")
    if any(not 1 <= w <= full for w in widths):
        raise InvalidConfigError(f"every {noun} must be in [1, {full}]{within}")
    return widths


def _mlp_options(data: dict[str, Any]) -> MlpOptions:
    data = dict(data)
    known = {f.name for f in dataclasses.fields(MlpOptions)}
    if set(data) - known:
        raise InvalidConfigError(f"unknown mlp option keys: {sorted(set(data) - known)}")
    dot = data.pop("dot", {}) or {}
    dot_known = {f.name for f in dataclasses.fields(MlpDotOptions)}
    if set(dot) - dot_known:
        raise InvalidConfigError(f"unknown mlp dot option keys: {sorted(set(dot) - dot_known)}")
    return MlpOptions(dot=MlpDotOptions(**dot), **data)


def _mlp_defaults() -> dict[str, Any]:
    """The plain form of the MLP fields when they leave the MLP alone (omitted from :meth:`to_dict`)."""
    return {"mlp_ratio": 0.0, "mlp_widths": None, "mlp_keep_sets": None,
            "mlp": _plain(dataclasses.asdict(MlpOptions()))}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
