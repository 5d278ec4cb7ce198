#!/usr/bin/python3
"""Test scripts/bench-targets (the benchmark report's target tables).

    /usr/bin/python3 tests/python/test_bench_targets.py --workdir DIR

Writes small Google Benchmark JSON reports under DIR/bench-targets-test and
checks the verdicts: the paired speed-up and bandwidth ratio decide over the
separate rows' and the startup limit's,
a row without a floor is not judged, a row whose floor is below the target
says so, fewer-thread kernel rows are not judged, contended rows are flagged,
--gate exits 1 exactly when a target is missed, and an unreadable report
fails with one line. Standard library only.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench-targets")

CONTEXT = {
    "date": "2026-12-06T00:00:00+00:00",
    "kvscope_copy_GBps (bw_ratio = 1)": "33.1",
    "kvscope_omp_read_GBps": "21.8",
    "kvscope_fp32_fma_peak_GFLOPs": "152.1",
    "kvscope_omp_threads": "2",
    "kvscope_limits_other_load (> 0.05: contended, rerun)": "0.01",
}


def method(name, ms, **counters):
    return {"name": f"prefill/cpu/{name}/real_time", "run_type": "iteration", "real_time": ms, "time_unit": "ms",
            **counters}


def kernel(name, ms, bw, other_load=0.0, paired=None):
    row = {"name": f"kernel/{name}/real_time", "run_type": "iteration", "real_time": ms, "time_unit": "ms",
           "bw_ratio": bw, "other_load": other_load}
    if paired is not None:
        row.update(bw_paired=paired, bw_paired_lo=paired - 0.05, bw_paired_hi=paired + 0.05)
    return row


def run(path, *flags):
    return subprocess.run([sys.executable, SCRIPT, *flags, path], capture_output=True, text=True)


def line_of(out, key):
    hits = [l for l in out.splitlines() if l.startswith(key)]
    assert len(hits) == 1, f"expected one line starting {key!r}, got {hits}:\n{out}"
    return hits[0]


def write(workdir, name, benchmarks):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        json.dump({"context": CONTEXT, "benchmarks": benchmarks}, f)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    workdir = os.path.join(ap.parse_args().workdir, "bench-targets-test")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)

    mixed = write(workdir, "mixed.json", [
        method("full", 0.19, ref_ms=0.19, speedup=1.0),  # no floor: not judged
        # The separate rows say 25x, the pairs 19x: the pairs decide.
        method("kvmerger", 2.0, ref_ms=50.0, speedup=25.0, speedup_paired=19.0, paired_lo=17.0, paired_hi=21.0,
               paired_rounds=21, floor_ms=0.9, floor_frac=0.45, max_speedup=55.0),
        method("knorm", 0.6, ref_ms=8.8, speedup=14.2, floor_ms=0.56, floor_frac=0.91, max_speedup=15.6),
        method("tova", 1.0, ref_ms=29.5, speedup=28.6, speedup_paired=27.0, paired_lo=25.0, paired_hi=30.0,
               paired_rounds=21, floor_ms=0.6, floor_frac=0.57, max_speedup=50.0, other_load=0.2),
        kernel("decode_attention_ragged/f16/threads:2", 1.4, 0.49),
        kernel("decode_attention_ragged/f16/threads:1", 2.6, 0.20),  # fewer threads: informative only
        kernel("key_norm_scores/f32/threads:2", 1.2, 0.83),
        # The startup ratio says 0.45, the pairs 0.55: the pairs decide (and the other way round).
        kernel("window_scores/f16/window:1/threads:2", 1.2, 0.45, paired=0.55),
        kernel("adjacent_key_cosine/bf16/threads:2", 1.3, 0.60, paired=0.45),
    ])
    done = run(mixed)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "n/a" in line_of(out, "full "), out
    assert "MISSED" in line_of(out, "kvmerger "), out
    assert "19.0 [17.0-21.0]" in line_of(out, "kvmerger "), out
    assert "the floor allows 15.6x" in line_of(out, "knorm "), out
    tova = line_of(out, "tova ")
    assert "met" in tova and "contended" in tova, tova
    assert "MISSED" in line_of(out, "kernel/decode_attention_ragged/f16/threads:2"), out
    assert "threads:1" not in out, out
    assert "met" in line_of(out, "kernel/key_norm_scores/f32/threads:2"), out
    assert "met" in line_of(out, "kernel/window_scores/f16/window:1/threads:2"), out
    assert "0.55 [0.50-0.60]" in line_of(out, "kernel/window_scores/f16/window:1/threads:2"), out
    assert "MISSED" in line_of(out, "kernel/adjacent_key_cosine/bf16/threads:2"), out
    assert "4 target row(s) missed" in out, out
    assert run(mixed, "--gate").returncode == 1
    # A looser target changes the verdicts: every row met, and the gate passes.
    loose = run(mixed, "--gate", "--speedup", "10", "--bandwidth", "0.4")
    assert loose.returncode == 0 and "0 target row(s) missed" in loose.stdout, loose.stdout

    met = write(workdir, "met.json", [
        method("tova", 1.0, ref_ms=29.5, speedup=18.0, speedup_paired=21.0, paired_lo=20.0, paired_hi=23.0,
               paired_rounds=21, floor_ms=0.6, floor_frac=0.57, max_speedup=50.0),
        kernel("key_norm_scores/f16/threads:2", 0.9, 0.54),
    ])
    done = run(met, "--gate")
    assert done.returncode == 0 and "0 target row(s) missed" in done.stdout, done.stdout

    bad = os.path.join(workdir, "bad.json")
    with open(bad, "w") as f:
        f.write("{ not json")
    done = run(bad)
    assert done.returncode != 0 and "cannot read" in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    print("bench-targets: all checks passed")


if __name__ == "__main__":
    main()
