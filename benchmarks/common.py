"""Shared helpers of the benchmarks: the machine they ran on, medians and ratios, process-tree RSS, output files.

Every benchmark returns a plain dict (JSON-serialisable) with a ``markdown`` rendering; nothing here imports
the method code, so the solver benchmark runs with torch + numpy alone (e.g. on a borrowed GPU machine).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

SHARED_MACHINE_NOTE = ("timings were taken on a shared machine (other jobs ran at the same time): compare the "
                       "ratios measured within one run, not absolute seconds across runs")


def quiet_libraries() -> None:
    """No per-tensor progress bars or info logs from transformers / huggingface_hub in benchmark output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - the solver benchmark runs without transformers
        pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """The machine a measurement ran on (CPU, cores, memory, torch/POT versions, CUDA device, load)."""
    info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "loadavg_1min": loadavg(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:  # pragma: no cover
        pass
    try:
        import ot

        info["pot"] = ot.__version__
    except ImportError:
        info["pot"] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    parts = [f"{info.get('cpu')}", f"{info.get('cores')} cores"]
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB RAM")
    if info.get("torch"):
        parts.append(f"torch {info['torch']} ({info.get('torch_threads')} threads)")
    if info.get("pot"):
        parts.append(f"POT {info['pot']}")
    parts.append(f"CUDA: {info['cuda']}" if info.get("cuda") else "no CUDA")
    parts.append(f"Python {info.get('python')}")
    if info.get("omp_wait_policy"):
        parts.append(f"OMP_WAIT_POLICY={info['omp_wait_policy']}")
    if info.get("loadavg_1min") is not None:
        parts.append(f"1-min load average {info['loadavg_1min']} at start")
    return ", ".join(parts)


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: Any, spec: str = ".3g", missing: str = "–") -> str:
    if value is None:
        return missing
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def emit_result(result: dict[str, Any], json_path: str | os.PathLike | None,
                markdown_path: str | os.PathLike | None) -> None:
    """A benchmark's command-line ending: its Markdown table on stdout, then the ``--json`` and ``--markdown``
    files when asked for."""
    print(result["markdown"])
    if json_path:
        write_json(json_path, result)
        log(f"wrote {json_path}")
    if markdown_path:
        Path(markdown_path).write_text(result["markdown"] + "\n")


# --- peak RSS of a process tree ----------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tids = [t.name for t in task_dir.iterdir()]
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(int(c) for c in (task_dir / tid / "children").read_text().split())
        except OSError:
            continue
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (sum of RSS; shared pages counted in each process)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _rss_bytes(current)
        stack.extend(_children(current))
    return total


class TreeRssMonitor:
    """Polls the RSS of a process tree in a background thread and keeps the peak (bytes)."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeRssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
