"""The pipeline's own results report: one metrics table per split over all stages (like the
paper's Table 6), recall@k curves, and the cost of each stage.

Writes into ``out_dir`` (every file atomically):

* ``metrics.csv``: long format, header ``system,split,metric,value`` (metric names as
  ir-measures prints them, plus ``Answer@k`` for DPR answer hit rates). Only computed values;
  the paper's reference figures appear in the tables, not in this file.
* ``report.md``: per split a table, rows = systems in pipeline order (then unknown systems
  alphabetically, then a ``paper`` reference row), columns = metrics; recall plots; costs.
* ``report.html``: the same, self-contained (inline CSS, plots as base64 PNG data URIs).
* ``recall_{split}.png``: TREC recall at log-spaced cutoffs per system (matplotlib Agg).

Snakemake's own ``snakemake --report`` is complementary (provenance, rule graph); this one is the
results table.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simlm_core.io import InputError, atomic_path, write_text
from simlm_core import metrics as M

log = logging.getLogger(__name__)

#: Stage systems in pipeline order (DESIGN §3); report rows follow it.
SYSTEM_ORDER = ("bm25", "retriever1_nopretrain", "retriever1", "retriever2", "reranker", "retriever_distill")
REFERENCE_ROW = "paper"
#: Marks a figure whose cutoff is deeper than the system's run (see :meth:`_Tables.shallow`).
SHALLOW_MARK = "†"
CSV_HEADER = ("system", "split", "metric", "value")

_BENCH_NUMERIC = ("s", "max_rss", "max_vms", "max_uss", "max_pss", "io_in", "io_out", "mean_load", "cpu_time")


# ---------------------------------------------------------------------------------------------
# Snakemake benchmark files
def _num(value: str) -> float | None:
    value = value.strip()
    if value in ("", "NA", "-", "nan", "NaN"):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def read_snakemake_benchmark(path) -> dict[str, Any]:
    """Parse a Snakemake ``benchmark:`` TSV file.

    Columns ``s h:m:s max_rss max_vms max_uss max_pss io_in io_out mean_load cpu_time`` (memory
    and I/O in MB, times in seconds; ``NA`` when the job ended before the first sample; extended
    format columns are accepted and ignored). With ``repeat(...)`` there is one row per repeat:
    times and load are averaged, memory is the maximum. Returns ``wall_s``, ``cpu_s``,
    ``max_rss_mb``, ``max_vms_mb``, ``max_uss_mb``, ``max_pss_mb``, ``io_in_mb``, ``io_out_mb``,
    ``mean_load`` (each None when not measured) and ``repeats``.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    if not lines:
        raise InputError(path, "empty benchmark file")
    header = lines[0].split("\t")
    if "s" not in header or "cpu_time" not in header:
        raise InputError(path, f"not a Snakemake benchmark header: {header}", 1)
    rows = []
    for n, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        if len(fields) < len(header):
            raise InputError(path, f"expected {len(header)} tab-separated fields, got {len(fields)}", n)
        rows.append({h: _num(fields[i]) for i, h in enumerate(header) if h in _BENCH_NUMERIC})
    if not rows:
        raise InputError(path, "benchmark file has a header but no rows")

    def agg(col: str, how) -> float | None:
        vals = [r[col] for r in rows if r.get(col) is not None]
        return how(vals) if vals else None

    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {
        "wall_s": agg("s", mean),
        "cpu_s": agg("cpu_time", mean),
        "max_rss_mb": agg("max_rss", max),
        "max_vms_mb": agg("max_vms", max),
        "max_uss_mb": agg("max_uss", max),
        "max_pss_mb": agg("max_pss", max),
        "io_in_mb": agg("io_in", mean),
        "io_out_mb": agg("io_out", mean),
        "mean_load": agg("mean_load", mean),
        "repeats": len(rows),
    }


# ---------------------------------------------------------------------------------------------
def system_sort_key(system: str) -> tuple[int, str]:
    """Pipeline order for known systems, then the others alphabetically."""
    if system in SYSTEM_ORDER:
        return (SYSTEM_ORDER.index(system), "")
    return (len(SYSTEM_ORDER), system)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _safe_name(split: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split)


def _normalise_reference(split: str, metric: str, value: Any) -> float | None:
    """Paper figures may be given as percentages (41.1); every metric here is a rate in [0, 1].
    None (YAML ``null``) leaves the figure out; anything else that is not a number is an error."""
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"report reference {split}.{metric}: {value!r} is not a number")
    value = float(value)
    return value / 100.0 if value > 1.0 else value


class _Tables:
    """The split -> system -> metric -> value structure behind every output."""

    def __init__(self, entries: Sequence[Mapping[str, Any]], reference: Mapping[str, Mapping[str, Any]] | None):
        self.splits: list[str] = []
        self.values: dict[str, dict[str, dict[str, float]]] = {}
        self.columns: dict[str, list[str]] = {}
        self.depths: dict[str, dict[str, int]] = {}  # split -> system -> run depth, where given
        for i, entry in enumerate(entries):
            try:
                system, split, mets = str(entry["system"]), str(entry["split"]), entry["metrics"]
            except (KeyError, TypeError) as exc:
                raise ValueError(f"report entry {i} needs keys system, split, metrics: {entry!r}") from exc
            if system == REFERENCE_ROW:
                raise ValueError(f"system name {REFERENCE_ROW!r} is reserved for the reference row")
            if split not in self.values:
                self.splits.append(split)
                self.values[split] = {}
                self.columns[split] = []
            if system in self.values[split]:
                raise ValueError(f"two report entries for system {system!r} on split {split!r}")
            # Non-numeric values (e.g. evaluate_split's num_queries dict) are not metrics.
            row = {str(k): float(v) for k, v in mets.items() if _is_number(v)}
            self.values[split][system] = row
            if _is_number(entry.get("run_depth")):
                self.depths.setdefault(split, {})[system] = int(entry["run_depth"])
            for k in row:
                if k not in self.columns[split]:
                    self.columns[split].append(k)
        self.reference: dict[str, dict[str, float]] = {}
        for split, mets in (reference or {}).items():
            if split not in self.values:
                continue  # no system evaluated on it: nothing to compare with
            ref = {str(k): r for k, v in (mets or {}).items()
                   if (r := _normalise_reference(split, str(k), v)) is not None}
            if ref:
                self.reference[split] = ref
                for k in ref:
                    if k not in self.columns[split]:
                        self.columns[split].append(k)

    def systems(self, split: str) -> list[str]:
        return sorted(self.values[split], key=system_sort_key)

    def rows(self, split: str) -> list[tuple[str, list[float | None]]]:
        cols = self.columns[split]
        out = [(s, [self.values[split][s].get(c) for c in cols]) for s in self.systems(split)]
        if split in self.reference:
            out.append((REFERENCE_ROW, [self.reference[split].get(c) for c in cols]))
        return out

    def shallow(self, split: str, system: str, metric: str) -> bool:
        """Whether ``metric``'s cutoff is deeper than ``system``'s run on ``split`` (e.g. R@1000 of a
        re-ranker that re-ranked the top 200): the figure then counts only the run's passages."""
        depth, k = self.depths.get(split, {}).get(system), M.metric_cutoff(metric)
        return depth is not None and k is not None and k > depth

    def formatted_rows(self, split: str) -> list[list[str]]:
        """:meth:`rows` as table cells, ``SHALLOW_MARK`` after each figure :meth:`shallow` flags."""
        return [[system] + [_fmt(v) + (SHALLOW_MARK if v is not None and self.shallow(split, system, c) else "")
                            for c, v in zip(self.columns[split], vals)]
                for system, vals in self.rows(split)]

    def shallow_note(self, split: str) -> str | None:
        """The footnote for :meth:`formatted_rows`' marks on ``split`` (None where there are none)."""
        flagged = {s: self.depths[split][s] for s in self.systems(split)
                   if any(self.shallow(split, s, c) for c in self.values[split][s])}
        if not flagged:
            return None
        runs = ", ".join(f"{s} holds at most {d} passages per query" for s, d in flagged.items())
        return (f"{SHALLOW_MARK} cutoff deeper than the system's run ({runs}): the figure counts only "
                "those passages (for a re-ranker, its first stage's recall at the re-ranking depth).")

    def long_rows(self) -> list[tuple[str, str, str, float]]:
        out = []
        for split in self.splits:
            for system in self.systems(split):
                for metric in self.columns[split]:
                    if metric in self.values[split][system]:
                        out.append((system, split, metric, self.values[split][system][metric]))
        return out


# ---------------------------------------------------------------------------------------------
# Recall curves
def _curve_rel(item: Mapping[str, Any]) -> int:
    if item.get("rel") is not None:
        return int(item["rel"])
    return 2 if M.is_trec_dl_split(str(item["split"])) else 1


def compute_recall_curves(items: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """split -> system -> {k: R@k} for items {system, split, run_path, qrels_path[, rel]}.

    Cutoffs: :func:`simlm_core.metrics.recall_grid` up to the run's depth; TREC recall via
    ir-measures with relevance >= ``rel`` (default 2 for TREC DL splits, else 1).
    """
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for item in items:
        qrels_path, run_path = item.get("qrels_path"), item.get("run_path")
        if not qrels_path or not Path(qrels_path).exists() or not run_path or not Path(run_path).exists():
            log.warning("recall curve of %s on %s skipped: run or qrels missing", item.get("system"), item.get("split"))
            continue
        qrels = M.load_qrels(qrels_path)
        if qrels.empty:  # e.g. NQ, judged by answers only
            log.warning("recall curve of %s on %s skipped: no qrels", item.get("system"), item.get("split"))
            continue
        curve = M.recall_curve(M.load_run(run_path), qrels, rel=_curve_rel(item))
        if curve:
            curves.setdefault(str(item["split"]), {})[str(item["system"])] = curve
    return curves


def _plot_png(split: str, curves: Mapping[str, Mapping[int, float]], rel: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for system in sorted(curves, key=system_sort_key):
        pts = sorted(curves[system].items())
        if pts:
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", markersize=3, label=system)
    ax.set_xscale("log")
    ks = sorted({k for c in curves.values() for k in c})
    if ks:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("cutoff k")
    ax.set_ylabel("TREC recall" + (f" (relevance >= {rel})" if rel != 1 else ""))
    ax.set_title(f"Recall@k, split {split}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Rendering
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], ref_last: bool = False) -> str:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for i, r in enumerate(rows):
        cls = ' class="reference"' if ref_last and i == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _cost_rows(costs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = [[str(c.get("rule", "?")), _fmt(c.get("wall_s"), 1), _fmt(c.get("cpu_s"), 1), _fmt(c.get("max_rss_mb"), 0)]
            for c in costs]

    def measured(key: str) -> list[float]:
        return [float(c[key]) for c in costs if _is_number(c.get(key))]

    # totals over the measured stages; none measured: "–", not 0
    wall, cpu, rss = measured("wall_s"), measured("cpu_s"), measured("max_rss_mb")
    rows.append(["total", _fmt(sum(wall) if wall else None, 1), _fmt(sum(cpu) if cpu else None, 1),
                 _fmt(max(rss) if rss else None, 0)])
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:60em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #bbb;padding:0.25em 0.7em}
th{background:#f0f0f0} td{text-align:right;font-variant-numeric:tabular-nums}
td:first-child{text-align:left} tr.reference td{font-style:italic;background:#fafafa}
img{max-width:100%} .note{color:#555;font-size:0.9em}
"""


def build_report(
    entries: list[dict],
    out_dir,
    title: str,
    reference: dict | None = None,
    recall_curves: list[dict] | None = None,
    costs: list[dict] | None = None,
) -> dict[str, Path | list[Path]]:
    """Write ``metrics.csv``, ``report.md``, ``report.html`` and ``recall_{split}.png`` to ``out_dir``.

    ``entries``: ``{system, split, metrics[, run_depth]}`` (non-numeric metric values such as
    ``num_queries`` are skipped; a figure whose cutoff exceeds ``run_depth`` is marked ``†``). ``reference``: ``{split: {metric: value}}`` shown as a
    ``paper`` row (values above 1 are read as percentages and divided by 100).
    ``recall_curves``: ``{system, split, run_path, qrels_path[, rel]}``. ``costs``:
    ``{rule, wall_s, cpu_s, max_rss_mb}`` (see :func:`read_snakemake_benchmark`), in the
    order given. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = _Tables(entries, reference)
    written: dict[str, Path | list[Path]] = {}

    # metrics.csv
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for system, split, metric, value in tables.long_rows():
        w.writerow([system, split, metric, repr(value)])
    write_text(buf.getvalue(), out / "metrics.csv")
    written["metrics_csv"] = out / "metrics.csv"

    # plots
    curves = compute_recall_curves(recall_curves or [])
    rels = {str(i["split"]): _curve_rel(i) for i in (recall_curves or [])}
    pngs: dict[str, tuple[str, bytes]] = {}
    for split, per_system in curves.items():
        data = _plot_png(split, per_system, rels.get(split, 1))
        name = f"recall_{_safe_name(split)}.png"
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
        pngs[split] = (name, data)
    written["plots"] = [out / name for name, _ in pngs.values()]

    all_metrics = [c for s in tables.splits for c in tables.columns[s]]
    metric_names = list(dict.fromkeys(all_metrics))

    # report.md
    md = [f"# {title}", ""]
    if not tables.splits:
        md += ["No evaluated systems.", ""]
    for split in tables.splits:
        header = ["system"] + tables.columns[split]
        md += [f"## Split `{split}`", "", _md_table(header, tables.formatted_rows(split)), ""]
        if note := tables.shallow_note(split):
            md += [note, ""]
        if split in pngs:
            md += [f"![Recall@k on {split}]({pngs[split][0]})", ""]
    extra_plots = [s for s in pngs if s not in tables.values]
    for split in extra_plots:
        md += [f"## Split `{split}` (recall only)", "", f"![Recall@k on {split}]({pngs[split][0]})", ""]
    if any(split in tables.reference for split in tables.splits):
        md += [f"Row `{REFERENCE_ROW}`: the published figures given in the configuration.", ""]
    if metric_names:
        md += ["## Metric definitions", ""]
        md += [f"- `{m}`: {M.describe_metric(m)}" for m in metric_names]
        md += [""]
    cost_header = ["rule", "wall (s)", "CPU (s)", "max RSS (MB)"]
    if costs:
        md += ["## Cost per stage", "", _md_table(cost_header, _cost_rows(costs)), ""]
    write_text("\n".join(md), out / "report.md")
    written["report_md"] = out / "report.md"

    # report.html (self-contained)
    h = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if not tables.splits:
        h.append("<p>No evaluated systems.</p>")

    def img(split: str) -> str:
        b64 = base64.b64encode(pngs[split][1]).decode("ascii")
        return f'<p><img alt="Recall@k on {html.escape(split)}" src="data:image/png;base64,{b64}"></p>'

    for split in tables.splits:
        header = ["system"] + tables.columns[split]
        h += [f"<h2>Split <code>{html.escape(split)}</code></h2>",
              _html_table(header, tables.formatted_rows(split), ref_last=split in tables.reference)]
        if note := tables.shallow_note(split):
            h.append(f'<p class="note">{html.escape(note)}</p>')
        if split in pngs:
            h.append(img(split))
    for split in extra_plots:
        h += [f"<h2>Split <code>{html.escape(split)}</code> (recall only)</h2>", img(split)]
    if any(split in tables.reference for split in tables.splits):
        h.append(f'<p class="note">Row <code>{REFERENCE_ROW}</code>: the published figures given in the configuration.</p>')
    if metric_names:
        h += ["<h2>Metric definitions</h2>", "<ul>"]
        h += [f"<li><code>{html.escape(m)}</code>: {html.escape(M.describe_metric(m))}</li>" for m in metric_names]
        h.append("</ul>")
    if costs:
        h += ["<h2>Cost per stage</h2>", _html_table(cost_header, _cost_rows(costs))]
    h.append("</body></html>\n")
    write_text("\n".join(h), out / "report.html")
    written["report_html"] = out / "report.html"
    return written
