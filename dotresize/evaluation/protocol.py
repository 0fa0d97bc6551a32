"""The measurement protocol every comparison of compressions shares (the sweep, the benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeasurementProtocol:
    """What a measured perplexity depends on besides the method: the model (None: the default model), the
    calibration draw (``calib_samples`` sequences of ``calib_seqlen`` tokens, ``seed``) and the WikiText-2 test
    windows (the first ``max_windows`` of ``ctx`` tokens). The defaults are the project's full protocol."""

    model: str | None = None
    calib_samples: int = 64
    calib_seqlen: int = 256
    seed: int = 42
    ctx: int = 256
    max_windows: int = 100

    def perplexity(self, model, test_ids, *, batch_size: int = 4) -> dict:
        """``model``'s perplexity over this protocol's windows of ``test_ids`` (the WikiText-2 test text's token
        tensor), without a progress bar: one path for every benchmark row."""
        from .perplexity import perplexity  # (torch: only when measuring, not for the sweep's spec)

        return perplexity(model, test_ids, ctx=self.ctx, max_windows=self.max_windows, batch_size=batch_size,
                          progress=False)
