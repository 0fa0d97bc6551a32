"""The in-memory API: ``compress(model, calibration, config) -> (compressed_model, report)``."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import PreTrainedModel

from .bases import Basis, compute_basis
from .calibration import capture_point_stats, iter_batches, sequential_bases
from .config import CompressionConfig, checked_widths
from .adapters import check_layout, get_adapter
from .errors import CalibrationError, InvalidConfigError
from .layerwise import LayeredModel, ResidentModel, count_parameters
from .modeling import CONFIG_FORMAT_VERSION
from .statistics import PointStats, pool_stats
from .surgery import compressed_state_dict

log = logging.getLogger(__name__)


@dataclass
class CompressionReport:
    """What a compression did, per point and in total (method.md decision 8: real counts, not ratios)."""

    family: str
    hidden_size: int
    widths: list[int]
    layout: str
    parameters_before: int
    parameters_after: int
    calibration_tokens: int
    points: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: the MLP axis, when used: intermediate size before, kept widths and per-layer diagnostics
    mlp: dict[str, Any] | None = None

    @property
    def parameter_ratio(self) -> float:
        return self.parameters_after / self.parameters_before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parameter_ratio"] = self.parameter_ratio
        return data


def plan_widths(model, config: CompressionConfig) -> list[int]:
    """Width d_p of every slice point (method.md decision 6); ``model`` has ``hidden_size``, ``num_points`` and
    ``num_attention_heads`` (a :class:`~dotresize.layerwise.LayeredModel` or a record of those, with ``family``
    for the global layout's refusal where a family has no stock form of it)."""
    full, points = model.hidden_size, model.num_points
    check_layout(getattr(model, "adapter_cls", None) or getattr(model, "family", None), config.layout,
                 config.residual_active)
    if config.widths is not None:
        widths = checked_widths(config.widths, points, full, key="widths", per="2L+1 points", noun="width")
        if config.layout == "global" and len(set(widths)) != 1:
            raise InvalidConfigError("layout 'global' needs one width for every point")
        return widths
    width = math.floor((1.0 - config.ratio) * full + 1e-9)
    width -= width % config.round_to
    if config.layout == "global":
        width -= width % model.num_attention_heads  # stock configs need hidden_size % heads == 0
        if width < 1:
            raise InvalidConfigError(f"ratio {config.ratio} leaves no width for hidden size {full}")
        return [width] * points
    if width < 1:
        raise InvalidConfigError(f"ratio {config.ratio} leaves no width for hidden size {full}")
    last = width if config.slice_head else full
    return [width] * (points - 1) + [last]


def _keep_set(config: CompressionConfig, point: int) -> torch.Tensor | None:
    if config.keep_sets is None:
        return None
    return torch.tensor(sorted(config.keep_sets[point]), dtype=torch.long)


def make_basis_fn(config: CompressionConfig, device: str | None = None):
    def basis_fn(stats: PointStats, width: int, point: int) -> Basis:
        return compute_basis(stats, width, config, point=point, keep=_keep_set(config, point), device=device)
    return basis_fn


def sample_tokens(config: CompressionConfig) -> int:
    """Raw activation rows kept per point for costs that need them (the L1 cost)."""
    return config.dot.sample_tokens if (config.method == "dot" and config.dot.cost == "l1") else 0


def compute_bases(model: LayeredModel, batches: list[torch.Tensor], widths: list[int], config: CompressionConfig,
                  *, progress: bool = True, device: str | None = None, timings: dict | None = None,
                  stats: list[PointStats] | None = None) -> list[Basis]:
    """Bases of every point of a model, in the configured calibration mode and layout (``parallel``: from
    ``stats`` when already captured, e.g. in the MLP axis' pass)."""
    timings = timings if timings is not None else {}
    basis_fn = make_basis_fn(config, device)
    stats_kwargs = dict(sample_tokens=sample_tokens(config), outlier_tokens=config.outlier_tokens,
                        seed=config.seed, progress=progress)
    start = time.perf_counter()
    if config.mode == "sequential":
        bases = sequential_bases(model, batches, widths, basis_fn, **stats_kwargs)
        timings["calibrate_and_bases"] = time.perf_counter() - start
        return bases
    if stats is None:
        stats = capture_point_stats(model, batches, **stats_kwargs)
        timings["capture"] = time.perf_counter() - start
    start = time.perf_counter()
    if config.layout == "global":
        shared = basis_fn(pool_stats(stats, config.global_pooling), widths[0], -1)
        bases = [shared] * len(stats)
    else:
        from tqdm.auto import tqdm
        bases = [basis_fn(s, w, p) for p, (s, w) in
                 enumerate(tqdm(list(zip(stats, widths)), desc="bases", unit="point", disable=not progress))]
    timings["bases"] = time.perf_counter() - start
    return bases


def _model_mlp_widths(model, mlp_widths: list[int] | None) -> list[int] | None:
    if mlp_widths is not None:
        return [int(w) for w in mlp_widths]
    found = getattr(model, "mlp_widths", None)  # an MlpReducedModel's
    return None if found is None else [int(w) for w in found]


def is_stock(layout: str, mlp_widths: list[int] | None) -> bool:
    """Whether the compressed model is the source's own architecture: the global layout (or an untouched residual
    stream) with one MLP width for every layer."""
    return layout == "global" and (mlp_widths is None or len(set(mlp_widths)) == 1)


def compressed_config(model: LayeredModel, widths: list[int], layout: str, mlp_widths: list[int] | None = None,
                      tied: bool = False):
    """The HF config of the compressed model: the source config plus the widths (or hidden_size = d) and, with the
    MLP axis, the intermediate sizes (``mlp_widths``, default: the model's own when it is an MlpReducedModel).

    The global layout with non-uniform MLP widths has no stock form: it is the per-point class with one width
    everywhere and no shortcuts (``"shortcuts": false``; its weight-free norms divide by D, which equals the stock
    norms' √(D/d) weights and eps·D/d)."""
    mlp_widths = _model_mlp_widths(model, mlp_widths)
    source = model.config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "quantization_config",
                "dotresize", "_name_or_path", "dtype", "torch_dtype"):
        source.pop(key, None)
    source["tie_word_embeddings"] = bool(tied)  # a rotated stream unties them; the MLP axis alone may keep it
    source["head_dim"] = int(getattr(model.config, "head_dim", None) or model.hidden_size // model.num_attention_heads)
    family = model.layout
    if mlp_widths is not None:
        source[family.intermediate_size] = max(mlp_widths)
    if is_stock(layout, mlp_widths):
        width = widths[0]
        source["hidden_size"] = width
        if width != model.hidden_size and isinstance(family.norm_eps, str):
            source[family.norm_eps] = model.rms_norm_eps * model.hidden_size / width
        config = type(model.config)(**source)
        config.architectures = [model.model_class.__name__]
        return config
    model_cls = model.adapter_cls.compressed_model_class
    cls = model_cls.config_class
    source["dotresize"] = {"format_version": CONFIG_FORMAT_VERSION, "hidden_size": model.hidden_size,
                           "widths": [int(w) for w in widths], "norm_eps": model.rms_norm_eps,
                           "layout": family.to_dict()}
    if mlp_widths is not None:
        source["dotresize"].update(intermediate_sizes=mlp_widths)
    if layout == "global":
        source["dotresize"].update(shortcuts=False)
    config = cls(**source)
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_dotresize.{cls.__name__}",
        "AutoModelForCausalLM": f"modeling_dotresize.{model_cls.__name__}",
    }
    return config


def skeleton_model(model: LayeredModel, widths: list[int], layout: str,
                   dtype: torch.dtype | None = None, mlp_widths: list[int] | None = None,
                   tied: bool = False) -> PreTrainedModel:
    """The compressed model's structure with no weights (meta device): its config, classes and state-dict keys."""
    mlp_widths = _model_mlp_widths(model, mlp_widths)
    config = compressed_config(model, widths, layout, mlp_widths, tied)
    config._attn_implementation = getattr(model, "attn_implementation", None) or model.config._attn_implementation
    if dtype is not None:
        config.dtype = dtype
    model_cls = model.model_class if is_stock(layout, mlp_widths) else model.adapter_cls.compressed_model_class
    with init_empty_weights(include_buffers=False):
        return model_cls(config)


def assemble_model(model: LayeredModel, widths: list[int], layout: str, state: dict[str, torch.Tensor],
                   generation_config=None, mlp_widths: list[int] | None = None) -> PreTrainedModel:
    """The compressed model of ``widths`` holding ``state`` (absorbed weights, e.g. assembled layer by layer);
    a state without a head keeps it tied to the embeddings."""
    mlp_widths = _model_mlp_widths(model, mlp_widths)
    if not is_stock(layout, mlp_widths) and layout == "global":
        state = without_norm_weights(model, state)
    head = model.layout.weight(model.layout.lm_head)
    tied = head not in state
    compressed = skeleton_model(model, widths, layout, mlp_widths=mlp_widths, tied=tied)
    if tied:
        state = {**state, head: state[model.layout.weight(model.layout.embeddings)]}
    compressed.load_state_dict(state, strict=True, assign=True)
    if tied:
        compressed.tie_weights()
    if generation_config is not None:
        compressed.generation_config = copy.deepcopy(generation_config)
    return compressed.eval()


def without_norm_weights(model: LayeredModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A global-layout state without its (constant) norm weights and biases: the per-point class's norms have none."""
    layout = model.layout
    paths = [layout.final_norm] + [layout.layer_prefix(index) + path for index in range(model.num_layers)
                                   for path in (layout.input_norm, layout.post_attention_norm)]
    names = {name for path in paths for name in (layout.weight(path), layout.bias(path))}
    return {k: v for k, v in state.items() if k not in names}


def build_compressed_model(model: LayeredModel, bases: list[Basis], layout: str,
                           generation_config=None) -> PreTrainedModel:
    """Instantiate the compressed model (per-point class or stock class) and load the absorbed weights."""
    state = compressed_state_dict(model, bases, layout, keep_tied=is_stock(layout, _model_mlp_widths(model, None)))
    return assemble_model(model, [b.width for b in bases], layout, state, generation_config)


def check_calibration(calibration: torch.Tensor, hidden_size: int) -> str | None:
    """Refuse anything but an (n, L) tensor of token ids; a set of fewer tokens than the hidden size is allowed
    (its statistics have rank at most the token count: enough to time a run, poor for quality) with a warning,
    which is also returned."""
    if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int32, torch.int64):
        raise CalibrationError("calibration must be a (samples, seqlen) tensor of token ids")
    tokens = calibration.numel()
    if tokens < hidden_size:
        warning = (f"the calibration set has {tokens} tokens, fewer than the hidden size {hidden_size}: its "
                   f"statistics have rank at most {tokens}, so the bases are poorly determined; use at least "
                   f"{hidden_size} tokens (thousands recommended) unless you are only timing a run")
        log.warning(warning)
        return warning
    return None


def identity_basis(hidden_size: int) -> Basis:
    """The basis of an uncompressed point (the MLP axis alone leaves the residual stream as it is)."""
    return Basis(torch.eye(hidden_size, dtype=torch.float64), info={"method": "identity", "width": hidden_size})


def export_layout(config: CompressionConfig) -> str:
    """The layout the compressed model is built in: the configured one, or ``global`` when only the MLPs are
    reduced (an untouched residual stream needs no shortcuts, so a uniform MLP width is a stock model)."""
    return config.layout if config.residual_active else "global"


def reduce_mlps(model: LayeredModel, batches: list[torch.Tensor], config: CompressionConfig, *,
                progress: bool = True, timings: dict | None = None
                ) -> tuple[LayeredModel, list[PointStats] | None, dict[str, Any]]:
    """The MLP axis: every layer's MLP reduced (``parallel``: statistics of the uncompressed model, captured in one
    pass with the residual points' statistics when the residual stream is compressed too; ``sequential``: layer by
    layer through the already-reduced layers). Returns the model with reduced MLPs, the residual points'
    statistics (``parallel`` only, else None) and the report's ``mlp`` section."""
    from .mlp.model import (MlpReducedModel, capture_mlp_stats, intermediate_size, layer_keep_set,
                            plan_mlp_widths, reduce_parallel, reduce_sequential, reduction_info)

    timings = timings if timings is not None else {}
    intermediate = intermediate_size(model)
    widths = plan_mlp_widths(config, intermediate, model.num_layers)
    keep_sets = [layer_keep_set(config, index) for index in range(model.num_layers)]
    start = time.perf_counter()
    point_stats = None
    if config.mode == "sequential":
        reductions = reduce_sequential(model, batches, widths, config.mlp, keep_sets=keep_sets, progress=progress)
    else:
        sink, finalize = None, None
        if config.residual_active:
            sink, finalize = _point_accumulators(model, config)
        mlp_stats = capture_mlp_stats(model, batches, sink=sink, progress=progress)
        timings["capture"] = time.perf_counter() - start
        point_stats = finalize() if finalize else None
        start = time.perf_counter()
        reductions = reduce_parallel(model, mlp_stats, widths, config.mlp, keep_sets)
    timings["mlp"] = time.perf_counter() - start
    section = {"intermediate_size": intermediate, "widths": widths, "method": config.mlp.method,
               "layers": reduction_info(reductions)}
    return MlpReducedModel(model, reductions), point_stats, section


def _point_accumulators(model: LayeredModel, config: CompressionConfig):
    """A sink for the residual points and the function returning their statistics (as capture_point_stats)."""
    from .statistics import StatsAccumulator

    accumulators = [StatsAccumulator(model.hidden_size, point=p, sample_tokens=sample_tokens(config),
                                     outlier_tokens=config.outlier_tokens, seed=config.seed)
                    for p in range(model.num_points)]
    return (lambda p, h: accumulators[p].add(h)), (lambda: [acc.finalize() for acc in accumulators])


def compress(model: PreTrainedModel, calibration: torch.Tensor, config: CompressionConfig | None = None, *,
             progress: bool = True, device: str | None = None) -> tuple[PreTrainedModel, CompressionReport]:
    """Compress the residual-stream width of ``model`` with the bases of ``config.method`` and, with
    ``config.mlp_ratio`` / ``config.mlp_widths``, its MLPs' intermediate width (first, then the residual stream).

    ``calibration`` is an (n, L) tensor of token ids. ``model`` is fused in place (its function is unchanged:
    norms become weight-free and the head is untied). Returns a new model that ``save_compressed`` exports,
    and a report with per-point diagnostics, widths and real parameter counts.
    """
    config = (config or CompressionConfig()).validate()
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    check_layout(get_adapter(model).__class__, config.layout, config.residual_active)  # before fusing anything
    layered = ResidentModel(model)  # fuses the norms in place
    check_calibration(calibration, layered.hidden_size)
    timings["fuse"] = time.perf_counter() - start
    residual = config.residual_active
    widths = plan_widths(layered, config) if residual else [layered.hidden_size] * layered.num_points
    batches = iter_batches(calibration, config.batch_size)
    reduced, point_stats, mlp_section = layered, None, None
    if config.mlp_active:
        reduced, point_stats, mlp_section = reduce_mlps(layered, batches, config, progress=progress, timings=timings)
    if residual:
        bases = compute_bases(reduced, batches, widths, config, progress=progress, device=device, timings=timings,
                              stats=point_stats)
    else:
        bases = [identity_basis(layered.hidden_size)] * layered.num_points
    layout = export_layout(config)
    start = time.perf_counter()
    compressed = build_compressed_model(reduced, bases, layout, model.generation_config)
    timings["absorb"] = time.perf_counter() - start
    points = [dict(b.info) for b in bases] if layout == "per-point" else [dict(bases[0].info)]
    report = CompressionReport(
        family=layered.adapter_cls.family,
        hidden_size=layered.hidden_size,
        widths=[b.width for b in bases],
        layout=layout,
        parameters_before=layered.parameter_count(),
        parameters_after=count_parameters(compressed),
        calibration_tokens=int(calibration.numel()),
        points=points,
        seconds={k: round(v, 3) for k, v in timings.items()},
        config=config.to_dict(),
        mlp=mlp_section,
    )
    return compressed, report
