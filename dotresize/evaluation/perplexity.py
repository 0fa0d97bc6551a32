"""Perplexity over non-overlapping windows (SliceGPT's protocol, with a configurable context)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def windows_of(token_ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token tensor into consecutive non-overlapping rows of ``ctx`` tokens (the tail is dropped)."""
    count = token_ids.numel() // ctx
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {ctx}")
    return token_ids[: count * ctx].view(count, ctx)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Mean next-token negative log-likelihood of every window (float64), one value per row."""
    device = next(model.parameters()).device
    values = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch",
                      disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="none").view(batch.shape[0], -1)
        values.append(loss.mean(dim=1).double().cpu())
    return torch.cat(values)


def perplexity(model, token_ids: torch.Tensor, *, ctx: int = 256, max_windows: int | None = 100,
               batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean over windows of the per-window mean NLL), with the protocol recorded beside the value."""
    windows = windows_of(token_ids, ctx, max_windows)
    start = time.perf_counter()
    nll = window_nll(model, windows, batch_size=batch_size, progress=progress)
    mean_nll = float(nll.mean())
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "ctx": ctx, "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()), "seconds": round(time.perf_counter() - start, 3)}


def wikitext2_perplexity(model, tokenizer, *, ctx: int = 256, max_windows: int | None = 100, batch_size: int = 4,
                         progress: bool = True, text=None) -> dict:
    """The project's perplexity: WikiText-2's test text tokenised with ``tokenizer``, :func:`perplexity` over its
    windows, and the text's record (``dataset``: name, path, sha256) beside the value. Every perplexity the CLI,
    the pipeline's evaluate stage and ``dotresize evaluate`` report comes from here. ``text``: the test text as
    the caller already loaded it (a :class:`dotresize.data.TextSource`), else it is loaded."""
    from ..data import load_text, tokenize

    text = text or load_text("wikitext2-test")
    result = perplexity(model, tokenize(tokenizer, text.text), ctx=ctx, max_windows=max_windows or None,
                        batch_size=batch_size, progress=progress)
    return {**result, "dataset": text.meta()}
