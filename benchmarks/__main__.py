"""``python -m benchmarks <part> ...``: suite | quality | solver | compression | speed (see benchmarks/README.md).

Each part is imported only when asked for, so ``python -m benchmarks solver`` needs nothing but torch (and
optionally POT) and runs from a bare checkout.
"""

from __future__ import annotations

import importlib
import sys

PARTS = {
    "suite": "the whole suite at a preset size (tiny | reduced | full), JSON + Markdown summary",
    "quality": "WikiText-2 perplexity of every method, setting and ratio, DOT ablations, chosen defaults",
    "solver": "Sinkhorn + QR alone: our torch solver vs POT sinkhorn_log (numpy, torch), CPU and CUDA",
    "compression": "wall time and peak RSS of a compression: in-memory vs orchestrated, parallel vs sequential",
    "speed": "tokens/s and per-token latency of the original vs the compressed models",
    "resume_check": "kill -9 and resume of a real pipeline run (the pipeline's crash-safety check)",
    "large": "memory and time of the layer-streamed pipeline on synthetic 8B / 70B-shaped checkpoints",
    "synthetic": "write a seeded random-weight checkpoint with real shapes (llama-8b, llama-70b)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in PARTS:
        width = max(map(len, PARTS))
        print("usage: python -m benchmarks {" + ",".join(PARTS) + "} [options]\n")
        for name, text in PARTS.items():
            print(f"  {name:<{width}}  {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown part {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
