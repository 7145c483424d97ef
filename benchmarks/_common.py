"""Helpers shared by the benchmark scripts: machine description, tables, result files.

Deliberately light: it imports only the standard library (torch is used only if the caller has
already imported it), so every benchmark can use it on any machine.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SCRATCH_DIR = BENCH_DIR / "_scratch"

if str(REPO_ROOT) not in sys.path:  # run from anywhere without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "pyarrow", "pandas", "faiss"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "?"))
    return out


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, memory, GPU name, library versions."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": total_memory_gib(),
        "platform": platform.platform(),
        "loadavg_1_5_15": loadavg(),
        "versions": _versions(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu_name']} ({info.get('gpu_memory_gib')} GiB)" if info.get("gpu_name") else ""
    return (f"{info['cpu_model']}, {info['cpu_count']} cores, {info['memory_gib']} GiB RAM{gpu}; "
            f"load avg {info['loadavg_1_5_15']}")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def write_results(name: str, device: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``benchmarks/results/{name}-{device}.json`` (or ``path``) atomically; return its path."""
    path = Path(path) if path else RESULTS_DIR / f"{name}-{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def fmt(value: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (3 significant digits, thousands separators)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 10 ** digits:
            return f"{value:,.0f}"
        if a >= 1:
            return f"{value:.{max(0, digits - len(str(int(a))))}f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(parts: Sequence[str]) -> str:
        return "| " + " | ".join(p.rjust(w) if i else p.ljust(w) for i, (p, w) in enumerate(zip(parts, widths))) + " |"

    out = []
    if title:
        out.append(f"\n{title}")
    out.append(line(headers))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.extend(line(r) for r in cells)
    return "\n".join(out)


GIB = 2**30
MIB = 2**20
