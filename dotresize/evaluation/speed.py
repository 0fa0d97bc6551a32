"""Measured speed: batched-forward throughput and per-token generation latency with a KV cache.

Medians of several timed repeats after a warm-up; CUDA is synchronised around every timing. Nothing is
inferred from the compression ratio (method.md decision 8).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _random_ids(model, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(_device(model))


@torch.no_grad()
def forward_throughput(model, *, batch: int = 8, ctx: int = 256, repeats: int = 5, warmup: int = 1,
                       seed: int = 0) -> dict:
    """Tokens per second of a full forward pass over ``batch`` x ``ctx`` tokens (median of ``repeats``)."""
    ids = _random_ids(model, batch, ctx, seed)
    device = _device(model)
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_second": batch * ctx / median, "seconds_median": median, "seconds_all": times,
            "batch": batch, "ctx": ctx}


@torch.no_grad()
def generation_latency(model, *, prompt: int = 64, new_tokens: int = 32, repeats: int = 3, warmup: int = 1,
                       seed: int = 0) -> dict:
    """Median per-token latency of greedy decoding with a KV cache (batch 1), prompt excluded."""
    from transformers import DynamicCache

    ids = _random_ids(model, 1, prompt, seed)
    device = _device(model)

    def decode() -> list[float]:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(new_tokens):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            steps.append(time.perf_counter() - start)
        return steps

    for _ in range(warmup):
        decode()
    per_run = [statistics.median(decode()) for _ in range(repeats)]
    return {"seconds_per_token": statistics.median(per_run), "runs": per_run, "prompt": prompt,
            "new_tokens": new_tokens}


def directory_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files of a model directory (safetensors / gguf)."""
    root = Path(path)
    files = [root] if root.is_file() else [p for p in root.iterdir() if p.suffix in (".safetensors", ".gguf")]
    return sum(p.stat().st_size for p in files)
