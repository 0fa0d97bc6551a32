"""Sweep reports: a Markdown table and PNG plots (one line per method) from per-cell result dicts.

A cell is ``{"method", "ratio", "width", "parameters", "ppl", "zero_shot" (evaluate_zero_shot's result or None),
"tokens_per_second", "ms_per_token", "compress_seconds"}``; the dense baseline has ``method == "dense"``.
"""

from __future__ import annotations

from pathlib import Path

METHOD_STYLES = {"dot": ("tab:blue", "o"), "pca": ("tab:green", "s"), "prune": ("tab:red", "^")}


def accuracy(cell: dict, task: str, metric: str = "acc") -> float | None:
    """``metric`` (acc, acc_norm) of ``task`` in a cell, or None when not evaluated / not defined."""
    metrics = (cell.get("zero_shot") or {}).get("tasks", {}).get(task, {})
    return metrics.get(metric)


def mean_accuracy(cell: dict, tasks: list[str]) -> float | None:
    """Mean of the tasks' ``acc`` (plain accuracy, comparable across tasks)."""
    values = [accuracy(cell, t) for t in tasks]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


#: SliceGPT's own code on SmolLM2-135M-Instruct with this project's perplexity protocol (WikiText-2 test, ctx 256,
#: 100 windows; 64 x 256 calibration), as measured for issue 16: (label, parameters / dense, ppl)
SLICEGPT_SMOLLM2 = (("SliceGPT 20 % (per-point shortcuts)", 1.096, 83.88), ("SliceGPT 30 %", 0.979, 122.27))


def _order(cells: list[dict]) -> list[dict]:
    return sorted(cells, key=lambda c: (c["method"] != "dense", c["method"], c["ratio"], c.get("mlp_ratio") or 0))


def series(cell: dict) -> str:
    """The line a cell belongs to: its residual method, ``mlp`` (MLPs only) or ``<method>+mlp<R>``."""
    mlp = cell.get("mlp_ratio") or 0.0
    return cell["method"] if not mlp or cell["method"] == "mlp" else f"{cell['method']}+mlp{mlp:g}"


def relative_size(cell: dict, dense: dict | None) -> float | None:
    base = (dense or {}).get("parameters") or cell.get("parameters_before")
    return cell["parameters"] / base if base else None


def pareto_front(cells: list[dict]) -> list[dict]:
    """The cells no other cell beats on both size and perplexity, smallest first."""
    ranked = sorted((c for c in cells if c["method"] != "dense"), key=lambda c: (c["parameters"], c["ppl"]))
    front, best = [], float("inf")
    for cell in ranked:
        if cell["ppl"] < best:
            front.append(cell)
            best = cell["ppl"]
    return front


def markdown_table(cells: list[dict], tasks: list[str]) -> str:
    """One row per cell: width, parameters, perplexity, per-task acc (/ acc_norm), mean acc, speed vs dense."""
    dense = next((c for c in cells if c["method"] == "dense"), None)
    with_norm = [t for t in tasks if any(accuracy(c, t, "acc_norm") is not None for c in cells)]
    mlp_axis = any(c.get("mlp_ratio") for c in cells)
    front = {id(c) for c in pareto_front(cells)} if mlp_axis else set()
    head = ["method", "ratio"] + (["MLP ratio", "m"] if mlp_axis else []) + ["width", "parameters"]
    head += (["× dense", "Pareto"] if mlp_axis else []) + ["ppl"]
    head += [f"{t} acc/acc_norm" if t in with_norm else f"{t} acc" for t in tasks]
    if tasks:
        head.append("mean acc")
    speed = any(c.get("tokens_per_second") for c in cells)
    if speed:
        head += ["tokens/s", "× dense", "ms/token"]
    head.append("compress s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in _order(cells):
        row = [c["method"], f"{c['ratio']:.2f}"]
        if mlp_axis:
            row += [f"{c.get('mlp_ratio') or 0:.2f}", str(c.get("mlp_width") or "")]
        row += [str(c["width"]), f"{c['parameters']:,}"]
        if mlp_axis:
            size = relative_size(c, dense)
            row += ["" if size is None else f"{size:.3f}", "★" if id(c) in front else ""]
        row.append(f"{c['ppl']:.2f}")
        for t in tasks:
            acc = accuracy(c, t)
            text = "" if acc is None else f"{acc:.4f}"
            if t in with_norm and accuracy(c, t, "acc_norm") is not None:
                text += f"/{accuracy(c, t, 'acc_norm'):.4f}"
            row.append(text)
        if tasks:
            mean = mean_accuracy(c, tasks)
            row.append("" if mean is None else f"{mean:.4f}")
        if speed:
            tps = c.get("tokens_per_second")
            base = dense.get("tokens_per_second") if dense else None
            row += [f"{tps:.0f}" if tps else "", f"{tps / base:.2f}" if tps and base else "",
                    f"{c['ms_per_token']:.2f}" if c.get("ms_per_token") else ""]
        row.append(f"{c.get('compress_seconds', 0):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _axes_plot(ax, cells: list[dict], value, ylabel: str, *, log_y: bool = False, title: str = "") -> bool:
    dense = [c for c in cells if c["method"] == "dense"]
    drawn = False
    for method in sorted({series(c) for c in cells} - {"dense"}):
        points = sorted((c["width"], value(c)) for c in cells if series(c) == method and value(c) is not None)
        if not points:
            continue
        color, marker = METHOD_STYLES.get(method, (None, "x"))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=method)
        drawn = True
    if dense and value(dense[0]) is not None:
        ax.axhline(value(dense[0]), color="gray", linestyle="--", label=f"dense (width {dense[0]['width']})")
        drawn = True
    ax.set_xlabel("residual-stream width d")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or f"{ylabel} vs width")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend()
    return drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(cells: list[dict], value, ylabel: str, path: Path, *, log_y: bool = False, title: str = "") -> Path:
    """One line per method of ``value(cell)`` against the compressed width; the dense model as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    _axes_plot(ax, cells, value, ylabel, log_y=log_y, title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pareto(cells: list[dict], path: Path, references=()) -> Path:
    """Perplexity against the real parameter count (× dense) of every cell, one marker per series, the Pareto
    front as a line and ``references`` ((label, × dense, ppl)) as stars."""
    plt = _pyplot()
    dense = next((c for c in cells if c["method"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for name in sorted({series(c) for c in cells} - {"dense"}):
        points = [(relative_size(c, dense), c["ppl"]) for c in cells if series(c) == name]
        color, marker = METHOD_STYLES.get(name, (None, "o"))
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=name)
    front = pareto_front(cells)
    ax.plot([relative_size(c, dense) for c in front], [c["ppl"] for c in front], color="black", linewidth=0.8,
            label="Pareto front")
    for label, size, ppl in references:
        ax.scatter([size], [ppl], marker="*", s=120, color="tab:purple")
        ax.annotate(label, (size, ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if dense is not None:
        ax.axhline(dense["ppl"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("parameters / dense")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title("perplexity vs size (every cell)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tasks(cells: list[dict], tasks: list[str], path: Path) -> Path:
    """One panel per task (its acc_norm where defined, else acc) against the width, one line per method."""
    import math

    plt = _pyplot()
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = "acc_norm" if any(accuracy(c, task, "acc_norm") is not None for c in cells) else "acc"
        _axes_plot(ax, cells, lambda c, t=task, m=metric: accuracy(c, t, m), metric, title=task)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(cells: list[dict], tasks: list[str], out: Path, header: str, references=()) -> list[Path]:
    """Write ``report.md`` and the plots into ``out``; returns the files written. With the MLP axis, also the
    perplexity-vs-size plot with its Pareto front and ``references`` ((label, × dense, ppl))."""
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_metric(cells, lambda c: c["ppl"], "WikiText-2 perplexity", out / "ppl_vs_width.png",
                         log_y=True)]
    if any(c.get("mlp_ratio") for c in cells):
        files.append(plot_pareto(cells, out / "ppl_vs_parameters.png", references))
    if tasks:
        files.append(plot_metric(cells, lambda c: mean_accuracy(c, tasks), "mean zero-shot accuracy",
                                 out / "accuracy_vs_width.png",
                                 title=f"mean accuracy ({', '.join(tasks)}) vs width"))
        if len(tasks) > 1:
            files.append(plot_tasks(cells, tasks, out / "accuracy_by_task_vs_width.png"))
    if any(c.get("tokens_per_second") for c in cells):
        files.append(plot_metric(cells, lambda c: c.get("tokens_per_second"), "forward tokens/s",
                                 out / "tokens_per_second_vs_width.png"))
    report = out / "report.md"
    report.write_text(f"{header}\n\n{markdown_table(cells, tasks)}\n" +
                      "".join(f"![{p.stem}]({p.name})\n" for p in files))
    return [report, *files]
