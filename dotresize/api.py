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

from .adapters import ModelAdapter, get_adapter
from .bases import Basis, compute_basis
from .calibration import capture_point_stats, iter_batches, sequential_bases
from .config import CompressionConfig
from .errors import CalibrationError, InvalidConfigError
from .fusion import fuse_norms
from .modeling import FORMAT_VERSION
from .statistics import PointStats, pool_stats
from .surgery import global_state_dict, per_point_state_dict

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

    @property
    def parameter_ratio(self) -> float:
        return self.parameters_after / self.parameters_before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parameter_ratio"] = self.parameter_ratio
        return data


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def plan_widths(adapter: ModelAdapter, config: CompressionConfig) -> list[int]:
    """Width d_p of every slice point (method.md decision 6)."""
    full, points = adapter.hidden_size, adapter.num_points
    if config.widths is not None:
        widths = [int(w) for w in config.widths]
        if len(widths) != points:
            raise InvalidConfigError(f"widths must list {points} values (2L+1 points), got {len(widths)}")
        if any(not 1 <= w <= full for w in widths):
            raise InvalidConfigError(f"every width must be in [1, {full}]")
        if config.layout == "global" and len(set(widths)) != 1:
            raise InvalidConfigError("layout 'global' needs one width for every point")
        return widths
    width = math.floor((1.0 - config.ratio) * full + 1e-9)
    width -= width % config.round_to
    if config.layout == "global":
        width -= width % adapter.num_attention_heads  # stock configs need hidden_size % heads == 0
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


def _sample_tokens(config: CompressionConfig) -> int:
    return config.dot.sample_tokens if (config.method == "dot" and config.dot.cost == "l1") else 0


def compute_bases(adapter: ModelAdapter, batches: list[torch.Tensor], widths: list[int], config: CompressionConfig,
                  *, progress: bool = True, device: str | None = None, timings: dict | None = None) -> list[Basis]:
    """Bases of every point of a fused model, in the configured calibration mode and layout."""
    timings = timings if timings is not None else {}
    basis_fn = make_basis_fn(config, device)
    stats_kwargs = dict(sample_tokens=_sample_tokens(config), outlier_tokens=config.outlier_tokens,
                        seed=config.seed, progress=progress)
    start = time.perf_counter()
    if config.mode == "sequential":
        bases = sequential_bases(adapter, batches, widths, basis_fn, **stats_kwargs)
        timings["calibrate_and_bases"] = time.perf_counter() - start
        return bases
    stats = capture_point_stats(adapter, batches, **stats_kwargs)
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


def compressed_config(adapter: ModelAdapter, widths: list[int], layout: str):
    """The HF config of the compressed model: the source config plus the widths (or hidden_size = d)."""
    source = adapter.config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "quantization_config",
                "dotresize", "_name_or_path"):
        source.pop(key, None)
    source["tie_word_embeddings"] = False
    source["head_dim"] = int(getattr(adapter.config, "head_dim", None)
                             or adapter.hidden_size // adapter.num_attention_heads)
    if layout == "global":
        width = widths[0]
        source["hidden_size"] = width
        source["rms_norm_eps"] = adapter.rms_norm_eps * adapter.hidden_size / width
        config = type(adapter.config)(**source)
        config.architectures = [type(adapter.model).__name__]
        return config
    cls = adapter.compressed_config_class
    source["dotresize"] = {"format_version": FORMAT_VERSION, "hidden_size": adapter.hidden_size,
                           "widths": [int(w) for w in widths]}
    config = cls(**source)
    config.architectures = [adapter.compressed_model_class.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_dotresize.{cls.__name__}",
        "AutoModelForCausalLM": f"modeling_dotresize.{adapter.compressed_model_class.__name__}",
    }
    return config


def build_compressed_model(adapter: ModelAdapter, bases: list[Basis], layout: str) -> PreTrainedModel:
    """Instantiate the compressed model (per-point class or stock class) and load the absorbed weights."""
    state = global_state_dict(adapter, bases[0]) if layout == "global" else per_point_state_dict(adapter, bases)
    return assemble_model(adapter, [b.width for b in bases], layout, state)


def assemble_model(adapter: ModelAdapter, widths: list[int], layout: str,
                   state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """The compressed model of ``widths`` holding ``state`` (absorbed weights, e.g. assembled layer by layer)."""
    config = compressed_config(adapter, widths, layout)
    config._attn_implementation = adapter.config._attn_implementation
    model_cls = type(adapter.model) if layout == "global" else adapter.compressed_model_class
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = copy.deepcopy(adapter.model.generation_config)
    model.eval()
    return model


def check_calibration(calibration: torch.Tensor, hidden_size: int) -> None:
    if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int32, torch.int64):
        raise CalibrationError("calibration must be a (samples, seqlen) tensor of token ids")
    tokens = calibration.numel()
    if tokens < hidden_size:
        raise CalibrationError(
            f"the calibration set has {tokens} tokens, fewer than the hidden size {hidden_size}: "
            f"use more samples or longer sequences (at least {hidden_size} tokens; thousands recommended)"
        )


def compress(model: PreTrainedModel, calibration: torch.Tensor, config: CompressionConfig | None = None, *,
             progress: bool = True, device: str | None = None) -> tuple[PreTrainedModel, CompressionReport]:
    """Compress the residual-stream width of ``model`` with the bases of ``config.method``.

    ``calibration`` is an (n, L) tensor of token ids. ``model`` is fused in place (its function is unchanged:
    norms become weight-free and the head is untied). Returns a new model that ``save_compressed`` exports,
    and a report with per-point diagnostics, widths and real parameter counts.
    """
    config = (config or CompressionConfig()).validate()
    torch.manual_seed(config.seed)
    adapter = get_adapter(model)
    check_calibration(calibration, adapter.hidden_size)
    timings: dict[str, float] = {}
    parameters_before = count_parameters(model)
    start = time.perf_counter()
    model.eval()
    fuse_norms(adapter)
    timings["fuse"] = time.perf_counter() - start
    widths = plan_widths(adapter, config)
    batches = iter_batches(calibration, config.batch_size)
    bases = compute_bases(adapter, batches, widths, config, progress=progress, device=device, timings=timings)
    start = time.perf_counter()
    compressed = build_compressed_model(adapter, bases, config.layout)
    timings["absorb"] = time.perf_counter() - start
    points = [dict(b.info) for b in bases] if config.layout == "per-point" else [dict(bases[0].info)]
    report = CompressionReport(
        family=type(adapter).family,
        hidden_size=adapter.hidden_size,
        widths=[b.width for b in bases],
        layout=config.layout,
        parameters_before=parameters_before,
        parameters_after=count_parameters(compressed),
        calibration_tokens=int(calibration.numel()),
        points=points,
        seconds={k: round(v, 3) for k, v in timings.items()},
        config=config.to_dict(),
    )
    return compressed, report
