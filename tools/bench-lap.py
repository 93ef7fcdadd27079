#!/usr/bin/env python3
"""Benchmark graft's linear assignment solver against SciPy's linear_sum_assignment.

For each n (default 512 2048 4096) it draws a uniform random f64 n x n matrix (numpy, seeded) and times, REPS times
and alternating, SciPy on it in this process and graft on the same matrix (the `bench-lap` example, which times the
solve only, not reading the file); it checks that both reach the same optimum (and the same assignment) and prints
the medians and their ratio.

Needs: numpy, scipy (`pip install numpy scipy`). Python is taken from $PYTHON by the caller, e.g.
    $PYTHON tools/bench-lap.py [--reps 5] [--sizes 512 2048 4096] [--matrix uniform|lowrank]
Run it from the repository root; it builds the example with `cargo build --release --example bench-lap`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from scipy.optimize import linear_sum_assignment


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matrix", choices=["uniform", "lowrank"], default="uniform",
                    help="uniform [0, 1) entries, or rank 8 plus Gaussian noise (like weight matching's costs)")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "bench-lap"], check=True)
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    exe = os.path.join(target, "release", "examples", "bench-lap")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rng = np.random.default_rng(args.seed + n)
            if args.matrix == "uniform":
                cost = rng.random((n, n))
            else:
                cost = rng.standard_normal((n, 8)) @ rng.standard_normal((8, n)) + 0.5 * rng.standard_normal((n, n))
            path = os.path.join(tmp, f"m{n}.f64")
            cost.astype("<f8").tofile(path)
            # Interleave the two solvers rep by rep, so load from other processes hits both alike.
            scipy_times, graft_times = [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                r, c = linear_sum_assignment(cost)
                scipy_times.append(time.perf_counter() - t)
                out = subprocess.run([exe, "1", path, str(n)], check=True, capture_output=True, text=True)
                g = json.loads(out.stdout.splitlines()[0])
                graft_times.extend(g["seconds"])
            scipy_value = float(cost[r, c].sum())
            same_value = abs(g["value"] - scipy_value) <= 1e-9 * max(1.0, abs(scipy_value))
            same_assignment = g["assignment"] == c.tolist()
            rows.append((n, statistics.median(scipy_times), statistics.median(graft_times), same_value,
                         same_assignment, scipy_value))
            if not same_value:
                print(f"n={n}: graft's optimum {g['value']} differs from SciPy's {scipy_value}", file=sys.stderr)

    print(f"{args.matrix} random f64 matrices, medians of {args.reps} alternating runs")
    print(f"{'n':>6} {'scipy median s':>15} {'graft median s':>15} {'scipy/graft':>12} {'same optimum':>13} "
          f"{'same assignment':>16}")
    for n, s, g, v, a, _ in rows:
        print(f"{n:>6} {s:>15.4f} {g:>15.4f} {s / g:>12.2f} {str(v):>13} {str(a):>16}")
    sys.exit(0 if all(r[3] for r in rows) else 1)


if __name__ == "__main__":
    main()
