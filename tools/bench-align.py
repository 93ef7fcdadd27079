#!/usr/bin/env python3
"""Benchmark `graft align` against a NumPy/SciPy implementation of the same weight matching.

The reference reads graft's permutation spec (`graft align --print-spec --json`), loads both models into memory as
f64 and runs Ainsworth et al.'s weight matching as written in their code: for each group in a seeded random order,
A = sum R @ M^T over the tensors it touches (other axes permuted by the current permutations), SciPy's
linear_sum_assignment (maximize), keep on an improvement over 1e-12, stop after a pass without one. It then applies
the permutations and writes nothing (graft also writes the aligned checkpoint, so the comparison favours the
reference). Both start from the same models; group orders come from different generators, so the final objectives
may differ slightly on models with several local optima; the starting objective must agree to rounding.

Models: random MLPs `--sizes 784 2048 2048 2048 10` (two independent draws, F32), written with safetensors.

Needs: numpy, scipy, safetensors (`pip install numpy scipy safetensors`). Usage, from the repository root:
    $PYTHON tools/bench-align.py [--sizes 784 2048 2048 2048 10] [--reps 3] [--graft target/release/graft]
It builds graft with `cargo build --release` unless --graft is given.
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
from safetensors.numpy import load_file, save_file
from scipy.optimize import linear_sum_assignment


def axis_entry(e):
    if e is None:
        return None
    if isinstance(e, str):
        return e, 1
    return e["group"], e.get("block", 1)


def weight_matching(ref, model, spec, seed, max_iter=100):
    groups = spec["groups"]
    axes = {t: [axis_entry(e) for e in a] for t, a in spec["tensors"].items() if a and any(x is not None for x in a)}
    perms = {g: np.arange(n) for g, n in groups.items()}
    members = {g: [] for g in groups}
    for t, a in axes.items():
        for k, e in enumerate(a):
            if e is not None:
                members[e[0]].append((t, k))

    def index(g, b):
        return (perms[g][:, None] * b + np.arange(b)).reshape(-1)

    def permuted(t, skip=None):
        w = model[t]
        for k, e in enumerate(axes[t]):
            if e is not None and k != skip:
                w = np.take(w, index(*e), axis=k)
        return w

    def objective():
        return sum(float(np.vdot(ref[t], permuted(t))) for t in axes)

    before = objective()
    rng = np.random.default_rng(seed)
    names = list(groups)
    passes = 0
    for _ in range(max_iter):
        passes += 1
        progress = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            n = groups[g]
            a = np.zeros((n, n))
            for t, k in members[g]:
                r = np.moveaxis(ref[t], k, 0).reshape(n, -1)
                m = np.moveaxis(permuted(t, k), k, 0).reshape(n, -1)
                a += r @ m.T
            _, cols = linear_sum_assignment(a, maximize=True)
            if a[np.arange(n), cols].sum() > a[np.arange(n), perms[g]].sum() + 1e-12:
                perms[g] = cols
                progress = True
        if not progress:
            break
    return before, objective(), passes


def random_mlp(sizes, seed):
    rng = np.random.default_rng(seed)
    t = {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        t[f"layers.{i}.weight"] = (rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32)
        t[f"layers.{i}.bias"] = (rng.standard_normal(b) * 0.02).astype(np.float32)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[784, 2048, 2048, 2048, 10])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--graft", default=None)
    args = ap.parse_args()
    graft = args.graft
    if graft is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], check=True)
        graft = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "graft")

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, seed in (("ref", 1), ("model", 2)):
            d = os.path.join(tmp, name)
            os.makedirs(d)
            save_file(random_mlp(args.sizes, seed), os.path.join(d, "model.safetensors"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"graft_arch": "mlp"}, f)
            paths.append(d)
        spec = json.loads(subprocess.run([graft, "align", "--print-spec", "--json", paths[1]], check=True,
                                         capture_output=True, text=True).stdout)
        graft_times, ref_times = [], []
        for rep in range(args.reps):
            out = os.path.join(tmp, f"out{rep}")
            t = time.perf_counter()
            res = subprocess.run([graft, "align", paths[0], paths[1], "-o", out, "--json"], check=True,
                                 capture_output=True, text=True)
            graft_times.append(time.perf_counter() - t)
            g = json.loads(res.stdout)
            t = time.perf_counter()
            ref = {k: v.astype(np.float64) for k, v in load_file(os.path.join(paths[0], "model.safetensors")).items()}
            model = {k: v.astype(np.float64) for k, v in load_file(os.path.join(paths[1], "model.safetensors")).items()}
            before, after, passes = weight_matching(ref, model, spec, seed=0)
            ref_times.append(time.perf_counter() - t)
    ok = abs(before - g["objective_before"]) <= 1e-9 * max(1.0, abs(before))
    print(f"MLP {args.sizes}: groups {[n for n in spec['groups'].values()]}")
    gt, rt = statistics.median(graft_times), statistics.median(ref_times)
    gp, rp = gt / g["iterations"], rt / passes
    print(f"{'':>10} {'median s':>10} {'passes':>7} {'s per pass':>11} {'objective before':>18} {'objective after':>18}")
    print(f"{'graft':>10} {gt:>10.3f} {g['iterations']:>7} {gp:>11.3f} {g['objective_before']:>18.6f} "
          f"{g['objective_after']:>18.6f}")
    print(f"{'numpy':>10} {rt:>10.3f} {passes:>7} {rp:>11.3f} {before:>18.6f} {after:>18.6f}")
    # The pass count depends on the random group order, which the two draw differently: compare per pass too.
    print(f"numpy / graft: total time {rt / gt:.2f}, time per pass {rp / gp:.2f}; starting objectives agree: {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
