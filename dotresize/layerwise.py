"""A decoder LM seen layer by layer: embeddings, fused decoder layers, the fused head.

Two implementations share one interface (:class:`LayeredModel`), so capture, sequential calibration and
absorption are written once:

* :class:`ResidentModel` — a model already in memory (the notebook API, ``dotresize.compress``); it is fused in
  place and its layers are simply handed out;
* :class:`StreamedModel` — a checkpoint on disk read a tensor at a time (:mod:`dotresize.checkpoint`): a layer
  is read, cast to float32, fused and handed out inside ``with model.layer(i) as layer:``, and released on exit
  (its parameters are moved to the meta device, so a lingering reference keeps no memory). At most
  :data:`MAX_LIVE_LAYERS` layers are materialised at once per process (a semaphore), and :data:`LEDGER` records
  how many were, at most — what the tests check instead of RSS.

The keyword arguments a decoder layer receives (attention mask, rotary embeddings, per-layer sliding windows)
are computed by the family's own model code: a weightless skeleton of the model (meta device) runs its forward
on the hidden states with every decoder layer replaced by a recorder.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .adapters import ModelAdapter, adapter_class_for_config, get_adapter
from .adapters.base import FamilyLayout, ResidualShape, set_submodule
from .checkpoint import TensorReader, storage_dtype
from .fusion import centre_rows, fuse_layer, fuse_norms, fused_head_bias

#: decoder layers materialised at once in one process (capture, absorb and sequential tasks share the budget)
MAX_LIVE_LAYERS = 2
#: rows of the embedding matrix read at once when gathering the calibration tokens' embeddings
EMBED_ROWS = 8192


class LayerLedger:
    """How many decoder layers are materialised right now in this process, and the most there ever were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}
        self._next = 0
        self.peak = 0
        self.loads = 0

    def acquire(self, index: int) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            self._live[token] = index
            self.loads += 1
            self.peak = max(self.peak, len(self._live))
            return token

    def release(self, token: int) -> None:
        with self._lock:
            self._live.pop(token, None)

    @property
    def live(self) -> list[int]:
        with self._lock:
            return sorted(self._live.values())

    def reset(self) -> None:
        with self._lock:
            self.peak = len(self._live)
            self.loads = 0


LEDGER = LayerLedger()
_SLOTS = threading.BoundedSemaphore(MAX_LIVE_LAYERS)


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: stores the keyword arguments it is called with."""

    def __init__(self, index: int, sink: list):
        super().__init__()
        self.index = index
        self._sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        self._sink[0][self.index] = kwargs
        return hidden_states


def _stop_hook(module, args, kwargs):
    raise _Stop


@torch.no_grad()
def _record_kwargs(causal_lm: PreTrainedModel, layout: FamilyLayout, hidden: torch.Tensor,
                   recorders: nn.ModuleList, sink: list) -> list[dict]:
    """Run the base model on ``hidden`` (inputs_embeds) with recorders as layers; their kwargs per layer."""
    base = causal_lm.get_submodule(layout.layers.rpartition(".")[0])
    sink[0] = [None] * len(recorders)
    handle = causal_lm.get_submodule(layout.final_norm).register_forward_pre_hook(_stop_hook, with_kwargs=True)
    try:
        base(inputs_embeds=hidden, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = sink[0]
    sink[0] = None
    return out


class LayeredModel(ResidualShape):
    """The interface every layer-by-layer algorithm uses (see the module docstring)."""

    adapter_cls: type[ModelAdapter]
    config: PretrainedConfig
    device: torch.device

    @property
    def layout(self) -> FamilyLayout:
        return self.adapter_cls.layout

    @property
    def tied(self) -> bool:
        """Whether the source's head is its embedding matrix (tied)."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def final_norm_weight(self) -> torch.Tensor:
        """The source's final norm weight as stored (not folded into the head), float32."""
        raise NotImplementedError

    def final_norm_bias(self) -> torch.Tensor | None:
        """The source's final norm bias as stored (LayerNorm families), float32, else None."""
        raise NotImplementedError

    def head_bias(self) -> torch.Tensor | None:
        """The fused head's bias (the final LayerNorm's bias through the head), float32, else None."""
        raise NotImplementedError

    @property
    def position_count(self) -> int:
        """Rows of the learned position table (0 without one)."""
        raise NotImplementedError

    def position_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the (fused: mean-free) learned position table, float32."""
        raise NotImplementedError

    def _with_positions(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (batch x length x D embeddings) plus the learned positions 0..length-1, where the family has
        them (no padding, no cache: what calibration feeds)."""
        if self.layout.position_embeddings is None:
            return hidden
        offset, length = self.layout.position_offset, hidden.shape[-2]
        rows = self.position_rows(offset, offset + length).to(device=hidden.device, dtype=hidden.dtype)
        return hidden + rows

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def model_class(self) -> type[PreTrainedModel]:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the source's weights at rest (what an export keeps by default)."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input (float32, on ``device``) for a batch of token ids: the embedding rows times the
        family's embedding scale, plus its learned positions."""
        raise NotImplementedError

    def layer_kwargs(self, hidden: torch.Tensor) -> list[dict[str, Any]]:
        """The keyword arguments of every decoder layer for one batch of hidden states."""
        raise NotImplementedError

    def layer(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        """``with model.layer(i) as layer:`` — decoder layer ``i``, fused, float32, on ``device``."""
        raise NotImplementedError

    def embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the (fused) embedding matrix, float32."""
        raise NotImplementedError

    def head_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the fused head (final norm folded in, untied), float32."""
        raise NotImplementedError

    def raw_embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the embedding matrix as the source stores it (not made mean-free: what a tied head
        that keeps its final norm reads), float32."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        """Parameters of the source model (tied weights once)."""
        raise NotImplementedError


class ResidentModel(LayeredModel):
    """A model in memory, fused in place (its function is unchanged)."""

    def __init__(self, model: PreTrainedModel):
        self.adapter = get_adapter(model)
        self.adapter_cls = type(self.adapter)
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self._parameters = count_parameters(model)
        self._dtype = next(model.parameters()).dtype
        self._tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        final_norm = model.get_submodule(self.layout.final_norm)
        self._final_norm = final_norm.weight.detach().to(torch.float32).clone()
        bias = getattr(final_norm, "bias", None)
        self._final_norm_bias = None if bias is None else bias.detach().to(torch.float32).clone()
        embeddings = self.adapter.embeddings().weight  # fusion makes a LayerNorm family's rows mean-free
        self._embedding_means = (embeddings.detach().to(torch.float64).mean(dim=-1)
                                 if self.layout.layernorm else None)
        fuse_norms(self.adapter)
        self._sink: list = [None]

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def model_class(self) -> type[PreTrainedModel]:
        return type(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the module applies the family's embedding scale itself
            return self._with_positions(self.adapter.embeddings()(ids.to(self.device)))

    def layer_kwargs(self, hidden: torch.Tensor) -> list[dict[str, Any]]:
        layers = self.adapter.layers()
        recorders = nn.ModuleList([_Recorder(i, self._sink) for i in range(len(layers))])
        set_submodule(self.model, self.layout.layers, recorders)
        try:
            return _record_kwargs(self.model, self.layout, hidden, recorders, self._sink)
        finally:
            set_submodule(self.model, self.layout.layers, layers)

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        yield self.adapter.layers()[index]

    def embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.adapter.embeddings().weight[start:stop]

    def head_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.adapter.lm_head().weight[start:stop]

    def raw_embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        rows = self.embedding_rows(start, stop)
        if self._embedding_means is None:
            return rows
        means = self._embedding_means[start:stop].to(rows.device)
        return (rows.to(torch.float64) + means[:, None]).to(rows.dtype)

    @property
    def tied(self) -> bool:
        return self._tied

    def final_norm_weight(self) -> torch.Tensor:
        return self._final_norm

    def final_norm_bias(self) -> torch.Tensor | None:
        return self._final_norm_bias

    def head_bias(self) -> torch.Tensor | None:
        bias = self.adapter.lm_head().bias
        return None if bias is None else bias.detach()

    @property
    def position_count(self) -> int:
        table = self.adapter.position_embeddings()
        return 0 if table is None else int(table.weight.shape[0])

    def position_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.adapter.position_embeddings().weight[start:stop]

    def parameter_count(self) -> int:
        return self._parameters


class StreamedModel(LayeredModel):
    """A checkpoint read layer by layer (see the module docstring); nothing but the skeleton stays resident."""

    def __init__(self, reader: TensorReader, config: PretrainedConfig, *, device: str | torch.device = "cpu",
                 attn_implementation: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.reader = reader
        self.config = config
        self.adapter_cls = adapter_class_for_config(config)
        self.device = torch.device(device)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config, **kwargs)
        self._model_class = type(skeleton)
        self.attn_implementation = skeleton.config._attn_implementation
        self._templates = skeleton.get_submodule(self.layout.layers)
        self._sink: list = [None]
        self._kwargs_lock = threading.Lock()
        set_submodule(skeleton, self.layout.layers,
                      nn.ModuleList([_Recorder(i, self._sink) for i in range(len(self._templates))]))
        if self.layout.rotary:
            skeleton.get_submodule(self.layout.rotary).to(self.device)
        if self.layout.position_embeddings:  # the skeleton's forward adds them (what it computes is not used)
            table = skeleton.get_submodule(self.layout.position_embeddings).to_empty(device=self.device)
            torch.nn.init.zeros_(table.weight)
        self._skeleton = skeleton
        self._embedding = self.layout.weight(self.layout.embeddings)
        head = self.layout.weight(self.layout.lm_head)
        self._head = head if head in reader else self._embedding  # a tied head is not stored
        self._final_norm = self.layout.weight(self.layout.final_norm)
        self._final_bias = self.layout.bias(self.layout.final_norm)
        self._positions = (self.layout.weight(self.layout.position_embeddings) if self.layout.position_embeddings
                           else None)
        self._final_scale: torch.Tensor | None = None
        self._head_bias: torch.Tensor | None = None
        self._multiplier = self.layout.embedding_multiplier(config)

    # --- structure ------------------------------------------------------------------------------------------
    @property
    def model_class(self) -> type[PreTrainedModel]:
        return self._model_class

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.reader, [n for n in self.reader.names()
                                           if self.layout.layer_index(n) is not None])

    def layer_names(self, index: int) -> list[str]:
        prefix = self.layout.layer_prefix(index)
        return [n for n in self.reader.names() if n.startswith(prefix)]

    def parameter_count(self) -> int:
        return sum(info.numel for info in self.reader.infos().values())

    # --- calibration ----------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``ids``, gathered a block of the matrix at a time (never the whole matrix: embed all
        batches in one call, each block is read once)."""
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), self.hidden_size, dtype=torch.float32)
        for start in range(0, self.vocab_size, EMBED_ROWS):
            stop = min(start + EMBED_ROWS, self.vocab_size)
            wanted = (flat >= start) & (flat < stop)
            if bool(wanted.any()):
                out[wanted] = self.embedding_rows(start, stop).cpu()[flat[wanted] - start]
        if self._multiplier != 1.0:
            out = out * self._multiplier
        return self._with_positions(out.reshape(*ids.shape, -1).to(self.device))

    def layer_kwargs(self, hidden: torch.Tensor) -> list[dict[str, Any]]:
        with self._kwargs_lock:
            return _record_kwargs(self._skeleton, self.layout, hidden, self._skeleton.get_submodule(self.layout.layers),
                                  self._sink)

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        with _SLOTS:
            token = LEDGER.acquire(index)
            module = None
            try:
                module = self._materialise(index)
                yield module
            finally:
                if module is not None:
                    module.to("meta")  # frees the weights even if a caller still holds the module
                del module
                LEDGER.release(token)

    @torch.no_grad()
    def _materialise(self, index: int) -> nn.Module:
        prefix = self.layout.layer_prefix(index)
        tensors = self.reader.read(self.layer_names(index))
        state = {name[len(prefix):]: t.to(device=self.device, dtype=torch.float32) for name, t in tensors.items()}
        del tensors
        module = copy.deepcopy(self._templates[index])
        module.load_state_dict(state, strict=True, assign=True)
        module.to(self.device)  # buffers (kept real in the skeleton) follow the weights
        fuse_layer(self.layout, module, self.hidden_size, self.rms_norm_eps)
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module.eval()

    # --- the ends -------------------------------------------------------------------------------------------
    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        read_rows = getattr(self.reader, "read_rows", None)
        if read_rows is not None:
            return read_rows(name, start, stop)
        return self.reader.read([name])[name][start:stop]

    def _fused_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a table of residual-stream vectors (float32): made mean-free for a LayerNorm family."""
        rows = self._rows(name, start, stop).to(device=self.device, dtype=torch.float32)
        return centre_rows(rows) if self.layout.layernorm else rows

    def embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        return self._fused_rows(self._embedding, start, stop)

    def raw_embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        return self._rows(self._embedding, start, stop).to(device=self.device, dtype=torch.float32)

    @property
    def position_count(self) -> int:
        return 0 if self._positions is None else int(self.reader.infos()[self._positions].shape[0])

    def position_rows(self, start: int, stop: int) -> torch.Tensor:
        return self._fused_rows(self._positions, start, stop)

    def head_rows(self, start: int, stop: int) -> torch.Tensor:
        if self._final_scale is None:
            weight = self.reader.read([self._final_norm])[self._final_norm].to(torch.float64)
            self._final_scale = weight + self.layout.norm_offset
        rows = self._rows(self._head, start, stop).to(device=self.device, dtype=torch.float64)
        return (rows * self._final_scale.to(self.device)[None, :]).to(torch.float32)

    def final_norm_bias(self) -> torch.Tensor | None:
        if self._final_bias not in self.reader:
            return None
        return self.reader.read([self._final_bias])[self._final_bias].to(device=self.device, dtype=torch.float32)

    def head_bias(self) -> torch.Tensor | None:
        """The final norm's bias through the unscaled head (and the head's own bias), a block of rows at a time."""
        bias = self.final_norm_bias()
        head = self.layout.bias(self.layout.lm_head)
        if bias is None and head not in self.reader:
            return None
        if self._head_bias is None:
            out = torch.zeros(self.vocab_size, dtype=torch.float64, device=self.device)
            if bias is not None:
                for start in range(0, self.vocab_size, EMBED_ROWS):
                    stop = min(start + EMBED_ROWS, self.vocab_size)
                    rows = self._rows(self._head, start, stop).to(device=self.device, dtype=torch.float64)
                    out[start:stop] = fused_head_bias(rows, bias.to(torch.float64))
            if head in self.reader:
                out += self.reader.read([head])[head].to(device=self.device, dtype=torch.float64)
            self._head_bias = out.to(torch.float32)
        return self._head_bias

    @property
    def tied(self) -> bool:
        return self._head == self._embedding

    def final_norm_weight(self) -> torch.Tensor:
        return self.reader.read([self._final_norm])[self._final_norm].to(device=self.device, dtype=torch.float32)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


__all__ = ["LayeredModel", "ResidentModel", "StreamedModel", "LayerLedger", "LEDGER", "MAX_LIVE_LAYERS"]
