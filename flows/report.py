"""Sweep reports: a Markdown table and PNG plots (one line per method) from per-cell result dicts."""

from __future__ import annotations

from pathlib import Path

METHOD_STYLES = {"dot": ("tab:blue", "o"), "pca": ("tab:green", "s"), "prune": ("tab:red", "^")}


def _acc(cell: dict, task: str) -> float | None:
    metrics = (cell.get("zero_shot") or {}).get("tasks", {}).get(task, {})
    return metrics.get("acc_norm", metrics.get("acc"))


def markdown_table(cells: list[dict], tasks: list[str]) -> str:
    head = ["method", "ratio", "width", "parameters", "ppl"] + [f"{t} acc" for t in tasks] + \
        ["tokens/s", "compress s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(cells, key=lambda c: (c["method"] != "dense", c["method"], c["ratio"])):
        accs = [_acc(c, t) for t in tasks]
        row = [c["method"], f"{c['ratio']:.2f}", str(c["width"]), f"{c['parameters']:,}", f"{c['ppl']:.2f}"] + \
            [f"{a:.4f}" if a is not None else "" for a in accs] + \
            [f"{c['tokens_per_second']:.0f}" if c.get("tokens_per_second") else "",
             f"{c.get('compress_seconds', 0):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(cells: list[dict], value, ylabel: str, path: Path, *, log_y: bool = False, title: str = "") -> Path:
    """One line per method of ``value(cell)`` against the compressed width; the dense model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    dense = [c for c in cells if c["method"] == "dense"]
    for method in sorted({c["method"] for c in cells} - {"dense"}):
        points = sorted((c["width"], value(c)) for c in cells if c["method"] == method and value(c) is not None)
        if not points:
            continue
        color, marker = METHOD_STYLES.get(method, (None, "x"))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=method)
    if dense and value(dense[0]) is not None:
        ax.axhline(value(dense[0]), color="gray", linestyle="--", label=f"dense (width {dense[0]['width']})")
    ax.set_xlabel("residual-stream width d")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or f"{ylabel} vs width")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(cells: list[dict], tasks: list[str], out: Path, header: str) -> list[Path]:
    """Write ``report.md`` and the plots into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_metric(cells, lambda c: c["ppl"], "WikiText-2 perplexity", out / "ppl_vs_width.png",
                         log_y=True)]
    if tasks:
        def mean_acc(c):
            values = [_acc(c, t) for t in tasks]
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None
        files.append(plot_metric(cells, mean_acc, f"mean accuracy ({', '.join(tasks)})",
                                 out / "accuracy_vs_width.png"))
    if any(c.get("tokens_per_second") for c in cells):
        files.append(plot_metric(cells, lambda c: c.get("tokens_per_second"), "forward tokens/s",
                                 out / "tokens_per_second_vs_width.png"))
    report = out / "report.md"
    report.write_text(f"{header}\n\n{markdown_table(cells, tasks)}\n" +
                      "".join(f"![{p.stem}]({p.name})\n" for p in files))
    return [report, *files]
