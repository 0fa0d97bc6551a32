"""Quality benchmark: WikiText-2 perplexity of every compression of one model, side by side, and DOT's ablations.

Two groups of rows:

* **main** — ``pca``, ``prune``, ``dot`` and ``dot+prune-keep`` (DOT with the prune baseline's keep-set as
  targets: the "add-on to pruning" reading) at every ratio, in three settings: parallel calibration with
  per-point bases, sequential calibration (SliceGPT's order) with per-point bases, and parallel calibration with
  one ``global`` basis (the ``global`` layout needs parallel statistics).
* **MLP axis** (``--mlp-ratios``, ``--mlp-methods``): every main row again with that fraction of every MLP's
  intermediate neurons removed (issue 16), plus the MLP-only rows (residual ratio 0), with the parameter count
  relative to dense: the table a Pareto front is read from.
* **ablations** of DOT's options at one ratio (parallel, per-point): ε, cost normalisation (with ε), L1 vs L2
  cost, target rule, decompression (``pinv`` / ``plan`` / ``lsq``), marginals, token outliers excluded or not.
  Every axis's best value is then combined into one proposed configuration, which is evaluated too; the
  proposal and its evidence are printed ("chosen defaults").

Parallel statistics are captured once per (outlier rule, raw-sample need) and every basis variant is computed
from them, so a row costs its bases plus one perplexity evaluation. Sequential rows run ``dotresize.compress``
each. Rows are appended to ``--rows-file`` (JSON lines) as they finish; rerunning with the same file and
protocol reuses them, so a long table can be interrupted and resumed.

    python -m benchmarks quality --size reduced --json out.json --markdown out.md
    python -m benchmarks quality --ratios 0.2 --settings parallel/per-point --methods pca,dot --no-ablations
    python -m benchmarks quality --ratios 0,0.1 --mlp-ratios 0.2,0.3 --mlp-methods lsq,prune --methods pca \
        --settings parallel/per-point,sequential/per-point --no-ablations
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dotresize.errors import DotResizeError  # noqa: E402
from dotresize.evaluation.protocol import MeasurementProtocol  # noqa: E402

from .common import (fmt, log, machine_info, machine_line, markdown_table, quiet_libraries,  # noqa: E402
                     emit_result)

SETTINGS = ("parallel/per-point", "sequential/per-point", "parallel/global")
METHODS = ("pca", "prune", "dot", "dot+prune-keep")
MLP_METHODS = ("prune", "lsq", "dot")
#: the method name of a row whose residual stream is left alone (ratio 0, MLP axis only)
MLP_ONLY = "mlp-only"


# --- sizes -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualitySpec(MeasurementProtocol):
    """What to measure. The defaults are the full protocol of method.md's "Measured so far"."""

    ratios: tuple[float, ...] = (0.1, 0.2, 0.3)
    methods: tuple[str, ...] = METHODS
    #: fractions of every MLP's intermediate neurons removed (0: the residual axis alone); with any > 0 a ratio 0
    #: in ``ratios`` adds the MLP-only rows
    mlp_ratios: tuple[float, ...] = (0.0,)
    mlp_methods: tuple[str, ...] = ("lsq",)
    settings: tuple[str, ...] = SETTINGS
    #: (setting, ratio) pairs of the main table to run; None = every combination
    only: tuple[tuple[str, float], ...] | None = None
    batch_size: int = 8
    ablations: bool = True
    ablation_ratio: float = 0.2
    epsilons: tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    #: (cost normalisation, epsilon) pairs tried against the default pair (one ε means a different sharpness
    #: under each normalisation, so each is paired with its own ε)
    normalization_variants: tuple[tuple[str, float], ...] = (("median", 0.05), ("median", 1.0), ("q90", 0.2))
    decompressions: tuple[str, ...] = ("plan", "lsq")
    l1: bool = True
    rms_targets: bool = True
    mass_marginals: bool = True
    outlier_tokens: tuple[float, ...] = (10.0,)
    sample_tokens: int = 8192
    dot_max_iter: int | None = None  # None = DotOptions' default
    propose: bool = True
    proposed_in_main: bool = False  # also run the proposed DOT configuration in every main setting/ratio
    dense: bool = True

    def protocol(self) -> dict[str, Any]:
        return {"model": self.model or "smollm2-135m-instruct", "calib_samples": self.calib_samples,
                "calib_seqlen": self.calib_seqlen, "seed": self.seed, "ctx": self.ctx,
                "max_windows": self.max_windows, "batch_size": self.batch_size, "dot_max_iter": self.dot_max_iter}


SIZES: dict[str, dict[str, Any]] = {
    # the protocol of method.md's "Measured so far", every row (hours on 2 shared cores)
    "full": {},
    # every table present, small calibration and evaluation (minutes)
    "reduced": dict(calib_samples=16, calib_seqlen=128, ctx=128, max_windows=16, ratios=(0.1, 0.2, 0.3),
                    only=tuple([("parallel/per-point", r) for r in (0.1, 0.2, 0.3)]
                               + [("sequential/per-point", 0.2), ("parallel/global", 0.2)]),
                    methods=("pca", "prune", "dot", "dot+prune-keep"),
                    epsilons=(0.01, 0.05, 0.2, 1.0), normalization_variants=(("median", 0.05),),
                    decompressions=("plan",), mass_marginals=False, sample_tokens=256, dot_max_iter=300),
    # a tiny in-code model in seconds (the smoke test)
    "tiny": dict(calib_samples=8, calib_seqlen=32, ctx=32, max_windows=4, ratios=(0.25,), batch_size=4,
                 ablation_ratio=0.25,
                 epsilons=(0.05, 0.2, 1.0, 5.0), normalization_variants=(("median", 0.2),),
                 decompressions=("plan",), mass_marginals=False, sample_tokens=64, dot_max_iter=300),
}


def spec_for(size: str, **overrides: Any) -> QualitySpec:
    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}: choose from {', '.join(SIZES)}")
    values = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    spec = QualitySpec(**values)
    positive = sorted(r for r in spec.ratios if r > 0) or [0.2]
    if spec.ablation_ratio not in positive:
        spec = dataclasses.replace(spec, ablation_ratio=positive[len(positive) // 2])
    return spec


# --- variants ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One row: a basis method in a setting at a ratio, with DotOptions / capture overrides."""

    group: str                     # "main", "ablation:<axis>" or "proposed"
    method: str                    # pca | prune | dot | dot+prune-keep
    setting: str                   # parallel/per-point | sequential/per-point | parallel/global
    ratio: float
    dot: tuple[tuple[str, Any], ...] = ()
    outlier_tokens: float | None = None
    mlp_ratio: float = 0.0         # fraction of every MLP's intermediate neurons removed (0: MLPs untouched)
    mlp_method: str = "lsq"

    #: the setting's two halves: parallel/sequential and per-point/global
    mode = property(lambda self: self.setting.split("/")[0])
    layout = property(lambda self: self.setting.split("/")[1])

    @property
    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in self.dot]
        if self.outlier_tokens is not None:
            extra.append(f"outlier_tokens={self.outlier_tokens}")
        if self.mlp_ratio > 0:  # rows without the MLP axis keep their labels (and keys: rows files stay valid)
            extra.append(f"mlp={self.mlp_method}@{self.mlp_ratio:g}")
        return self.method + (" " + " ".join(extra) if extra else "")

    @property
    def key(self) -> str:
        return f"{self.setting}|{self.ratio}|{self.label}"

    def config(self, spec: QualitySpec, keep_sets=None):
        from dotresize import CompressionConfig, DotOptions, MlpOptions

        dot = dict(self.dot)
        if spec.dot_max_iter is not None:
            dot.setdefault("max_iter", spec.dot_max_iter)
        method = {"dot+prune-keep": "dot", MLP_ONLY: "pca"}.get(self.method, self.method)  # (ratio 0: unused)
        config = CompressionConfig(method=method, ratio=self.ratio, mode=self.mode, layout=self.layout,
                                   seed=spec.seed, batch_size=spec.batch_size, outlier_tokens=self.outlier_tokens,
                                   keep_sets=keep_sets, dot=DotOptions(**dot), mlp_ratio=self.mlp_ratio,
                                   mlp=MlpOptions(method=self.mlp_method))
        return config.validate()


def main_variants(spec: QualitySpec) -> list[Variant]:
    """The main rows, the ablation ratio first (so a long run that is stopped early has one complete column)."""
    ratios = sorted(spec.ratios, key=lambda r: (r != spec.ablation_ratio, r))
    out = []
    for mlp_ratio in sorted(spec.mlp_ratios):
        for mlp_method in spec.mlp_methods if mlp_ratio > 0 else ("lsq",):
            for ratio in ratios:
                for setting in spec.settings:
                    if spec.only is not None and (setting, ratio) not in spec.only:
                        continue
                    if ratio == 0:  # the residual stream untouched: one row per setting, and only with the MLP axis
                        if mlp_ratio > 0 and not (setting == "parallel/global" and "parallel/per-point" in
                                                  spec.settings):  # (same model as per-point then)
                            out.append(Variant("main", MLP_ONLY, setting, 0.0, mlp_ratio=mlp_ratio,
                                               mlp_method=mlp_method))
                        continue
                    for method in spec.methods:
                        out.append(Variant("main", method, setting, ratio, mlp_ratio=mlp_ratio,
                                           mlp_method=mlp_method))
    return out


def ablation_axes(spec: QualitySpec) -> dict[str, list[Variant]]:
    """Axis name -> its variants (the current default is the shared reference row, in every axis)."""
    from dotresize import DotOptions

    defaults = DotOptions()
    r, s = spec.ablation_ratio, "parallel/per-point"

    def dot(group, **changes):
        return Variant(f"ablation:{group}", "dot", s, r, tuple(sorted(changes.items())))

    axes: dict[str, list[Variant]] = {}
    axes["epsilon"] = [dot("epsilon", epsilon=e) for e in spec.epsilons if e != defaults.epsilon]
    axes["cost_normalization"] = [dot("cost_normalization", cost_normalization=n, epsilon=e)
                                  for n, e in spec.normalization_variants
                                  if (n, e) != (defaults.cost_normalization, defaults.epsilon)]
    if spec.l1:
        axes["cost"] = [dot("cost", cost="l1" if defaults.cost == "l2" else "l2")]
    if spec.rms_targets:
        axes["targets"] = [dot("targets", targets="rms" if defaults.targets == "mean_abs" else "mean_abs")]
    axes["decompression"] = [dot("decompression", decompression=d) for d in spec.decompressions
                             if d != defaults.decompression]
    if spec.mass_marginals:
        axes["marginals"] = [dot("marginals", marginals="mass" if defaults.marginals == "uniform" else "uniform")]
    axes["outliers"] = [Variant("ablation:outliers", "dot", s, r, (), t) for t in spec.outlier_tokens]
    return {k: v for k, v in axes.items() if v}


# --- the runner --------------------------------------------------------------------------------------------------
class QualityRunner:
    """Holds the source model, the calibration set, captured statistics and finished rows."""

    def __init__(self, spec: QualitySpec, *, rows_file: str | os.PathLike | None = None,
                 keep_models: Callable[[Variant, Any], None] | None = None, progress: bool = False):
        from dotresize.data import calibration_set, load_text, tokenize
        from dotresize.sources import load_model, resolve_source

        self.spec = spec
        self.progress = progress
        self.keep_models = keep_models
        self.rows_file = Path(rows_file) if rows_file else None
        self.rows: dict[str, dict] = {}
        self.protocol = spec.protocol()
        if self.rows_file and self.rows_file.exists():
            for line in self.rows_file.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("protocol") == self.protocol:  # failed rows too: their failure is deterministic
                    self.rows[row["key"]] = row
            log(f"quality: reusing {len(self.rows)} rows from {self.rows_file}")
        quiet_libraries()
        torch.manual_seed(spec.seed)
        self.source = resolve_source(spec.model)
        start = time.perf_counter()
        self.pristine, self.tokenizer = load_model(self.source)
        self.load_seconds = time.perf_counter() - start
        self.calibration = calibration_set(self.tokenizer, samples=spec.calib_samples, seqlen=spec.calib_seqlen,
                                           seed=spec.seed)
        self.test_text = load_text("wikitext2-test")
        self.test_ids = tokenize(self.tokenizer, self.test_text.text)
        self.fused = None  # a fused copy of the model, for the parallel settings
        self.adapter = None  # that copy as a ResidentModel
        self._stats: dict[tuple, tuple[list, float, int]] = {}

    # -- shared pieces
    def ppl(self, model) -> dict:
        return self.spec.perplexity(model, self.test_ids)

    def _fused_adapter(self):
        if self.adapter is None:
            from dotresize.layerwise import ResidentModel

            self.fused = copy.deepcopy(self.pristine)
            self.adapter = ResidentModel(self.fused)  # fuses the copy's norms in place
        return self.adapter

    def stats(self, outlier_tokens: float | None, sample: bool) -> tuple[list, float]:
        """Parallel statistics (captured once per outlier rule; a raw sample only when an L1 cost needs it)."""
        from dotresize.calibration import capture_point_stats, iter_batches

        for key, (stats, seconds, _) in self._stats.items():
            if key[0] == outlier_tokens and (key[1] or not sample):
                return stats, seconds
        adapter = self._fused_adapter()
        tokens = self.spec.sample_tokens if sample else 0
        start = time.perf_counter()
        stats = capture_point_stats(adapter, iter_batches(self.calibration.input_ids, self.spec.batch_size),
                                    sample_tokens=tokens, outlier_tokens=outlier_tokens, seed=self.spec.seed,
                                    progress=self.progress)
        seconds = time.perf_counter() - start
        if sample:  # a sampled capture also serves the plain requests; drop the plain one it supersedes
            self._stats.pop((outlier_tokens, False), None)
        self._stats[(outlier_tokens, sample)] = (stats, seconds, tokens)
        log(f"quality: captured parallel statistics (outliers {outlier_tokens}, sample {tokens}) "
            f"in {seconds:.1f} s")
        return stats, seconds

    def _kept_of(self, variant: Variant) -> tuple[tuple[int, ...], ...] | None:
        """The keep-sets of the prune row of the same setting and ratio (its basis info)."""
        prune = dataclasses.replace(variant, method="prune", group="main", dot=(), mlp_ratio=0.0, mlp_method="lsq")
        row = self.rows.get(prune.key) or self.run(prune)
        return None if row.get("kept") is None else tuple(tuple(k) for k in row["kept"])

    # -- one row
    def run(self, variant: Variant) -> dict:
        if variant.key in self.rows:
            return self.rows[variant.key]
        start = time.perf_counter()
        row: dict[str, Any] = {"key": variant.key, "group": variant.group, "setting": variant.setting,
                               "method": variant.method, "label": variant.label, "ratio": variant.ratio,
                               "dot": dict(variant.dot), "outlier_tokens": variant.outlier_tokens,
                               "protocol": self.protocol}
        if variant.mlp_ratio > 0:
            row.update(mlp_ratio=variant.mlp_ratio, mlp_method=variant.mlp_method)
        try:
            keep_sets = self._kept_of(variant) if variant.method == "dot+prune-keep" else None
            same = self._same_as_dot(variant, keep_sets)
            if same is not None:  # the keep-set is DOT's own default target set: the row is the dot row
                return self._store(variant, {**same, **{k: row[k] for k in ("key", "group", "method", "label")},
                                             "same_as": same["key"], "seconds": 0.0})
            config = variant.config(self.spec, keep_sets)
            row["config"] = config.to_dict() | {"keep_sets": None if keep_sets is None else "from prune"}
            model, points, compress_seconds = self._compress(variant, config)
            row["compress_seconds"] = round(compress_seconds, 2)
            row["parameters"] = sum(p.numel() for p in model.parameters())
            row["shapes"] = _shape_signature(model)
            row.update(_point_summary(points))
            if variant.method == "prune" and variant.mlp_ratio == 0:
                row["kept"] = [p.get("kept", list(range(p["width"]))) for p in points] \
                    if variant.layout == "per-point" else [points[0].get("kept")] * (2 * self.n_layers() + 1)
            evaluation = self.ppl(model)
            row.update(ppl=evaluation["ppl"], eval_tokens=evaluation["tokens"],
                       eval_seconds=evaluation["seconds"])
            if self.keep_models is not None:
                self.keep_models(variant, model)
            del model
        except (DotResizeError, ValueError, RuntimeError) as error:
            # a failing variant is a result too (e.g. a rank-deficient plan, a solver's refusal: _store logs it); a
            # bug (TypeError, KeyError, ...) stops the benchmark instead
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        row["seconds"] = round(time.perf_counter() - start, 2)
        return self._store(variant, row)

    def _store(self, variant: Variant, row: dict) -> dict:
        self.rows[variant.key] = row
        if self.rows_file:
            self.rows_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rows_file, "a") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
        shown = f"ppl {row['ppl']:.2f}" if "ppl" in row else row.get("error")
        log(f"quality: {variant.setting} {variant.ratio} {variant.label}: {shown} ({row['seconds']:.0f} s)")
        return row

    def _same_as_dot(self, variant: Variant, keep_sets) -> dict | None:
        """In the parallel settings, the dot row when the prune keep-set equals DOT's default targets."""
        from dotresize import DotOptions
        from dotresize.api import plan_widths
        from dotresize.bases.common import target_scores, top_indices
        from dotresize.statistics import pool_stats

        if (variant.method != "dot+prune-keep" or variant.mode != "parallel" or keep_sets is None
                or variant.mlp_ratio > 0):  # with the MLP axis the statistics come from the reduced MLPs' pass
            return None
        config = variant.config(self.spec)
        stats, _ = self.stats(None, False)
        widths = plan_widths(self._fused_adapter(), config)
        rule = DotOptions().targets
        if variant.layout == "global":
            pairs = [(pool_stats(stats, config.global_pooling), widths[0], keep_sets[-1])]
        else:
            pairs = [(s, w, k) for s, w, k in zip(stats, widths, keep_sets) if w < s.dim]
        for s, w, kept in pairs:
            if top_indices(target_scores(s, rule), w).tolist() != sorted(kept):
                return None
        dot = dataclasses.replace(variant, method="dot", group="main", dot=())
        return dict(self.rows.get(dot.key) or self.run(dot))

    def n_layers(self) -> int:
        return int(self.pristine.config.num_hidden_layers)

    def _compress(self, variant: Variant, config) -> tuple[Any, list[dict], float]:
        from dotresize.api import build_compressed_model, compress, plan_widths
        from dotresize.bases import compute_basis
        from dotresize.statistics import pool_stats

        start = time.perf_counter()
        if variant.mode == "sequential" or config.mlp_active:  # the MLP axis: the API's one-pass capture
            model, report = compress(copy.deepcopy(self.pristine), self.calibration.input_ids, config,
                                     progress=self.progress)
            return model, report.points, time.perf_counter() - start
        needs_sample = config.method == "dot" and config.dot.cost == "l1"
        stats, capture_seconds = self.stats(config.outlier_tokens, needs_sample)
        adapter = self._fused_adapter()
        widths = plan_widths(adapter, config)
        start = time.perf_counter()

        def keep(point):
            return None if config.keep_sets is None else torch.tensor(sorted(config.keep_sets[point]))

        if config.layout == "global":
            shared = compute_basis(pool_stats(stats, config.global_pooling), widths[0], config, point=-1,
                                   keep=keep(-1))
            bases = [shared] * len(stats)
            points = [shared.info]
        else:
            bases = [compute_basis(s, w, config, point=p, keep=keep(p))
                     for p, (s, w) in enumerate(zip(stats, widths))]
            points = [b.info for b in bases]
        model = build_compressed_model(adapter, bases, config.layout)
        return model, points, time.perf_counter() - start + capture_seconds

    def export_costs(self, path: str | os.PathLike, points: tuple[int, ...] | None = None) -> Path:
        """DOT's normalised cost matrices (current DotOptions defaults, the ablation ratio) at a few slice points,
        as safetensors: real inputs for the solver benchmark (``--cost-file``)."""
        from safetensors.torch import save_file

        from dotresize.api import plan_widths
        from dotresize.bases.common import target_scores, top_indices
        from dotresize.bases.dot import l2_cost, normalize_cost

        config = Variant("main", "dot", "parallel/per-point", self.spec.ablation_ratio).config(self.spec)
        stats, _ = self.stats(None, False)
        widths = plan_widths(self._fused_adapter(), config)
        layers = self.n_layers()
        points = points or tuple(sorted({1, layers, 2 * layers - 1}))
        costs = {}
        for p in points:
            targets = top_indices(target_scores(stats[p], config.dot.targets), widths[p])
            cost, _ = normalize_cost(l2_cost(stats[p], targets), config.dot.cost_normalization)
            costs[f"point_{p}"] = cost.contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(costs, str(path), metadata={"normalization": config.dot.cost_normalization,
                                              "ratio": str(self.spec.ablation_ratio), "model": str(self.spec.model)})
        return path

    # -- the tables
    def dense(self) -> dict:
        key = "dense"
        if key not in self.rows:
            row = {"key": key, "group": "dense", "setting": "-", "method": "dense", "label": "dense", "ratio": 0.0,
                   "protocol": self.protocol, "parameters": sum(p.numel() for p in self.pristine.parameters())}
            evaluation = self.ppl(self.pristine)
            row.update(ppl=evaluation["ppl"], eval_tokens=evaluation["tokens"], eval_seconds=evaluation["seconds"])
            self.rows[key] = row
            if self.rows_file:
                with open(self.rows_file, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            log(f"quality: dense ppl {row['ppl']:.2f}")
        return self.rows[key]


def _shape_signature(model) -> str:
    import hashlib

    shapes = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:12]


def _point_summary(points: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    errors = [p["reconstruction_error"] for p in points if "reconstruction_error" in p]
    if errors:
        out["mean_reconstruction_error"] = sum(errors) / len(errors)
    conds = [p["cond_r"] for p in points if "cond_r" in p]
    if conds:
        out["max_cond_r"] = max(conds)
        out["mean_sinkhorn_iterations"] = sum(p["sinkhorn_iterations"] for p in points if "cond_r" in p) / len(conds)
        out["converged_fraction"] = sum(bool(p["sinkhorn_converged"]) for p in points if "cond_r" in p) / len(conds)
        out["mean_effective_rank"] = sum(p["effective_rank"] for p in points if "cond_r" in p) / len(conds)
        out["basis_seconds"] = round(sum(p.get("seconds", 0.0) for p in points), 2)
    return out


# --- choosing defaults -------------------------------------------------------------------------------------------
def _ok(row: dict | None) -> bool:
    return bool(row) and "ppl" in row and math.isfinite(row["ppl"])


#: an option replaces the current default only if it lowers the perplexity by more than this fraction
MIN_GAIN = 0.01


def choose_defaults(runner: QualityRunner, axes: dict[str, list[Variant]], reference: Variant) -> dict[str, Any]:
    """Per axis, the value with the lowest perplexity (it must beat the current default by more than
    ``MIN_GAIN``, else the default stays); then all winners combined into one proposal."""
    from dotresize import DotOptions

    ref_row = runner.rows.get(reference.key)
    defaults = dataclasses.asdict(DotOptions())
    per_axis: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    outliers = None
    for axis, variants in axes.items():
        candidates = [(reference, ref_row)] + [(v, runner.rows.get(v.key)) for v in variants]
        candidates = [(v, r) for v, r in candidates if _ok(r)]
        if not candidates:
            continue
        best, best_row = min(candidates, key=lambda vr: vr[1]["ppl"])
        if _ok(ref_row) and best_row["ppl"] > (1.0 - MIN_GAIN) * ref_row["ppl"]:
            best, best_row = reference, ref_row
        per_axis[axis] = {"best": best.label, "ppl": best_row["ppl"],
                          "reference_ppl": ref_row["ppl"] if _ok(ref_row) else None}
        if best is not reference:
            changes.update(dict(best.dot))
            if best.outlier_tokens is not None:
                outliers = best.outlier_tokens
    changes = {k: v for k, v in changes.items() if defaults.get(k) != v}
    return {"per_axis": per_axis, "changes": changes, "outlier_tokens": outliers,
            "reference": reference.label, "reference_ppl": ref_row.get("ppl") if ref_row else None}


def run_quality(spec: QualitySpec, *, rows_file=None, keep_models=None, progress=False,
                cost_file=None) -> dict[str, Any]:
    """Run every row of ``spec`` and return {machine, spec, rows, choice, markdown}; ``cost_file``: also save a
    few real DOT cost matrices there for the solver benchmark."""
    started = time.perf_counter()
    info = machine_info()
    runner = QualityRunner(spec, rows_file=rows_file, keep_models=keep_models, progress=progress)
    if spec.dense:
        runner.dense()
    if cost_file:
        runner.export_costs(cost_file)
    reference = Variant("main", "dot", "parallel/per-point", spec.ablation_ratio)
    choice = None
    if spec.ablations:
        runner.run(reference)
        axes = ablation_axes(spec)
        for variants in axes.values():
            for variant in variants:
                runner.run(variant)
        choice = choose_defaults(runner, axes, reference)
        if spec.propose and (choice["changes"] or choice["outlier_tokens"] is not None):
            proposed = Variant("proposed", "dot", "parallel/per-point", spec.ablation_ratio,
                               tuple(sorted(choice["changes"].items())), choice["outlier_tokens"])
            row = runner.run(proposed)
            choice["proposed"] = {"label": proposed.label, "ppl": row.get("ppl"), "error": row.get("error")}
            singles = [(runner.rows.get(v.key), v) for vs in axes.values() for v in vs]
            candidates = [(r["ppl"], v.label) for r, v in singles if _ok(r)] + \
                [(row["ppl"], proposed.label)] * _ok(row)
            if _ok(runner.rows.get(reference.key)):
                candidates.append((runner.rows[reference.key]["ppl"], reference.label + " (current defaults)"))
            choice["best_row"] = min(candidates)[1] if candidates else None
    for variant in main_variants(spec):
        runner.run(variant)
        if variant.method == "dot" and spec.proposed_in_main and choice and choice.get("proposed"):
            runner.run(Variant("main", "dot", variant.setting, variant.ratio,
                               tuple(sorted(choice["changes"].items())), choice["outlier_tokens"]))
    result = {"benchmark": "quality", "machine": info, "spec": dataclasses.asdict(spec),
              "protocol": runner.protocol, "calibration": runner.calibration.meta(),
              "evaluation": {**runner.test_text.meta(), "ctx": spec.ctx, "max_windows": spec.max_windows},
              "source": runner.source.spec, "load_seconds": round(runner.load_seconds, 1),
              "rows": [{k: v for k, v in r.items() if k != "kept"} for r in runner.rows.values()
                       if r["protocol"] == runner.protocol],
              "choice": choice, "seconds": round(time.perf_counter() - started, 1)}
    result["markdown"] = markdown(result)
    return result


# --- rendering ---------------------------------------------------------------------------------------------------
def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "error"
    return f"{row['ppl']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    spec, rows = result["spec"], result["rows"]
    by_key = {r["key"]: r for r in rows}
    cal = result["calibration"]
    lines = [f"### Quality: WikiText-2 test perplexity ({result['source']})", "",
             f"Calibration {cal.get('samples')} x {cal.get('seqlen')} = {cal.get('tokens')} tokens of "
             f"{cal.get('id')} (seed {cal.get('seed')}); perplexity on WikiText-2 test, context {spec['ctx']}, "
             f"first {spec['max_windows']} windows, fp32"
             + (f"; DOT Sinkhorn max_iter {spec['dot_max_iter']}" if spec.get("dot_max_iter") else "") + ".", ""]
    dense = by_key.get("dense")
    if dense:
        lines.append(f"Dense: **{dense['ppl']:.2f}** ({dense['parameters']:,} parameters).")
        lines.append("")
    ratios = [r for r in spec["ratios"] if r > 0]  # (ratio 0 rows are MLP-only: in the MLP table)
    main = [r for r in rows if r["group"] == "main" and not r["dot"] and r.get("outlier_tokens") is None]
    if main:
        header = ["setting", "method"] + [f"{int(round(100 * r))} %" for r in ratios] + ["params (last ratio)"]
        table = []
        for setting in spec["settings"]:
            for method in spec["methods"]:
                cells, params = [], ""
                for ratio in ratios:
                    row = by_key.get(f"{setting}|{ratio}|{method}")
                    cells.append(_cell(row))
                    if row and "parameters" in row:
                        params = f"{row['parameters'] / 1e6:.1f} M"
                if any(cells):
                    table.append([setting, method] + cells + [params])
        proposed = [r for r in rows if r["group"] == "main" and (r["dot"] or r.get("outlier_tokens"))]
        for label in sorted({r["label"] for r in proposed}):
            for setting in spec["settings"]:
                cells = [_cell(by_key.get(f"{setting}|{ratio}|{label}")) for ratio in ratios]
                if any(cells):
                    table.append([setting, f"{label} (proposed)"] + cells + [""])
        lines += ["Main table (ppl; `dot+prune-keep` = DOT with the prune row's kept neurons as targets; in the "
                  "parallel settings they are DOT's own default targets, so that row equals `dot` by construction, "
                  "while in sequential mode the prune run's signals choose them):", "",
                  markdown_table(header, table), ""]
    lines += _mlp_lines(rows, dense)
    ablation = [r for r in rows if r["group"].startswith("ablation") or r["group"] == "proposed"]
    reference = by_key.get(f"parallel/per-point|{spec['ablation_ratio']}|dot")
    if ablation:
        header = ["axis", "variant", "ppl", "mean recon. err", "max cond(R)", "Sinkhorn it. (mean)",
                  "converged", "eff. rank", "basis s"]
        table = []
        def arow(axis, r):
            if "error" in r:
                return [axis, r["label"], "error: " + r["error"][:90], "", "", "", "", "", ""]
            return [axis, r["label"], f"{r['ppl']:.2f}", fmt(r.get("mean_reconstruction_error"), ".4f"),
                    fmt(r.get("max_cond_r"), ".3g"), fmt(r.get("mean_sinkhorn_iterations"), ".0f"),
                    fmt(r.get("converged_fraction"), ".0%"), fmt(r.get("mean_effective_rank"), ".1f"),
                    fmt(r.get("basis_seconds"), ".0f")]
        if reference:
            table.append(arow("reference", reference | {"label": "dot (current defaults)"}))
        for r in ablation:
            table.append(arow(r["group"].split(":")[-1], r))
        lines += [f"DOT ablations at {int(round(100 * spec['ablation_ratio']))} % (parallel, per-point; one option "
                  "changed from the current DotOptions defaults per row):", "", markdown_table(header, table), ""]
    choice = result.get("choice")
    if choice:
        lines.append(f"Chosen defaults (per axis the lowest perplexity, if it beats the current default by more than "
                     f"{MIN_GAIN:.0%}; then all winners combined):")
        for axis, info in choice["per_axis"].items():
            lines.append(f"- {axis}: **{info['best']}** (ppl {info['ppl']:.2f}; current default "
                         f"{fmt(info['reference_ppl'], '.2f')})")
        if choice["changes"] or choice["outlier_tokens"] is not None:
            proposed = choice.get("proposed") or {}
            lines.append(f"- proposed change to the defaults: {choice['changes']}"
                         + (f", outlier_tokens={choice['outlier_tokens']}" if choice["outlier_tokens"] else "")
                         + f" → ppl {fmt(proposed.get('ppl'), '.2f')} vs {fmt(choice['reference_ppl'], '.2f')} with "
                         f"the current defaults; best single row: {choice.get('best_row')}")
        else:
            lines.append("- the current DotOptions defaults scored best on every axis: keep them")
    lines.append("")
    lines.append(f"Machine: {machine_line(result['machine'])}. Total {result['seconds']:.0f} s.")
    return "\n".join(lines)


def _mlp_lines(rows: list[dict], dense: dict | None) -> list[str]:
    """The MLP-axis table: every row of the main group with a perplexity, the residual-only rows beside the MLP
    rows, by size; ``*`` marks the Pareto front (no smaller row has a lower perplexity)."""
    if not any(r.get("mlp_ratio") for r in rows):
        return []
    candidates = [r for r in rows if r["group"] == "main" and not r["dot"] and r.get("outlier_tokens") is None
                  and _ok(r) and "parameters" in r and "same_as" not in r]
    candidates.sort(key=lambda r: (r["parameters"], r["ppl"]))
    front, best = set(), math.inf
    for r in candidates:  # ascending size: on the front when it beats every smaller row
        if r["ppl"] < best:
            front.add(r["key"])
            best = r["ppl"]
    table = []
    for r in sorted(candidates, key=lambda r: (-r["parameters"], r["ppl"])):
        residual = "-" if r["method"] == MLP_ONLY else f"{r['method']} {int(round(100 * r['ratio']))} %"
        mlp = f"{r['mlp_method']} {int(round(100 * r['mlp_ratio']))} %" if r.get("mlp_ratio") else "-"
        size = f"{r['parameters'] / dense['parameters']:.3f}x" if dense else ""
        table.append([r["setting"], residual, mlp, f"{r['parameters'] / 1e6:.1f} M", size,
                      ("**" + f"{r['ppl']:.2f}" + "** *") if r["key"] in front else f"{r['ppl']:.2f}"])
    return ["MLP axis (every MLP's intermediate neurons removed by the fraction shown, the removed ones handled by "
            "the method; residual rows without it beside them), largest first; `*` = Pareto front (no smaller "
            "model has a lower perplexity):", "",
            markdown_table(["setting", "residual", "MLP", "params", "x dense", "ppl"], table), ""]


# --- command line ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="preset: full (method.md's protocol), reduced (minutes), tiny (smoke test)")
    parser.add_argument("--model", default=None, help="model spec (default: the packaged SmolLM2-135M)")
    parser.add_argument("--ratios", default=None, help="comma-separated, e.g. 0.1,0.2,0.3")
    parser.add_argument("--methods", default=None, help=f"comma-separated from {','.join(METHODS)}")
    parser.add_argument("--settings", default=None, help=f"comma-separated from {','.join(SETTINGS)}")
    parser.add_argument("--mlp-ratios", default=None,
                        help="comma-separated fractions of MLP neurons removed, e.g. 0,0.2,0.3 (with --ratios 0,...: "
                             "MLP-only rows too)")
    parser.add_argument("--mlp-methods", default=None, help=f"comma-separated from {','.join(MLP_METHODS)}")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-seqlen", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=None)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--epsilons", default=None, help="comma-separated ε values of the ablation")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--proposed-in-main", action="store_true",
                        help="also run the proposed DOT configuration in every main setting and ratio")
    parser.add_argument("--rows-file", default=None, help="JSON lines of finished rows (resume)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)


def spec_from_args(args) -> QualitySpec:
    def floats(text):
        return None if text is None else tuple(float(v) for v in text.split(",") if v)

    def words(text):
        return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())

    spec = spec_for(args.size, model=args.model, ratios=floats(args.ratios), methods=words(args.methods),
                    settings=words(args.settings), calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                    ctx=args.ctx, max_windows=args.max_windows, epsilons=floats(args.epsilons),
                    mlp_ratios=floats(args.mlp_ratios), mlp_methods=words(args.mlp_methods))
    changes: dict[str, Any] = {"ablations": spec.ablations and not args.no_ablations,
                               "proposed_in_main": spec.proposed_in_main or args.proposed_in_main}
    if args.ratios is not None or args.settings is not None:
        changes["only"] = None
    positive = [r for r in spec.ratios if r > 0]
    if args.ratios is not None and spec.ablation_ratio not in positive:
        changes["ablation_ratio"] = positive[0] if positive else spec.ablation_ratio
    spec = dataclasses.replace(spec, **changes)
    unknown = set(spec.methods) - set(METHODS) | set(spec.settings) - set(SETTINGS) \
        | set(spec.mlp_methods) - set(MLP_METHODS)
    if unknown:
        raise SystemExit(f"unknown methods/settings/MLP methods: {sorted(unknown)}")
    if any(not 0 <= r < 1 for r in spec.ratios + spec.mlp_ratios):
        raise SystemExit("--ratios and --mlp-ratios are fractions in [0, 1)")
    if 0.0 in spec.ratios and not any(spec.mlp_ratios):
        raise SystemExit("--ratios 0 compresses nothing without --mlp-ratios (e.g. --mlp-ratios 0.2,0.3)")
    return spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run_quality(spec_from_args(args), rows_file=args.rows_file)
    emit_result(result, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
