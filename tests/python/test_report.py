#!/usr/bin/python3
"""Test python/kvscope_report.py (the `kvscope report` implementation).

    /usr/bin/python3 tests/python/test_report.py --workdir DIR [--kvscope PATH]

Builds a two-trace sweep fixture (method names with ':' '@' '=' '.', a zero-error `full`,
a token budget above the prompt), reports it and checks the PNGs, index.html and report.md;
checks that the arrays drawn are the cells' data; reports the committed replay output
(fixtures/replay_sample.json, from `kvscope replay --format json`); with --kvscope, also live
replay output of that binary; and checks that bad inputs fail with one clear line.
Everything is written under DIR/report-test (removed first). Exit 0 when every check passes,
77 (skip) when numpy or matplotlib is missing.
"""

import argparse
import html
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "python", "kvscope_report.py")
FIXTURES = os.path.join(ROOT, "tests", "python", "fixtures")

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print(f"FAIL: {what}")
    return ok


def load_module():
    spec = importlib.util.spec_from_file_location("kvscope_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def report(*args):
    """Run the script as `kvscope report` would; (rc, stdout, stderr)."""
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------
# The sweep fixture
# ---------------------------------------------------------------------------------------------

TRACES = {  # label -> trace object (the label is the file stem)
    "alpha": dict(path="traces/alpha.h5", model="toy-a", producer="test", layers=3, q_heads=4,
                  kv_heads=2, head_dim=16, prompt_len=100, decode_steps=6, dtype="float16"),
    "beta": dict(path="/data/beta.h5", model="toy-b", producer="test", layers=2, q_heads=6,
                 kv_heads=3, head_dim=8, prompt_len=64, decode_steps=5, dtype="bfloat16"),
}
BUDGETS = {"alpha": [("50%", 50), ("12.5%", 12), ("128", 128)],  # 128 > prompt: kept 128%
           "beta": [("25%", 16), ("50%", 32)]}
METHODS = {"full": "full", "snapkv@paper": "snapkv_at_paper",  # name -> expected filename slug
           "streaming_llm:sinks=4:recent=60": "streaming_llm_sinks-4_recent-60",
           "h2o@kvpress:recent=0.5": "h2o_at_kvpress_recent-0p5"}


def make_cell(rng, label, method, budget, tokens):
    t = TRACES[label]
    zero = method == "full"
    scale = 0.0 if zero else 0.5 * (1 - tokens / (2 * 128)) * (1 + rng.random())
    grid = [[round(scale * rng.uniform(0.05, 1.5), 6) for _ in range(t["q_heads"])]
            for _ in range(t["layers"])]
    steps = [round(scale * rng.uniform(0.2, 1.2), 6) for _ in range(t["decode_steps"])]
    mean = sum(map(sum, grid)) / (t["layers"] * t["q_heads"])
    kv = 2 * t["layers"] * t["kv_heads"] * t["head_dim"] * 2
    return {
        "trace": t, "self_check": {"recorded": True, "max_rel_l2": 2.9e-4},
        "method": method, "resolved": method.split("@")[0] + "@paper:x=1", "budget": budget,
        "budget_tokens": tokens, "backend": "reference",
        "summary": {"count": t["layers"] * t["q_heads"] * t["decode_steps"], "mean_rel_l2": mean,
                    "max_rel_l2": 2 * mean, "mean_cosine": 1 - mean / 10, "min_cosine": 0.5,
                    "mean_mass_lost": mean / 2, "max_mass_lost": mean,
                    "mean_tv": None if "h2o" in method else mean / 2,
                    "mean_kept_fraction": 1.0 if zero else min(tokens / t["prompt_len"], 1.0),
                    "max_err_over_bound": 0.5},
        "final_kv_bytes": kv * (t["prompt_len"] if zero else tokens),
        "full_kv_bytes": kv * t["prompt_len"], "plans_checked": 42, "seconds": rng.random(),
        "mean_rel_l2_by_layer_head": grid, "mean_rel_l2_by_step": steps,
    }


def sweep_fixture():
    rng = random.Random(20261123)
    cells = [make_cell(rng, label, m, b, tok) for label in TRACES for m in METHODS
             for b, tok in BUDGETS[label]]
    rng.shuffle(cells)  # the report sorts
    return {"format": "kvscope-sweep", "version": 1, "kvscope": "0.1.0", "complete": True,
            "cells": cells}


def expected_pngs(all_heatmaps):
    names = set()
    for label, budgets in BUDGETS.items():
        toks = sorted(tok for _, tok in budgets)
        names.add(f"budget_{label}.png")
        names |= {f"steps_{label}_b{tok}.png" for tok in toks}
        names |= {f"heatmap_{label}_{slug}_b{tok}.png" for slug in METHODS.values()
                  for tok in (toks if all_heatmaps else toks[:1])}
    return names


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def check_pngs(out, expected):
    from matplotlib.image import imread
    pngs = {f for f in os.listdir(out) if f.endswith(".png")}
    check(pngs == expected, f"{out}: PNGs {sorted(pngs ^ expected)} unexpected/missing")
    for f in sorted(pngs):
        check(re.fullmatch(r"[A-Za-z0-9_.-]+", f) is not None, f"unsafe filename {f}")
        img = imread(os.path.join(out, f))
        check(img.ndim == 3 and img.shape[0] >= 250 and img.shape[1] >= 400 and
              img.shape[2] in (3, 4), f"{f}: image shape {img.shape}")
        check(img[..., :3].std() > 0.05, f"{f}: image is (nearly) blank")


def check_pages(out, cells, pngs):
    """index.html and report.md: every figure linked, every cell's row with its numbers."""
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    html_rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    md_rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    for f in pngs:
        check(f'src="{f}"' in page, f"index.html does not show {f}")
        check(f"]({f})" in md, f"report.md does not show {f}")
    for c in cells:
        mean = f"{c['summary']['mean_rel_l2']:.3e}"
        tokens = str(c["budget_tokens"])
        want_html = [f"<code>{html.escape(c['method'])}</code>", f"<td>{c['budget']}</td>",
                     f"<td>{tokens}</td>", f"<td>{mean}</td>"]
        check(any(all(w in r for w in want_html) for r in html_rows),
              f"index.html: no row with {want_html}")
        want_md = [f"| `{c['method']}` |", f"| {c['budget']} | {tokens} |", f"| {mean} |"]
        check(any(all(w in r for w in want_md) for r in md_rows), f"report.md: no row {want_md}")
    return page, md


def check_drawn_data(mod, path, raw_cells):
    """The arrays drawn are the cells' data: read them back from the matplotlib artists."""
    import numpy as np
    cells = mod.load_cells(path)
    key = lambda trace_path, method, budget: (os.path.splitext(os.path.basename(trace_path))[0],
                                              method, budget)
    raw = {key(c["trace"]["path"], c["method"], c["budget"]): c for c in raw_cells}
    order = [(c.trace.label, c.method, c.tokens) for c in cells]
    check(order == sorted(order), "cells are not sorted by trace, method, budget tokens")

    figures, omitted = mod.plan_figures(cells, all_heatmaps=True)
    check(not omitted, "--all-heatmaps left cells out")
    blocks = mod.page_blocks("x.json", {"complete": False}, cells, figures, omitted)
    check(any("Incomplete sweep" in str(b) for b in blocks), "an incomplete sweep is not flagged")
    for fig in figures:
        ax = mod.draw_figure(fig).axes[0]
        label = fig.trace.label
        mine = {k: c for k, c in raw.items() if k[0] == label}
        if fig.kind == "heatmap":
            c = raw[(label, fig.cell.method, fig.cell.budget)]
            grid = np.array(c["mean_rel_l2_by_layer_head"])
            drawn = np.asarray(ax.images[0].get_array())
            check(np.array_equal(drawn, np.where(grid > 0, grid, fig.floor)),
                  f"{fig.filename}: heatmap array is not the cell's grid")
            check(0 < fig.floor < fig.vmin, f"{fig.filename}: zeros not below the colour scale")
            allv = np.concatenate([np.ravel(m["mean_rel_l2_by_layer_head"]) for m in mine.values()])
            norm = ax.images[0].norm
            check((norm.vmin, norm.vmax) == (allv[allv > 0].min(), allv.max()),
                  f"{fig.filename}: colour scale {norm.vmin, norm.vmax} is not the trace's range")
            continue
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        for method in METHODS:
            ln = lines.get(method)
            if not check(ln is not None, f"{fig.filename}: no line for {method}"):
                continue
            x, y = np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata())
            if fig.kind == "budget":
                cs = sorted((c for k, c in mine.items() if k[1] == method),
                            key=lambda c: c["budget_tokens"])
                want_x = [c["budget_tokens"] / c["trace"]["prompt_len"] for c in cs]
                want_y = [c["summary"]["mean_rel_l2"] for c in cs]
            else:
                tok = int(re.search(r"_b(\d+)\.png$", fig.filename).group(1))
                c = next(c for k, c in mine.items() if k[1] == method and c["budget_tokens"] == tok)
                want_x = list(range(c["trace"]["decode_steps"]))
                want_y = c["mean_rel_l2_by_step"]
            want_y = [v if v > 0 else fig.floor for v in want_y]  # zeros sit on the floor
            check(np.allclose(x, want_x, rtol=0, atol=0) and np.allclose(y, want_y, rtol=1e-12),
                  f"{fig.filename}: {method} drew x={list(x)} y={list(y)}, want {want_x} {want_y}")
        if fig.kind == "budget":  # `full` is 0: a marked floor below every nonzero mean
            means = [c["summary"]["mean_rel_l2"] for c in mine.values()]
            check(0 < fig.floor < min(v for v in means if v > 0) and
                  any(k.startswith("exact 0") for k in lines),
                  f"{fig.filename}: zero floor {fig.floor} not marked below the data")
        check(ax.get_yscale() == "log", f"{fig.filename}: y axis is not logarithmic")
        check(bool(ax.get_title()) and bool(ax.get_xlabel()) and bool(ax.get_ylabel()),
              f"{fig.filename}: missing title or axis label")


def check_bad_inputs(work):
    bad = os.path.join(work, "bad")
    os.makedirs(bad, exist_ok=True)

    def write(name, text):
        p = os.path.join(bad, name)
        with open(p, "w") as f:
            f.write(text if isinstance(text, str) else json.dumps(text))
        return p

    good = sweep_fixture()
    wrong_grid = json.loads(json.dumps(good))
    wrong_grid["cells"][3]["mean_rel_l2_by_layer_head"].pop()
    cases = [  # (name, args, exit code, message pattern)
        ("missing file", [os.path.join(bad, "nope.json")], 4, r"no such file"),
        ("not JSON", [write("text.json", "this is not json\n")], 3, r"is not JSON"),
        ("wrong format tag", [write("tag.json", {"format": "kvscope-replay", "cells": []})], 3,
         r'format "kvscope-replay" is not "kvscope-sweep"'),
        ("no format, no runs", [write("other.json", {"hello": 1})], 3, r"not a kvscope result"),
        ("future version", [write("v2.json", dict(good, version=2))], 3, r"version 2"),
        ("no cells", [write("empty.json", dict(good, cells=[]))], 3, r"no cells"),
        ("replay without runs", [write("runs.json", {"trace": {}, "runs": []})], 3, r"no runs"),
        ("grid shape", [write("grid.json", wrong_grid)], 3, r"cells\[3\].*by_layer_head"),
        ("JSON array", [write("array.json", [1, 2])], 3, r"expected a JSON object"),
        ("unknown flag", [write("ok.json", good), "--frobnicate"], 2, r"--frobnicate"),
        ("out is a file", [write("ok.json", good), "--out", write("file", "x")], 4,
         r"cannot create"),
    ]
    for name, args, code, pattern in cases:
        if "--out" not in args:
            args = args + ["--out", os.path.join(bad, "out")]
        rc, _, err = report(*args)
        lines = err.strip().splitlines()
        check(rc == code, f"bad input '{name}': exit {rc}, want {code} ({err.strip()})")
        check(len(lines) == 1 and lines[0].startswith("kvscope: ") and
              re.search(pattern, lines[0]) is not None and "Traceback" not in err,
              f"bad input '{name}': stderr {err!r} is not one line matching /{pattern}/")
    check(not os.path.exists(os.path.join(bad, "out", "index.html")),
          "a failed report wrote index.html")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--kvscope", help="a kvscope binary: also report its live replay output")
    args = ap.parse_args()
    missing = [m for m in ("numpy", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"SKIP: {sys.executable} lacks {', '.join(missing)} "
              "(Debian: apt-get install python3-matplotlib python3-numpy)")
        return 77
    start = time.monotonic()
    work = os.path.join(os.path.abspath(args.workdir), "report-test")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    sys.dont_write_bytecode = True  # importing the script leaves no __pycache__ behind
    mod = load_module()

    # 1. The sweep fixture: default heatmaps, then all of them.
    fixture = sweep_fixture()
    sweep = os.path.join(work, "sweep.json")
    with open(sweep, "w") as f:
        json.dump(fixture, f)
    out = os.path.join(work, "sweep")
    rc, _, err = report(sweep, "--out", out)
    if check(rc == 0, f"report of the sweep fixture failed: {rc} {err}"):
        check_pngs(out, expected_pngs(False))
        page, md = check_pages(out, fixture["cells"], expected_pngs(False))
        for text, name in ((page, "index.html"), (md, "report.md")):
            check("--all-heatmaps" in text and "8 heatmap(s) left out" in text and
                  "4 heatmap(s) left out" in text, f"{name} does not say which heatmaps are out")
            check("cannot show 0" in text, f"{name} does not explain the zero floor")
    out_all = os.path.join(work, "sweep-all")
    rc, _, err = report(sweep, "--out", out_all, "--all-heatmaps")
    if check(rc == 0, f"report --all-heatmaps failed: {rc} {err}"):
        check_pngs(out_all, expected_pngs(True))
        check_pages(out_all, fixture["cells"], expected_pngs(True))
        for f in expected_pngs(False):  # deterministic, and independent of --all-heatmaps
            same = open(os.path.join(out, f), "rb").read() == \
                open(os.path.join(out_all, f), "rb").read()
            check(same, f"{f} differs between two runs")
    check_drawn_data(mod, sweep, fixture["cells"])

    # 2. Replay output (kvscope replay --format json), committed and, with --kvscope, live.
    replays = [os.path.join(FIXTURES, "replay_sample.json")]
    if args.kvscope:
        live = os.path.join(work, "live.json")
        with open(live, "w") as f:
            p = subprocess.run([args.kvscope, "replay",
                                os.path.join(ROOT, "traces", "samples", "sample.h5"),
                                "--method", "full,snapkv,h2o,streaming_llm",
                                "--budget", "50%,25%,12.5%", "--format", "json"], stdout=f)
        check(p.returncode == 0, f"{args.kvscope} replay failed: {p.returncode}")
        replays.append(live)
    for i, path in enumerate(replays):
        doc = json.load(open(path))
        runs = doc["runs"]
        methods = {r["method"] for r in runs}
        toks = sorted({r["budget_tokens"] for r in runs})
        slug = lambda m: m.replace("@", "_at_")
        want = ({"budget_synthetic.png"} | {f"steps_synthetic_b{t}.png" for t in toks} |
                {f"heatmap_synthetic_{slug(m)}_b{toks[0]}.png" for m in methods})
        out_r = os.path.join(work, f"replay{i}")
        rc, _, err = report(path, "--out", out_r)
        if check(rc == 0, f"report of {path} failed: {rc} {err}"):
            check_pngs(out_r, want)
            check_pages(out_r, runs, want)
    # The same input twice gives the same pages.
    rc, _, _ = report(replays[0], "--out", os.path.join(work, "replay0-again"))
    for name in ("index.html", "report.md"):
        check(rc == 0 and open(os.path.join(work, "replay0", name), "rb").read() ==
              open(os.path.join(work, "replay0-again", name), "rb").read(),
              f"{name} differs between two runs")

    # 3. Bad inputs: one clear line, the documented exit code, no traceback.
    check_bad_inputs(work)

    took = time.monotonic() - start
    if failures:
        print(f"test_report: {len(failures)} check(s) failed ({took:.1f} s)")
        return 1
    print(f"test_report: all checks passed ({took:.1f} s); pictures in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
