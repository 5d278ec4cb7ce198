#!/usr/bin/python3
"""kvscope report: plots and a report page from kvscope sweep/replay results.

    /usr/bin/python3 python/kvscope_report.py RESULTS.json --out DIR [--all-heatmaps]

RESULTS.json is the output of `kvscope sweep` ({"format": "kvscope-sweep", "version": 1,
"cells": [...]}) or of `kvscope replay --format json` ({"trace", "self_check", "runs"}).
DIR receives PNG figures, index.html (self-contained, relative image links) and report.md:

  budget_<trace>.png                mean rel-L2 vs budget (kept fraction of the prompt)
  steps_<trace>_b<tokens>.png       mean rel-L2 per decode step, one line per method
  heatmap_<trace>_<method>_b<tokens>.png
                                    mean rel-L2 per (layer, q head) of one cell; by default
                                    only each method's smallest budget (--all-heatmaps: all)

Names are sanitised (see safe_name); methods sorted by name, budgets by tokens.

`kvscope report` execs this script, so it owns every error: one line on stderr,
`kvscope: <kind>: <message>`, with the CLI's exit codes (README): 2 usage, 3 invalid
results file, 4 I/O, 70 internal. Needs python3-numpy and python3-matplotlib (Agg).
"""

import argparse
import hashlib
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

EXIT_USAGE, EXIT_INVALID, EXIT_IO, EXIT_INTERNAL = 2, 3, 4, 70

SWEEP_FORMAT = "kvscope-sweep"
SWEEP_VERSION = 1


class ReportError(Exception):
    """A user-facing failure: `kind` prefixes the message, `code` is the exit status."""

    def __init__(self, kind, code, message):
        super().__init__(message)
        self.kind, self.code = kind, code


def invalid(message):
    return ReportError("invalid results", EXIT_INVALID, message)


try:  # numpy is needed to validate the grids; matplotlib is imported only to draw
    import numpy as np
except ImportError:  # pragma: no cover - environment problem, reported like any other error
    np = None


# ---------------------------------------------------------------------------------------------
# Input: validation and normalisation into cells
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    key: str           # identity: the trace path, or its metadata when there is no path
    label: str         # short display name (file stem, or model); unique within a report
    info: tuple        # sorted (name, value) pairs of the trace object
    self_check: tuple  # (recorded, max_rel_l2) or None

    def get(self, name):
        return dict(self.info).get(name)


@dataclass
class Cell:
    trace: Trace
    method: str          # as the user named it
    resolved: str        # every parameter spelled out
    budget: str          # as the user gave it ("50%", "128")
    tokens: int          # budget in tokens per kv head
    backend: str         # "" when the input does not say
    summary: dict
    final_kv_bytes: int
    full_kv_bytes: int
    plans_checked: int
    seconds: float
    grid: "np.ndarray"   # [layers, q_heads] mean rel-L2
    steps: "np.ndarray"  # [decode_steps] mean rel-L2
    series: str = ""     # legend label within its trace: the method (+ backend when mixed)

    @property
    def fraction(self):
        """Budget as a fraction of the prompt: the x axis of the budget figure."""
        return self.tokens / self.trace.get("prompt_len")

    @property
    def mean(self):
        return self.summary["mean_rel_l2"]


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(obj, key, where, kinds, allow_null=False):
    """obj[key] checked against a kind: 'int', 'num', 'str', 'bool', 'dict', 'list'."""
    if not isinstance(obj, dict) or key not in obj:
        raise invalid(f"{where}: missing '{key}'")
    v = obj[key]
    if v is None and allow_null:
        return None
    ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
          "num": _is_num, "str": lambda x: isinstance(x, str),
          "bool": lambda x: isinstance(x, bool), "dict": lambda x: isinstance(x, dict),
          "list": lambda x: isinstance(x, list)}[kinds]
    if not ok(v):
        raise invalid(f"{where}: '{key}' must be {'a number' if kinds == 'num' else 'a ' + kinds}"
                      f"{' or null' if allow_null else ''}, got {json.dumps(v)[:40]}")
    return v


def _numbers(values, where, what):
    """A list of numbers (null = missing, drawn as a gap) as a float array."""
    if not isinstance(values, list) or not all(v is None or _is_num(v) for v in values):
        raise invalid(f"{where}: {what} must be a list of numbers")
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


TRACE_INTS = ("layers", "q_heads", "kv_heads", "head_dim", "prompt_len", "decode_steps")
SUMMARY_NUMS = ("mean_rel_l2", "max_rel_l2", "mean_cosine", "min_cosine", "mean_mass_lost",
                "max_mass_lost", "mean_kept_fraction", "max_err_over_bound")


def _check_trace(tr, where):
    _field({"trace": tr}, "trace", where, "dict")
    for k in TRACE_INTS:
        if _field(tr, k, where + ".trace", "int") <= 0:
            raise invalid(f"{where}.trace: '{k}' must be positive, got {tr[k]}")
    for k in ("model", "dtype"):
        _field(tr, k, where + ".trace", "str")
    if tr["q_heads"] % tr["kv_heads"]:
        raise invalid(f"{where}.trace: q_heads {tr['q_heads']} is not a multiple of kv_heads "
                      f"{tr['kv_heads']}")


def _make_cell(raw, trace, where):
    """One validated cell from one sweep cell / replay run object."""
    if not isinstance(raw, dict):
        raise invalid(f"{where}: must be an object")
    method = _field(raw, "method", where, "str")
    budget = _field(raw, "budget", where, "str")
    where = f"{where} ({method} {budget})"
    summary = _field(raw, "summary", where, "dict")
    _field(summary, "count", where + ".summary", "int")
    for k in SUMMARY_NUMS:
        _field(summary, k, where + ".summary", "num", allow_null=(k != "mean_rel_l2"))
    _field(summary, "mean_tv", where + ".summary", "num", allow_null=True)
    tokens = _field(raw, "budget_tokens", where, "int")
    if tokens <= 0:
        raise invalid(f"{where}: 'budget_tokens' must be positive, got {tokens}")
    layers, heads, steps = (trace.get(k) for k in ("layers", "q_heads", "decode_steps"))
    rows = _field(raw, "mean_rel_l2_by_layer_head", where, "list")
    if len(rows) != layers:
        raise invalid(f"{where}: 'mean_rel_l2_by_layer_head' has {len(rows)} rows, the trace "
                      f"has {layers} layers")
    grid = np.array([_numbers(r, where, "'mean_rel_l2_by_layer_head' rows") for r in rows])
    if grid.shape != (layers, heads):
        raise invalid(f"{where}: 'mean_rel_l2_by_layer_head' must be {layers} rows of {heads} "
                      f"numbers (layers x q heads), got shape {list(grid.shape)}")
    by_step = _numbers(_field(raw, "mean_rel_l2_by_step", where, "list"), where,
                       "'mean_rel_l2_by_step'")
    if by_step.shape != (steps,):
        raise invalid(f"{where}: 'mean_rel_l2_by_step' has {by_step.size} values, the trace "
                      f"has {steps} decode steps")
    if np.any(grid < 0) or np.any(by_step < 0) or summary["mean_rel_l2"] < 0:
        raise invalid(f"{where}: negative rel-L2 error")
    return Cell(trace=trace, method=method, budget=budget, tokens=tokens,
                resolved=_field(raw, "resolved", where, "str"),
                backend=_field(raw, "backend", where, "str") if "backend" in raw else "",
                summary=summary,
                final_kv_bytes=_field(raw, "final_kv_bytes", where, "int"),
                full_kv_bytes=_field(raw, "full_kv_bytes", where, "int"),
                plans_checked=_field(raw, "plans_checked", where, "int"),
                seconds=_field(raw, "seconds", where, "num"), grid=grid, steps=by_step)


def _trace_of(tr, self_check, where, traces):
    """The Trace for a raw trace object, shared by every cell that names the same trace."""
    _check_trace(tr, where)
    key = tr.get("path") if isinstance(tr.get("path"), str) else json.dumps(tr, sort_keys=True)
    if key not in traces:
        sc = None
        if isinstance(self_check, dict) and isinstance(self_check.get("recorded"), bool):
            sc = (self_check["recorded"], self_check.get("max_rel_l2"))
        info = tuple(sorted((k, v) for k, v in tr.items() if not isinstance(v, (dict, list))))
        traces[key] = Trace(key=key, label="", info=info, self_check=sc)
    return traces[key]


def _label_traces(cells):
    """Give every trace a short unique label: the file stem (or the model name)."""
    traces = sorted({c.trace.key: c.trace for c in cells}.values(), key=lambda t: t.key)
    labels, taken = {}, set()
    for t in traces:
        path = t.get("path")
        base = os.path.splitext(os.path.basename(path))[0] if path else t.get("model")
        label = base or "trace"
        if label in taken:  # two traces with one stem: disambiguate deterministically
            label = f"{label}-{hashlib.sha1(t.key.encode()).hexdigest()[:6]}"
        taken.add(label)
        labels[t.key] = Trace(key=t.key, label=label, info=t.info, self_check=t.self_check)
    for c in cells:
        c.trace = labels[c.trace.key]


def _name_series(cells):
    """Legend labels: the method, plus the backend when a trace has cells of several."""
    by_trace = {}
    for c in cells:
        by_trace.setdefault(c.trace.key, []).append(c)
    for group in by_trace.values():
        mixed_backends = len({c.backend for c in group}) > 1
        for c in group:
            c.series = c.method + (f" [{c.backend or '?'}]" if mixed_backends else "")


def load_cells(path):
    """Read a sweep or replay result file; return its cells, validated and sorted."""
    return load_results(path)[0]


def load_results(path):
    """(cells, meta): the validated, sorted cells and {"kvscope": version or "", "complete":
    False when a sweep says cells of its grid are missing, else True}."""
    if np is None:
        raise ReportError("I/O error", EXIT_IO, "python3-numpy is not installed for "
                          f"{sys.executable} (Debian: apt-get install python3-numpy)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ReportError("I/O error", EXIT_IO, f"'{path}': no such file") from None
    except OSError as e:
        raise ReportError("I/O error", EXIT_IO, f"'{path}': {e.strerror or e}") from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid(f"'{path}' is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise invalid(f"'{path}': expected a JSON object, got {type(doc).__name__}")

    traces, cells = {}, []
    if "format" in doc:  # kvscope sweep
        if doc["format"] != SWEEP_FORMAT:
            raise invalid(f"'{path}': format {json.dumps(doc['format'])[:60]} is not "
                          f"\"{SWEEP_FORMAT}\"")
        version = doc.get("version")
        if version != SWEEP_VERSION:
            raise invalid(f"'{path}': {SWEEP_FORMAT} version {json.dumps(version)} is not "
                          f"supported (this report reads version {SWEEP_VERSION})")
        raw_cells = doc.get("cells")
        if not isinstance(raw_cells, list) or not raw_cells:
            raise invalid(f"'{path}' has no cells: nothing to report")
        for i, raw in enumerate(raw_cells):
            where = f"cells[{i}]"
            if not isinstance(raw, dict):
                raise invalid(f"{where}: must be an object")
            trace = _trace_of(raw.get("trace"), raw.get("self_check"), where, traces)
            cells.append(_make_cell(raw, trace, where))
    elif "runs" in doc:  # kvscope replay --format json: one trace, many runs
        runs = doc["runs"]
        if not isinstance(runs, list) or not runs:
            raise invalid(f"'{path}' has no runs: nothing to report")
        trace = _trace_of(doc.get("trace"), doc.get("self_check"), "replay", traces)
        cells = [_make_cell(raw, trace, f"runs[{i}]") for i, raw in enumerate(runs)]
    else:
        raise invalid(f"'{path}' is not a kvscope result: no \"format\": \"{SWEEP_FORMAT}\" "
                      "tag (kvscope sweep) and no \"runs\" (kvscope replay --format json)")

    _label_traces(cells)
    _name_series(cells)
    cells.sort(key=lambda c: (c.trace.label, c.method, c.tokens, c.budget, c.backend, c.resolved))
    version = doc.get("kvscope")
    return cells, {"kvscope": version if isinstance(version, str) else "",
                   "complete": doc.get("complete") is not False}


# ---------------------------------------------------------------------------------------------
# What to plot: figure specifications holding exactly the arrays that are drawn
# ---------------------------------------------------------------------------------------------

@dataclass
class Line:
    label: str
    x: "np.ndarray"
    y: "np.ndarray"      # the data, before clipping to the log floor
    color: str
    marker: str


@dataclass
class FigureSpec:
    kind: str            # "budget", "steps" or "heatmap"
    filename: str
    title: str
    trace: Trace
    lines: list = field(default_factory=list)  # budget/steps figures
    floor: float = 0.0   # log-axis floor: values <= 0 are drawn here
    cell: Cell = None    # heatmap figures
    vmin: float = 0.0    # heatmap log colour scale [vmin, vmax], shared within a trace
    vmax: float = 0.0

    def plotted(self):
        """The arrays exactly as drawn, zeros at the floor: the heatmap grid, or one
        (label, x, y) per line."""
        if self.kind == "heatmap":
            return clip_to_floor(self.cell.grid, self.floor)
        return [(ln.label, ln.x, clip_to_floor(ln.y, self.floor)) for ln in self.lines]

    def clipped(self):
        """True when some drawn value is an exact zero moved to the floor."""
        return self.kind != "heatmap" and any(np.any(ln.y <= 0) for ln in self.lines)


def clip_to_floor(y, floor):
    """Log axes cannot show 0: exact zeros (e.g. method `full`) are drawn at `floor`."""
    return np.where(y <= 0, floor, y)


def log_floor(values):
    """A round number (1, 2 or 5 x 10^k) at most a third of the smallest positive value: close
    enough to keep the plot compact, far enough to tell exact zeros apart (1e-6 if none)."""
    pos = [v for v in values if np.isfinite(v) and v > 0]
    if not pos:
        return 1e-6
    limit = min(pos) / 3
    k = math.floor(math.log10(limit))
    return max(m * 10.0 ** k for m in (1, 2, 5) if m * 10.0 ** k <= limit)


MARKERS = "osD^vP*Xh<>p"
HEATMAP_DECADES = 4


def safe_name(text):
    """A filename-safe slug: '%' -> pct, '@' -> _at_, '=' -> -, '.' -> p, the rest -> _."""
    text = text.replace("%", "pct").replace("@", "_at_").replace("=", "-").replace(".", "p")
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", text)
    text = re.sub(r"_+", "_", text).strip("_-")
    return text[:60] or "x"


class Names:
    """Deterministic unique filenames: a slug, plus a short hash of the full key on collision."""

    def __init__(self):
        self.owner = {}

    def get(self, key, *parts):
        name = "_".join(safe_name(p) for p in parts) + ".png"
        if self.owner.setdefault(name, key) != key:
            name = name[:-4] + "_" + hashlib.sha1(key.encode()).hexdigest()[:8] + ".png"
            self.owner[name] = key
        return name


def trace_summary(t):
    return (f"model {t.get('model')}, {t.get('layers')} layers, {t.get('q_heads')}/"
            f"{t.get('kv_heads')} q/kv heads, d {t.get('head_dim')}, prompt T {t.get('prompt_len')}"
            f", {t.get('decode_steps')} decode steps, {t.get('dtype')}")


def plan_figures(cells, all_heatmaps=False):
    """Every figure of the report, in page order, and the cells whose heatmap is left out."""
    import matplotlib  # only for the colour maps
    import matplotlib.colors
    names, figures, omitted = Names(), [], []
    traces = {}
    for c in cells:  # cells are sorted: traces, then methods, then budgets
        traces.setdefault(c.trace.key, []).append(c)
    for group in traces.values():
        trace = group[0].trace
        series = sorted({c.series for c in group})
        cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
        order = list(range(0, cmap.N, 2)) + list(range(1, cmap.N, 2)) if cmap.N == 20 \
            else list(range(cmap.N))  # tab20: the ten dark shades before the light ones
        style = {s: (matplotlib.colors.to_hex(cmap(order[i % cmap.N])), MARKERS[i % len(MARKERS)])
                 for i, s in enumerate(series)}

        # Error vs budget: one line per method over its budgets (sorted by tokens).
        fig = FigureSpec("budget", names.get("budget:" + trace.key, "budget", trace.label),
                         f"Attention-output error vs KV budget: {trace.label}", trace,
                         floor=log_floor([c.mean for c in group]))
        for s in series:
            mine = [c for c in group if c.series == s]
            fig.lines.append(Line(s, np.array([c.fraction for c in mine]),
                                  np.array([c.mean for c in mine]), *style[s]))
        figures.append(fig)

        # Error over decode steps: one figure per budget (in tokens), one line per method.
        for tokens in sorted({c.tokens for c in group}):
            mine = [c for c in group if c.tokens == tokens]
            given = sorted({c.budget for c in mine}, key=lambda b: (len(b), b))
            fig = FigureSpec("steps", names.get(f"steps:{trace.key}:{tokens}", "steps",
                                                trace.label, f"b{tokens}"),
                             f"Error over decode steps: {trace.label}, budget {' = '.join(given)}"
                             f" ({tokens} tokens)", trace,
                             floor=log_floor([v for c in mine for v in c.steps]))
            for c in mine:
                label = c.series + (f" ({c.budget})" if len(given) > 1 else "")
                fig.lines.append(Line(label, np.arange(c.steps.size), c.steps, *style[c.series]))
            figures.append(fig)

        # Heatmaps: every cell, or each method's smallest budget. One logarithmic colour
        # scale per trace (errors span decades; a linear one shows only the worst head),
        # at most HEATMAP_DECADES deep; smaller values and zeros take the lowest colour.
        values = np.concatenate([c.grid.ravel() for c in group])
        values = values[np.isfinite(values) & (values > 0)]
        vmax = float(values.max()) if values.size else 1.0
        vmin = max(float(values.min()) if values.size else 0.0, vmax / 10 ** HEATMAP_DECADES)
        if vmin >= vmax:
            vmin = vmax / 10
        first = {}
        for c in group:
            first.setdefault(c.series, c)  # sorted by tokens: the first is the smallest budget
        for c in group:
            if not all_heatmaps and first[c.series] is not c:
                omitted.append(c)
                continue
            key = f"heatmap:{trace.key}:{c.series}:{c.budget}:{c.resolved}"
            figures.append(FigureSpec(
                "heatmap", names.get(key, "heatmap", trace.label, c.series, f"b{c.tokens}"),
                f"{trace.label}: {c.series}, budget {c.budget} ({c.tokens} tokens)", trace,
                cell=c, vmin=vmin, vmax=vmax, floor=vmin / 2))
    return figures, omitted


# ---------------------------------------------------------------------------------------------
# Drawing (matplotlib, Agg, no pyplot state)
# ---------------------------------------------------------------------------------------------

def _pct(f):
    return f"{f * 100:.3g}%"


def draw_figure(spec):
    """A matplotlib Figure for one spec (callers save it; tests read its artists back)."""
    if spec.kind == "heatmap":
        return _draw_heatmap(spec)
    from matplotlib.figure import Figure
    from matplotlib.ticker import (FixedLocator, FuncFormatter, LogLocator, MaxNLocator,
                                   NullFormatter, NullLocator)

    fig = Figure(figsize=(9.5, 5.0), dpi=110)
    ax = fig.add_subplot()
    data = spec.plotted()
    for ln, (_, x, y) in zip(spec.lines, data):
        zero = ln.y <= 0
        many = x.size > 40  # dense step series: no markers
        ax.plot(x, y, color=ln.color, marker=None if many else ln.marker, markersize=5,
                linewidth=1.6, label=ln.label, zorder=3)
        if zero.any() and not many:  # zeros: hollow markers on the floor
            ax.plot(x[zero], y[zero], linestyle="none", marker=ln.marker, markersize=7,
                    markerfacecolor="white", markeredgecolor=ln.color, zorder=4)
    ax.set_yscale("log")
    # Plain numbers (0.05, 0.1, 0.2, ...): 1-2-5 ticks when the data span under 3 decades,
    # and every minor tick labelled under one decade (so some tick is always labelled).
    drawn = np.concatenate([y for _, _, y in data])
    drawn = drawn[np.isfinite(drawn)]
    decades = math.log10(drawn.max() / drawn.min()) if drawn.size else 9
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    if decades < 3:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if decades < 1 else NullFormatter())
    if spec.clipped():
        ax.axhline(spec.floor, color="0.45", linestyle=":", linewidth=1.2, zorder=2,
                   label=f"exact 0 (drawn at {spec.floor:g})")
    ax.grid(True, which="major", color="0.88", zorder=0)
    ax.grid(True, which="minor", axis="y", color="0.95", zorder=0)
    ax.set_ylabel("mean rel-L2 error of attention output\n(vs full cache; log scale)")
    t = spec.trace
    if spec.kind == "budget":
        fracs = sorted({float(v) for ln in spec.lines for v in ln.x})
        ax.set_xscale("log", base=2)
        lo, hi = fracs[0] / 2 ** 0.35, fracs[-1] * 2 ** 0.35
        ax.set_xlim(lo, hi)
        if len(fracs) <= 12:  # a tick per budget: "25%" over its token count; a label
            ax.xaxis.set_major_locator(FixedLocator(fracs))  # only where it cannot overlap
            ax.xaxis.set_minor_locator(NullLocator())
            labels, last = [], -1.0
            for f in fracs:
                pos = math.log2(f / lo) / math.log2(hi / lo)  # 0..1 along the axis
                keep = pos - last >= 0.09
                labels.append(f"{_pct(f)}\n{round(f * t.get('prompt_len'))} tok" if keep else "")
                last = pos if keep else last
            ax.set_xticklabels(labels, fontsize=8.5)
        ax.set_xlabel(f"KV budget per kv head: kept fraction of the prompt (budget tokens / "
                      f"T, T = {t.get('prompt_len')}; log scale)")
        ax.set_title(f"{spec.title}\n{trace_summary(t)}\nmean over layers, q heads and decode "
                     "steps", fontsize=10)
    else:
        ax.set_xlabel(f"decode step s (query token T + s, T = {t.get('prompt_len')})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, t.get("decode_steps") - 0.5)
        ax.set_title(f"{spec.title}\n{trace_summary(t)}\nmean over layers and q heads",
                     fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              title="method", title_fontsize=9)
    return fig


def _draw_heatmap(spec):
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
    c, t = spec.cell, spec.trace
    layers, heads = c.grid.shape
    w = min(max(3.0 + 0.55 * heads, 6.0), 12.0)  # ~0.3-0.55 inch per cell
    h = min(max(1.9 + 0.42 * layers, 3.6), 10.0)
    fig = Figure(figsize=(w, h), dpi=110)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("0.85")  # missing values (null): light grey
    norm = LogNorm(vmin=spec.vmin, vmax=spec.vmax, clip=False)
    im = ax.imshow(spec.plotted(), cmap=cmap, norm=norm, aspect="auto",
                   interpolation="nearest", origin="upper")
    if layers * heads <= 256 and heads <= 24:  # small grids: print each value
        for (i, j), v in np.ndenumerate(c.grid):
            if np.isfinite(v):
                dark = v <= 0 or norm(v) < 0.6  # viridis is dark at the low end
                ax.text(j, i, "0" if v == 0 else f"{v:#.2g}", ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")
    group = heads // t.get("kv_heads")
    for g in range(group, heads, group):  # separators between kv-head (GQA) groups
        ax.axvline(g - 0.5, color="white", linewidth=1.5)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set_xlabel(f"query head (white lines: kv-head groups of {group})" if group > 1
                  else "query head")
    ax.set_ylabel("layer")
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, extend="min")
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    bar.set_label("mean rel-L2 over decode steps\n(log; one scale per trace; 0: lowest colour)",
                  fontsize=8 if h < 5 else 10)
    zero = " (every head exactly 0)" if np.all(c.grid == 0) else ""
    ax.set_title(f"{spec.title}\nmean rel-L2 {c.mean:.3e}{zero}", fontsize=9 if h < 5 else 12)
    return fig


def render(figures, out_dir):
    for spec in figures:
        fig = draw_figure(spec)
        try:
            # bbox "tight" grows the canvas to hold the outside legend and long titles (and is
            # much cheaper than tight_layout).
            fig.savefig(os.path.join(out_dir, spec.filename), format="png", bbox_inches="tight",
                        pad_inches=0.15, metadata={"Software": None})
        except OSError as e:
            raise ReportError("I/O error", EXIT_IO,
                              f"cannot write '{os.path.join(out_dir, spec.filename)}': "
                              f"{e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Pages: one model of the content, written as HTML and as Markdown
# ---------------------------------------------------------------------------------------------

COLUMNS = ["trace", "method", "budget", "tokens", "kept %", "mean rel-L2", "max rel-L2",
           "mean cosine", "mass lost", "KV MiB", "seconds"]


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table_rows(cells):
    """The summary table, formatted like `kvscope replay`'s table."""
    with_backend = len({c.backend for c in cells}) > 1
    head = COLUMNS[:3] + (["backend"] if with_backend else []) + COLUMNS[3:]
    rows = []
    for c in cells:
        s = c.summary
        kept = None if s["mean_kept_fraction"] is None else s["mean_kept_fraction"] * 100
        rows.append([c.trace.label, c.method, c.budget] + ([c.backend] if with_backend else []) +
                    [str(c.tokens), _fmt(kept, ".1f") + ("%" if kept is not None else ""),
                     _fmt(s["mean_rel_l2"], ".3e"), _fmt(s["max_rel_l2"], ".3e"),
                     _fmt(s["mean_cosine"], ".6f"), _fmt(s["mean_mass_lost"], ".3e"),
                     f"{c.final_kv_bytes / 2 ** 20:.3f}", f"{c.seconds:.3f}"])
    return head, rows


def page_blocks(src, meta, cells, figures, omitted):
    """The report as a list of blocks: ('h', level, text), ('p', text), ('table', head, rows,
    code_cols), ('img', file, alt), ('gallery', [(file, alt)]). Inline `code` marks names."""
    version = meta.get("kvscope")
    blocks = [("h", 1, "kvscope report"),
              ("p", f"Source: `{src}`" + (f" (kvscope {version})" if version else "") +
               f". {len(cells)} cells (trace × method × budget). Errors are relative L2 "
               "distances between each decode step's attention output over the compressed "
               "cache and over the full cache (docs/replay.md).")]
    if not meta.get("complete", True):
        blocks.append(("p", "Incomplete sweep: cells of its grid are missing (a failed or "
                            "interrupted run; run the sweep again to resume them)."))
    head, rows = table_rows(cells)
    blocks += [("h", 2, "Summary"), ("table", head, rows, {1})]

    methods = sorted({(c.method, c.resolved) for c in cells})
    blocks += [("h", 2, "Methods"), ("table", ["method", "resolved parameters"],
                                      [list(m) for m in methods], {0, 1})]

    by_trace = {}
    for f in figures:
        by_trace.setdefault(f.trace.key, []).append(f)
    for figs in by_trace.values():
        t = figs[0].trace
        blocks.append(("h", 2, f"Trace {t.label}"))
        sc = t.self_check
        check = ("self-check: no recorded outputs" if not sc or not sc[0] else
                 f"self-check: recorded outputs vs full-cache reference, max rel-L2 {sc[1]:.2e}"
                 if _is_num(sc[1]) else "self-check: recorded outputs")
        blocks.append(("p", (f"`{t.get('path')}`: " if t.get("path") else "") +
                       f"{trace_summary(t)}; {check}."))
        if any(f.clipped() for f in figs):
            blocks.append(("p", "Log-scale plots cannot show 0: exact zeros (e.g. `full`) are "
                                "drawn on a dotted line below the smallest nonzero value, with "
                                "hollow markers; each legend gives that line's value."))
        blocks.append(("h", 3, "Error vs budget"))
        blocks += [("img", f.filename, f.title) for f in figs if f.kind == "budget"]
        blocks.append(("h", 3, "Error over decode steps"))
        blocks += [("img", f.filename, f.title) for f in figs if f.kind == "steps"]
        blocks.append(("h", 3, "Error per layer and query head"))
        left = [c for c in omitted if c.trace.key == t.key]
        if left:
            blocks.append(("p", f"Showing the smallest budget of each method; {len(left)} "
                                "heatmap(s) left out (rerun with `--all-heatmaps`): " +
                           ", ".join(f"`{c.series}` {c.budget}" for c in left) + "."))
        heat = [f for f in figs if f.kind == "heatmap"]
        if heat:
            blocks.append(("p", f"Mean rel-L2 over decode steps per (layer, query head). One "
                                f"logarithmic colour scale for all heatmaps of this trace, "
                                f"{heat[0].vmin:.1e} to {heat[0].vmax:.1e}; zeros and smaller "
                                "values take the lowest colour."))
        blocks.append(("gallery", [(f.filename, f.title) for f in figs if f.kind == "heatmap"]))
    return blocks


def _inline_html(text):
    """HTML-escape, turning `code` spans into <code>."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:2px 6px}td{text-align:right;font-variant-numeric:tabular-nums}
td.t{text-align:left}th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #eee}.gallery{display:flex;flex-wrap:wrap;gap:8px}
.gallery a{max-width:49%}code{font-size:0.95em}"""


def write_html(path, blocks):
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           "<title>kvscope report</title>", f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "img":
            out.append(f"<p><img src=\"{html.escape(b[1])}\" alt=\"{html.escape(b[2])}\"></p>")
        elif b[0] == "gallery":
            out.append("<div class=\"gallery\">" + "".join(  # click a thumbnail to enlarge
                f"<a href=\"{html.escape(f)}\"><img src=\"{html.escape(f)}\" "
                f"alt=\"{html.escape(a)}\"></a>" for f, a in b[1]) + "</div>")
        else:  # table; text columns left-aligned
            _, head, rows, code = b
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) +
                       "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(
                    f"<td class=\"t\">{_inline_html(f'`{v}`' if i in code else v)}</td>"
                    if i in code or not re.match(r"^[-\d.e+%—]+$", v) else f"<td>{v}</td>"
                    for i, v in enumerate(r)) + "</tr>")
            out.append("</table>")
    out.append("</body></html>\n")
    _write(path, "\n".join(out))


def _md_cell(v, code):
    v = v.replace("|", "\\|")
    return f"`{v}`" if code else v


def write_markdown(path, blocks):
    out = []
    for b in blocks:
        if b[0] == "h":
            out += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
        elif b[0] == "gallery":
            out += [f"![{a}]({f})" for f, a in b[1]] + [""]
        else:
            _, head, rows, code = b
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" if i in code or i == 0 else "---:"
                                      for i in range(len(head))) + "|")
            out += ["| " + " | ".join(_md_cell(v, i in code) for i, v in enumerate(r)) + " |"
                    for r in rows]
            out.append("")
    _write(path, "\n".join(out))


def _write(path, text):
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ReportError("I/O error", EXIT_IO, f"cannot write '{path}': {e.strerror or e}") \
            from None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, the CLI's usage exit code
        raise ReportError("usage error", EXIT_USAGE, message)


def run(argv):
    p = _Parser(prog="kvscope report",
                description="Plots and a report page (index.html, report.md) from the JSON "
                            "of kvscope sweep or kvscope replay --format json.")
    p.add_argument("results", help="kvscope sweep / replay JSON file")
    p.add_argument("--out", "-o", default="report",
                   help="output directory, created if missing (default: report)")
    p.add_argument("--all-heatmaps", action="store_true",
                   help="a heatmap for every cell (default: each method's smallest budget)")
    args = p.parse_args(argv)

    cells, meta = load_results(args.results)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ReportError("I/O error", EXIT_IO,
                          f"cannot create '{args.out}': {e.strerror or e}") from None
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        raise ReportError("I/O error", EXIT_IO, "python3-matplotlib is not installed for "
                          f"{sys.executable} (Debian: apt-get install python3-matplotlib)") \
            from None
    figures, omitted = plan_figures(cells, args.all_heatmaps)
    render(figures, args.out)
    blocks = page_blocks(args.results, meta, cells, figures, omitted)
    write_html(os.path.join(args.out, "index.html"), blocks)
    write_markdown(os.path.join(args.out, "report.md"), blocks)
    print(f"kvscope report: {len(cells)} cells, {len(figures)} figures -> "
          f"{os.path.join(args.out, 'index.html')}")
    return 0


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ReportError as e:
        print(f"kvscope: {e.kind}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug here: still one line, no traceback
        print(f"kvscope: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
