"""MLP intermediate-width benchmark (issue 16): prune / lsq / dot on SmolLM2-135M's MLP neurons, measured by ppl.

Each row reduces every layer's MLP to ``width`` of its I intermediate neurons with :mod:`dotresize.mlp`, replaces
the layer's gate/up/down Linear modules in place (a stock LlamaForCausalLM with a smaller intermediate width),
counts the real parameters and evaluates WikiText-2 perplexity (test split, ctx 256, first 100 windows). Modes:

* ``parallel``: the statistics of h (the input of ``down_proj``) from one pass of the uncompressed model, captured
  once and cached in a scratch file (``--cache-dir``, safetensors; never in git);
* ``sequential``: layer by layer, each layer's statistics from the calibration signal that ran through the
  already-reduced layers before it.

Groups: ``main`` (each method at the widths closest below 0.90/0.85/0.80/0.75x the dense parameters, both modes),
``lambda`` (the ridge of ``lsq`` at keep 1072), ``dot-sweep`` (DOT's ε and cost at keep 1072), ``ablations`` (DOT's
other options one at a time from ``--dot-base``, keep-set rules), and
``analysis`` (no ppl: in-sample and held-out output errors, plan statistics on a few layers). Rows are appended to
``<out>/rows.jsonl`` as they finish and reused when the same row and protocol run again.

    python -m benchmarks.mlp --groups lambda,dot-sweep,analysis
    python -m benchmarks.mlp --groups ablations --dot-base epsilon=0.01,cost=cosine
    python -m benchmarks.mlp --groups main --modes parallel,sequential --dot-base ... --ridge 0.1
    python -m benchmarks.mlp --groups main --methods lsq --targets 0.80 --calib-samples 256
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from dotresize.evaluation.protocol import MeasurementProtocol  # noqa: E402
from dotresize.mlp import (MlpDotOptions, MlpOptions, MlpReduction, MlpStats, MlpStatsAccumulator,  # noqa: E402
                           allocate_widths, complement, dot_map, error_curve, lsq_map, output_error, prune_map,
                           reduce_mlp, reduce_mlp_weights)

from .common import fmt, log, machine_info, machine_line, markdown_table, quiet_libraries, write_json  # noqa: E402

GROUPS = ("main", "lambda", "dot-sweep", "ablations", "schedule", "analysis")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mlp-smollm2"
STATS_VERSION = 1


@dataclass(frozen=True)
class Protocol(MeasurementProtocol):
    """Calibration and evaluation protocol (the defaults are the project's full protocol), with held-out windows
    for the output errors and the batch sizes."""

    model: str = "smollm2-135m-instruct"
    heldout_samples: int = 32
    batch_size: int = 8
    eval_batch_size: int = 4


TINY = Protocol(calib_samples=8, calib_seqlen=64, heldout_samples=4, ctx=64, max_windows=8)


# --- rows ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    group: str
    label: str
    mode: str
    width: int | tuple[int, ...]   # one width for every layer, or one per layer
    options: MlpOptions

    def key(self, protocol: Protocol) -> str:
        body = {"mode": self.mode, "width": self.width, "options": dataclasses.asdict(self.options),
                "protocol": dataclasses.asdict(protocol)}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def dot(**changes: Any) -> MlpOptions:
    return MlpOptions(method="dot", dot=dataclasses.replace(MlpDotOptions(), **changes))


def lambda_rows(width: int) -> list[RowSpec]:
    rows = [RowSpec("lambda", "prune", "parallel", width, MlpOptions(method="prune"))]
    for ridge in (0.0, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0):
        rows.append(RowSpec("lambda", f"lsq λ={ridge:g}", "parallel", width, MlpOptions(method="lsq", ridge=ridge)))
    return rows


def sweep_rows(width: int) -> list[RowSpec]:
    """DOT's plan sharpness: ε under the L2 cost (max- and median-normalised) and under the cosine cost."""
    variants = [(f"dot l2/max ε={eps:g}", dot(epsilon=eps)) for eps in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)]
    variants += [(f"dot l2/median ε={eps:g}", dot(cost_normalization="median", epsilon=eps)) for eps in (0.1, 1.0)]
    variants += [(f"dot cosine ε={eps:g}", dot(cost="cosine", epsilon=eps)) for eps in (0.003, 0.01, 0.03, 0.1)]
    return [RowSpec("dot-sweep", label, "parallel", width, options) for label, options in variants]


def ablation_rows(width: int, base: MlpDotOptions) -> list[RowSpec]:
    """Every other DOT option changed one at a time from ``base``, and the keep-set rule for all three methods."""
    def from_base(**changes: Any) -> MlpOptions:
        return MlpOptions(method="dot", dot=dataclasses.replace(base, **changes))

    variants: list[tuple[str, MlpOptions]] = [
        ("dot base", from_base()),
        ("dot scale none", from_base(scale="none")),
        ("dot scale norm", from_base(scale="norm")),
        ("dot row marginals (softmax)", from_base(marginals="row")),
        ("dot keep energy", from_base().replace(keep_rule="energy")),
        ("lsq keep energy", MlpOptions(method="lsq", keep_rule="energy")),
        ("prune keep energy", MlpOptions(method="prune", keep_rule="energy")),
        ("dot as ridge prior, λ=0.1", from_base(prior=True).replace(ridge=0.1)),
        ("dot as ridge prior, λ=1", from_base(prior=True).replace(ridge=1.0)),
        ("dot keep obs", from_base().replace(keep_rule="obs")),
        ("lsq keep obs, λ=0.1", MlpOptions(method="lsq", keep_rule="obs", ridge=0.1)),
        ("lsq keep obs, λ=1", MlpOptions(method="lsq", keep_rule="obs", ridge=1.0)),
        ("prune keep obs", MlpOptions(method="prune", keep_rule="obs")),
    ]
    return [RowSpec("ablations", label, "parallel", width, options) for label, options in variants]


def parse_dot(text: str) -> MlpDotOptions:
    """``key=value,...`` over MlpDotOptions' fields (e.g. ``epsilon=0.01,cost=cosine``)."""
    fields = {f.name: f.type for f in dataclasses.fields(MlpDotOptions)}
    changes: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--dot-base: unknown option {key!r}; valid: {', '.join(fields)}")
        default = getattr(MlpDotOptions(), key)
        changes[key] = value == "true" if isinstance(default, bool) else type(default)(value)
    return dataclasses.replace(MlpDotOptions(), **changes).validate()


def main_rows(widths: dict[float, int], methods: tuple[str, ...], modes: tuple[str, ...], base: MlpDotOptions,
              ridge: float) -> list[RowSpec]:
    rows = []
    for mode in modes:
        for target, width in widths.items():
            for method in methods:
                name, _, rule = method.partition("-")  # "lsq-obs": lsq with the obs keep-set rule
                options = MlpOptions(method=name, ridge=ridge, dot=base, keep_rule=rule or MlpOptions().keep_rule)
                rows.append(RowSpec("main", f"{method} ≤{target:g}x", mode, width, options))
    return rows


def schedule_rows(state: "ModelState", cal: list[MlpStats], dense: int, targets: tuple[float, ...],
                  step: int = 64) -> list[RowSpec]:
    """lsq with per-layer widths from :func:`allocate_widths` on the calibration error curves, at each target."""
    config = state.model.config
    options = MlpOptions(method="lsq")
    downs = [down.weight for _, _, down in state.originals]
    grid = list(range(config.intermediate_size, config.intermediate_size // 4 - 1, -step))
    start = time.perf_counter()
    curves = [error_curve(s, w, grid, options) for s, w in zip(cal, downs)]
    log(f"schedule: error curves of {len(curves)} layers at {len(grid)} widths in {time.perf_counter() - start:.0f} s")
    energies = [float(torch.trace(w.double() @ s.gram @ w.double().T)) for s, w in zip(cal, downs)]
    uniform = widths_for_targets(dense, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                 targets)
    rows = []
    for target, width in uniform.items():
        for name, weights in (("relative", None), ("absolute", energies)):
            widths = allocate_widths(curves, width * len(curves), weights)
            rows.append(RowSpec("schedule", f"lsq {name}-error schedule ≤{target:g}x", "parallel", tuple(widths),
                                options))
    return rows


def widths_for_targets(dense: int, layers: int, hidden: int, intermediate: int, targets: tuple[float, ...],
                       per_neuron_extra: int = 0) -> dict[float, int]:
    """Largest multiple-of-8 width per target fraction of the dense parameter count (uniform over layers)."""
    per_neuron = layers * (3 * hidden + per_neuron_extra)
    out = {}
    for target in targets:
        width = intermediate - intermediate % 8
        while width > 8 and dense - per_neuron * (intermediate - width) > target * dense:
            width -= 8
        out[target] = width
    return out


# --- model surgery -------------------------------------------------------------------------------------------------
def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def apply_reduction(mlp: torch.nn.Module, reduction: MlpReduction) -> None:
    """Replace the MLP's gate/up/down Linear modules by the reduced ones (a smaller intermediate width)."""
    new = reduce_mlp_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, reduction.keep,
                             reduction.A)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _linear(new.gate), _linear(new.up), _linear(new.down)
    mlp.intermediate_size = new.down.shape[1]


class ModelState:
    """The loaded model, its original MLP modules (restored after every row) and the evaluation data."""

    def __init__(self, protocol: Protocol):
        from dotresize.data import calibration_set, load_text, tokenize
        from dotresize.sources import load_model, resolve_source

        quiet_libraries()
        self.protocol = protocol
        self.source = resolve_source(protocol.model)
        self.model, self.tokenizer = load_model(self.source)
        self.layers = list(self.model.model.layers)
        self.originals = [(l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj) for l in self.layers]
        cal = calibration_set(self.tokenizer, "wikitext2", samples=protocol.calib_samples,
                              seqlen=protocol.calib_seqlen, seed=protocol.seed)
        self.calibration = cal.input_ids
        self.calibration_meta = cal.meta()
        self.heldout = heldout_windows(tokenize(self.tokenizer, load_text("wikitext2").text), protocol)
        self.test_ids = tokenize(self.tokenizer, load_text("wikitext2-test").text)

    def restore(self) -> None:
        for layer, (gate, up, down) in zip(self.layers, self.originals):
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj = gate, up, down
            layer.mlp.intermediate_size = down.in_features

    def batches(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(ids, self.protocol.batch_size))


def heldout_windows(token_ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Validation windows disjoint from the calibration set: the next ones in the calibration's own permutation."""
    seqlen = protocol.calib_seqlen
    windows = token_ids.numel() // seqlen
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(protocol.seed))
    chosen = torch.sort(order[protocol.calib_samples:protocol.calib_samples + protocol.heldout_samples]).values
    return token_ids[: windows * seqlen].view(windows, seqlen)[chosen].clone()


# --- statistics ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_parallel(state: ModelState, ids: torch.Tensor) -> list[MlpStats]:
    """Every layer's h statistics from one pass of the (current) model over ``ids``."""
    accs = [MlpStatsAccumulator(l.mlp.down_proj.in_features, layer=i) for i, l in enumerate(state.layers)]
    handles = [l.mlp.down_proj.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0]))
               for l, acc in zip(state.layers, accs)]
    try:
        for batch in state.batches(ids):
            state.model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [a.finalize() for a in accs]


def cached_stats(state: ModelState, cache_dir: Path) -> tuple[list[MlpStats], list[MlpStats]]:
    """Calibration and held-out statistics of the uncompressed model, from the scratch cache or captured now."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(json.dumps({
        "v": STATS_VERSION, "model": state.source.digests(),
        "cal": hashlib.sha256(state.calibration.numpy().tobytes()).hexdigest(),
        "heldout": hashlib.sha256(state.heldout.numpy().tobytes()).hexdigest(),
    }, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"mlp-stats-{digest}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        log(f"parallel statistics from {path}")
    else:
        start = time.perf_counter()
        tensors = {}
        for name, ids in (("cal", state.calibration), ("heldout", state.heldout)):
            for i, stats in enumerate(capture_parallel(state, ids)):
                tensors.update({f"{name}.{i}.{k}": v for k, v in stats.tensors().items()})
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        log(f"captured parallel statistics in {time.perf_counter() - start:.0f} s -> {path}")
    out = []
    for name in ("cal", "heldout"):
        out.append([MlpStats.from_tensors({k: tensors[f"{name}.{i}.{k}"] for k in ("gram", "sum", "abs_sum", "count")})
                    for i in range(len(state.layers))])
    return out[0], out[1]


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(state: ModelState) -> tuple[list[torch.Tensor], list[dict]]:
    """Layer 0's input hidden states and keyword arguments (mask, rotary embeddings) for every batch."""
    inputs, kwargs_list = [], []

    def catch(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = state.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in state.batches(state.calibration):
            try:
                state.model.model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


@torch.no_grad()
def reduce_sequential(state: ModelState, widths: list[int], options: MlpOptions) -> list[MlpReduction]:
    """Reduce layer by layer, each from h recomputed through the already-reduced layers before it."""
    xs, kwargs = layer_inputs(state)
    reductions = []
    for i, layer in enumerate(state.layers):
        acc = MlpStatsAccumulator(layer.mlp.down_proj.in_features, layer=i)
        handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: acc.add(args[0]))
        try:
            for x, kw in zip(xs, kwargs):
                layer(x, **kw)
        finally:
            handle.remove()
        reduction = reduce_mlp(acc.finalize(), layer.mlp.down_proj.weight, widths[i], options)
        apply_reduction(layer.mlp, reduction)
        reductions.append(reduction)
        xs = [layer(x, **kw) for x, kw in zip(xs, kwargs)]
    return reductions


# --- one row -------------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run_row(state: ModelState, spec: RowSpec, cal: list[MlpStats], heldout: list[MlpStats]) -> dict[str, Any]:
    from dotresize import count_parameters

    p = state.protocol
    state.restore()
    downs = [down.weight for _, _, down in state.originals]
    start = time.perf_counter()
    widths = list(spec.width) if isinstance(spec.width, tuple) else [spec.width] * len(downs)
    if spec.mode == "parallel":
        reductions = [reduce_mlp(s, w, m, spec.options) for s, w, m in zip(cal, downs, widths)]
        for layer, reduction in zip(state.layers, reductions):
            apply_reduction(layer.mlp, reduction)
    else:
        reductions = reduce_sequential(state, widths, spec.options)
    solve_seconds = time.perf_counter() - start
    params = count_parameters(state.model)
    ppl = p.perplexity(state.model, state.test_ids, batch_size=p.eval_batch_size)
    state.restore()
    infos = [r.info for r in reductions]
    row = {
        "group": spec.group, "label": spec.label, "mode": spec.mode,
        "width": list(spec.width) if isinstance(spec.width, tuple) else spec.width,
        "mlp_ratio": round(1 - sum(widths) / (len(widths) * downs[0].shape[1]), 6),
        "options": dataclasses.asdict(spec.options),
        "ppl": ppl["ppl"], "nll": ppl["nll"], "params": params, "solve_seconds": round(solve_seconds, 2),
        "eval_seconds": ppl["seconds"],
        "output_error_cal": _mean([i["output_error"] for i in infos]),
        "output_error_heldout": _mean([output_error(h, w, r.keep, r.A) for h, w, r in zip(heldout, downs, reductions)]),
    }
    if spec.options.method == "dot":
        for key in ("plan_effective_rank", "row_perplexity_mean", "row_max_mean", "scale_median"):
            row[key] = _mean([i.get(key) for i in infos])
        row["sinkhorn_converged"] = all(i.get("sinkhorn_converged", True) for i in infos)
        row["sinkhorn_iterations_max"] = max(i.get("sinkhorn_iterations", 0) for i in infos)
    return row


def dense_row(state: ModelState) -> dict[str, Any]:
    from dotresize import count_parameters

    state.restore()
    p = state.protocol
    ppl = p.perplexity(state.model, state.test_ids, batch_size=p.eval_batch_size)
    return {"group": "dense", "label": "dense", "mode": "-", "width": state.originals[0][2].in_features,
            "mlp_ratio": 0.0, "ppl": ppl["ppl"], "nll": ppl["nll"], "params": count_parameters(state.model),
            "eval_seconds": ppl["seconds"]}


# --- analysis (no perplexity) --------------------------------------------------------------------------------------
def _cosines(gram: torch.Tensor, removed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=1e-300))
    return gram[removed][:, keep] / (norms[removed][:, None] * norms[keep][None, :])


def analyse_layer(cal: MlpStats, heldout: MlpStats, down: torch.Tensor, width: int) -> dict[str, Any]:
    """Why merge or regress: how well the removed neurons are explained, and each map's in/out-of-sample error."""
    options = MlpOptions()
    keep = reduce_mlp(cal, down, width, options.replace(method="prune")).keep
    removed = complement(keep, cal.dim)
    gram = cal.gram
    g_kk = gram[keep][:, keep]
    eig = torch.linalg.eigvalsh(g_kk).clamp(min=0)
    p = eig / eig.sum()
    energy = torch.diagonal(gram)
    lsq0 = lsq_map(cal, keep, ridge=0.0).A
    residual = energy[removed] - (lsq0 * gram[keep][:, removed]).sum(0)  # ‖h_s‖² − ‖proj of h_s on span(h_K)‖²
    explained = 1 - residual / torch.clamp(energy[removed], min=1e-300)
    max_cos = _cosines(gram, removed, keep).abs().max(1).values
    maps: dict[str, torch.Tensor] = {"prune": prune_map(cal, keep).A}
    for ridge in (0.0, 1e-4, 1e-2, 0.1, 1.0):
        maps[f"lsq λ={ridge:g}"] = lsq_map(cal, keep, ridge).A
    plan_stats = {}
    for eps in (0.01, 0.1, 1.0):
        r = dot_map(cal, keep, MlpDotOptions(epsilon=eps))
        maps[f"dot ε={eps:g}"] = r.A
        plan_stats[f"dot ε={eps:g}"] = {k: r.info[k] for k in ("plan_effective_rank", "row_perplexity_mean",
                                                                "row_max_mean", "scale_median")}
    for eps in (0.003, 0.01, 0.03):
        r = dot_map(cal, keep, MlpDotOptions(epsilon=eps, cost="cosine"))
        maps[f"dot cosine ε={eps:g}"] = r.A
        plan_stats[f"dot cosine ε={eps:g}"] = {k: r.info[k] for k in ("plan_effective_rank", "row_perplexity_mean",
                                                                       "row_max_mean", "scale_median")}
    maps["dot cosine row ε=0.01"] = dot_map(cal, keep, MlpDotOptions(epsilon=0.01, cost="cosine", marginals="row")).A
    maps["dot prior λ=0.1"] = dot_map(cal, keep, MlpDotOptions(prior=True), ridge=0.1).A
    ref = maps["lsq λ=0.1"]
    errors = {name: {"cal": output_error(cal, down, keep, A), "heldout": output_error(heldout, down, keep, A),
                     "cos_to_lsq": float((A * ref).sum() / (A.norm() * ref.norm())) if A.any() else 0.0,
                     "norm": float(A.norm())}
              for name, A in maps.items()}
    obs = reduce_mlp(cal, down, width, options.replace(keep_rule="obs", ridge=0.1))
    errors["lsq λ=0.1, keep obs"] = {"cal": obs.info["output_error"],
                                     "heldout": output_error(heldout, down, obs.keep, obs.A),
                                     "cos_to_lsq": None, "norm": float(obs.A.norm())}
    A = maps["lsq λ=0.1"]
    participation = A.abs().sum(0) ** 2 / torch.clamp((A ** 2).sum(0), min=1e-300)  # ~ kept neurons a column uses
    return {
        "width": width, "removed": int(removed.numel()),
        "lsq_participation_median": float(participation.median()),
        "lsq_negative_share": float(A.clamp(max=0).abs().sum() / A.abs().sum()),
        "gram_kk_effective_rank": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
        "gram_kk_condition": float(eig.max() / max(float(eig.min()), 1e-300)),
        "removed_energy_share": float(energy[removed].sum() / energy.sum()),
        "lsq_explained_median": float(explained.median()),
        "lsq_explained_mean_weighted": float(1 - residual.sum() / energy[removed].sum()),
        "max_abs_cos_to_kept_median": float(max_cos.median()),
        "errors": errors, "plans": plan_stats,
    }


def run_analysis(state: ModelState, cal: list[MlpStats], heldout: list[MlpStats], width: int,
                 layers: tuple[int, ...]) -> dict[str, Any]:
    out = {}
    for i in layers:
        if i < len(cal):
            out[str(i)] = analyse_layer(cal[i], heldout[i], state.originals[i][2].weight, width)
            log(f"analysis layer {i}: lsq explains {out[str(i)]['lsq_explained_mean_weighted']:.3f} of the removed "
                f"energy; median max |cos| to a kept neuron {out[str(i)]['max_abs_cos_to_kept_median']:.3f}")
    return out


# --- report --------------------------------------------------------------------------------------------------------
def width_text(width: int | list[int]) -> str:
    """A width, or a per-layer schedule as ``min–max (mean)``."""
    if isinstance(width, (list, tuple)):
        return f"{min(width)}–{max(width)} (mean {sum(width) / len(width):.0f})"
    return str(width)


def _row_cells(row: dict[str, Any], dense_params: int) -> list[str]:
    return [row["label"], row["mode"], width_text(row["width"]), fmt(row["mlp_ratio"], ".3f"), f"{row['params']:,}",
            fmt(row["params"] / dense_params, ".4f"), fmt(row["ppl"], ".2f"), fmt(row.get("output_error_cal"), ".4f"),
            fmt(row.get("output_error_heldout"), ".4f")]


HEADER = ["row", "mode", "kept / layer", "MLP ratio", "parameters", "× dense", "ppl", "out. err (cal)",
          "out. err (held-out)"]


def markdown(rows: list[dict[str, Any]], analysis: dict[str, Any], machine: dict[str, Any]) -> str:
    dense = next((r for r in rows if r["group"] == "dense"), None)
    dense_params = dense["params"] if dense else 1
    parts = [f"Machine: {machine_line(machine)}", ""]
    if dense:
        parts += [f"Dense: ppl {dense['ppl']:.2f}, {dense['params']:,} parameters.", ""]
    for group in ("main", "schedule", "lambda", "dot-sweep", "ablations"):
        selected = [r for r in rows if r["group"] == group]
        if selected:
            parts += [f"### {group}", "", markdown_table(HEADER, [_row_cells(r, dense_params) for r in selected]), ""]
    dots = [r for r in rows if r.get("plan_effective_rank") is not None]
    if dots:
        parts += ["### DOT plan statistics (means over layers)", "", markdown_table(
            ["row", "mode", "kept", "plan eff. rank", "kept neurons per removed (exp row entropy)", "mean max row entry",
             "median scale", "Sinkhorn converged", "max iterations"],
            [[r["label"], r["mode"], width_text(r["width"]), fmt(r["plan_effective_rank"], ".1f"),
              fmt(r["row_perplexity_mean"], ".1f"), fmt(r["row_max_mean"], ".3f"), fmt(r["scale_median"], ".3f"),
              r["sinkhorn_converged"], r["sinkhorn_iterations_max"]] for r in dots]), ""]
    if analysis:
        names = list(next(iter(analysis.values()))["errors"])
        parts += ["### analysis: relative output error of down_proj, calibration / held-out, per layer", "",
                  markdown_table(["map"] + [f"layer {i}" for i in analysis],
                                 [[n] + [f"{a['errors'][n]['cal']:.4f} / {a['errors'][n]['heldout']:.4f}"
                                         for a in analysis.values()] for n in names]), "",
                  markdown_table(["layer", "removed energy share", "lsq explains (removed energy)",
                                  "median max |cos| to a kept neuron", "lsq column participation (median)",
                                  "lsq negative share", "eff. rank G_KK", "cond G_KK",
                                  "cos(A_dot ε=0.1, A_lsq)", "‖A_dot‖/‖A_lsq‖"],
                                 [[i, fmt(a["removed_energy_share"], ".3f"), fmt(a["lsq_explained_mean_weighted"], ".3f"),
                                   fmt(a["max_abs_cos_to_kept_median"], ".3f"), fmt(a["lsq_participation_median"], ".0f"),
                                   fmt(a["lsq_negative_share"], ".2f"), fmt(a["gram_kk_effective_rank"], ".0f"),
                                   fmt(a["gram_kk_condition"], ".2e"), fmt(a["errors"]["dot ε=0.1"]["cos_to_lsq"], ".3f"),
                                   fmt(a["errors"]["dot ε=0.1"]["norm"] / a["errors"]["lsq λ=0.1"]["norm"], ".3f")]
                                  for i, a in analysis.items()]), ""]
    return "\n".join(parts)


# --- main ----------------------------------------------------------------------------------------------------------
def _load_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["key"]] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlp", description=__doc__.split("\n")[0])
    parser.add_argument("--groups", default="main,lambda,ablations,analysis")
    parser.add_argument("--modes", default="parallel,sequential")
    parser.add_argument("--methods", default="prune,lsq,dot")
    parser.add_argument("--targets", default="0.90,0.85,0.80,0.75", help="fractions of the dense parameter count")
    parser.add_argument("--schedule-targets", default="0.80,0.75", help="targets of the per-layer schedule rows")
    parser.add_argument("--ablation-width", type=int, default=1072)
    parser.add_argument("--dot-base", default="", help="DOT options of the ablations and the main rows, "
                        "key=value,... over MlpDotOptions (default: its defaults)")
    parser.add_argument("--ridge", type=float, default=MlpOptions().ridge, help="λ of the main rows (lsq, dot prior)")
    parser.add_argument("--analysis-layers", default="0,7,15,22,29")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help="calibration windows of 256 tokens (default: the protocol's 64); the held-out windows "
                             "follow them in the same permutation")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a smoke run of the harness")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dotresize-mlp")
    args = parser.parse_args(argv)
    groups = tuple(g for g in args.groups.split(",") if g)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; valid: {', '.join(GROUPS)}")
    protocol = Protocol() if args.size == "full" else TINY
    if args.calib_samples:  # more calibration: every row keyed (and its files named) by the protocol
        protocol = dataclasses.replace(protocol, calib_samples=args.calib_samples)
    torch.manual_seed(0)
    state = ModelState(protocol)
    machine = machine_info()
    log(f"machine: {machine_line(machine)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / ("rows.jsonl" if args.size == "full" else "rows-tiny.jsonl")
    done = _load_rows(rows_path)
    cal, heldout = cached_stats(state, args.cache_dir)

    config = state.model.config
    dense_key = hashlib.sha256(json.dumps(dataclasses.asdict(protocol), sort_keys=True).encode()).hexdigest()[:16]
    if f"dense-{dense_key}" not in done:
        row = {**dense_row(state), "key": f"dense-{dense_key}"}
        done[row["key"]] = row
        with rows_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    dense = done[f"dense-{dense_key}"]
    log(f"dense: ppl {dense['ppl']:.3f}, {dense['params']:,} parameters")

    specs: list[RowSpec] = []
    if "lambda" in groups:
        specs += lambda_rows(args.ablation_width)
    base = parse_dot(args.dot_base)
    if "dot-sweep" in groups:
        specs += sweep_rows(args.ablation_width)
    if "ablations" in groups:
        specs += ablation_rows(args.ablation_width, base)
    if "schedule" in groups:
        specs += schedule_rows(state, cal, dense["params"], tuple(float(t) for t in args.schedule_targets.split(",")))
    if "main" in groups:
        widths = widths_for_targets(dense["params"], config.num_hidden_layers, config.hidden_size,
                                    config.intermediate_size, tuple(float(t) for t in args.targets.split(",")))
        specs += main_rows(widths, tuple(args.methods.split(",")), tuple(args.modes.split(",")), base, args.ridge)
    selected = [dense]
    for spec in specs:
        key = spec.key(protocol)
        if key not in done:
            row = {**run_row(state, spec, cal, heldout), "key": key}
            done[key] = row
            with rows_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        row = {**done[key], "group": spec.group, "label": spec.label}
        selected.append(row)
        log(f"{row['group']:>9} | {row['label']:<38} {row['mode']:<10} keep {width_text(row['width']):>4}  "
            f"{row['params'] / dense['params']:.4f}x  ppl {row['ppl']:8.3f}  err cal/held-out "
            f"{fmt(row.get('output_error_cal'), '.4f')}/{fmt(row.get('output_error_heldout'), '.4f')}")
    analysis = {}
    if "analysis" in groups:
        analysis = run_analysis(state, cal, heldout, args.ablation_width,
                                tuple(int(i) for i in args.analysis_layers.split(",") if i))
    report = {"protocol": dataclasses.asdict(protocol), "calibration": state.calibration_meta, "machine": machine,
              "groups": list(groups), "rows": selected, "analysis": analysis}
    name = "-".join(groups) if args.size == "full" else "tiny"
    if args.calib_samples:
        name += f"-cal{args.calib_samples}"
    write_json(args.out / f"mlp-{name}.json", report)
    text = markdown(selected, analysis, machine)
    (args.out / f"mlp-{name}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
