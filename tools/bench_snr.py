"""Helper of tools/bench-snr: generates the benchmark matrices, times torch and numpy on them, checks accuracy and
Spectrum parity, and prints the comparison. Needs numpy, safetensors and torch (pip install numpy safetensors torch).

  bench_snr.py gen FILE                 write the benchmark matrices (seeded) to a safetensors file
  bench_snr.py time FILE --repeats N --out JSONL [--cap S]   time torch.linalg.svdvals f32 and numpy svd f32
  bench_snr.py report DIR               compare graft's timings/values with the references and print the table
  bench_snr.py parity GRAFT_JSON CHECKPOINT_FILE REGEX
                                        Spectrum's own computation (torch float32) on the matching tensors of a
                                        checkpoint vs `graft snr --json`'s values
"""
import json
import math
import os
import sys
import time

SIZES = [(1024, 1024), (2048, 2048), (4096, 4096), (2048, 5632), (4096, 14336)]


def gen(path):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(20240601)
    tensors = {}
    for r, c in SIZES:
        # Gaussian noise plus a rank-8 signal, so the SNR has signal and noise singular values to separate.
        w = rng.standard_normal((r, c), dtype=np.float32) * np.float32(0.02)
        u = rng.standard_normal((r, 8), dtype=np.float32)
        v = rng.standard_normal((8, c), dtype=np.float32)
        w += (u @ v) * np.float32(0.02 / math.sqrt(c))
        tensors[f"m{r}x{c}"] = w.astype(np.float32)
    save_file(tensors, path)


def spectrum_snr(S, n, m):
    """Spectrum's formula, in torch, exactly as spectrum.py computes it."""
    import numpy as np
    import torch

    q75 = torch.quantile(S, 0.75)
    q25 = torch.quantile(S, 0.25)
    sigma = (q75 - q25) / 1.349
    beta = n / m if n < m else m / n
    threshold = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    mask = S > threshold
    signal = S[mask].sum() if mask.any() else torch.tensor(0.0)
    noise = S[~mask].sum() if (~mask).any() else torch.tensor(1.0)
    snr = signal / noise if noise != 0 else float("inf")
    return float(snr / S[0])


def time_refs(path, repeats, out, cap):
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    mats = load_file(path)
    outdir = os.path.dirname(out)
    with open(out, "w") as f:
        for name, w in mats.items():
            n, m = w.shape
            for lib in ("torch", "numpy"):
                times = []
                s = None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    if lib == "torch":
                        s = torch.linalg.svdvals(torch.from_numpy(w)).numpy()
                    else:
                        s = np.linalg.svd(w, compute_uv=False)
                    times.append(time.perf_counter() - t0)
                    if times[-1] > cap:
                        break  # one repeat is all the budget allows at this size
                np.save(os.path.join(outdir, f"{lib}-{name}.npy"), s.astype(np.float64))
                rec = {"name": name, "rows": n, "cols": m, "lib": lib, "threads": threads, "times": times,
                       "median": sorted(times)[len(times) // 2]}
                if lib == "torch":
                    rec["spectrum_snr"] = spectrum_snr(torch.from_numpy(s.astype(np.float32)), n, m)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"  {lib:6s} {name}: {rec['median']:.3f} s ({len(times)} repeat(s))", file=sys.stderr)


def reference_f64(path, names, limit):
    """numpy float64 SVD of the f32 matrices (the truth the f32 answers are judged against), for the sizes whose
    long side * short side^2 stays under `limit`."""
    import numpy as np
    from safetensors.numpy import load_file

    mats = load_file(path)
    ref = {}
    for name in names:
        w = mats[name]
        n, m = w.shape
        if min(n, m) ** 2 * max(n, m) <= limit:
            ref[name] = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    return ref


def report(d):
    import numpy as np

    graft = {}
    for line in open(os.path.join(d, "graft.jsonl")):
        r = json.loads(line)
        graft[r["name"]] = r
    refs = {}
    for line in open(os.path.join(d, "refs.jsonl")):
        r = json.loads(line)
        refs[(r["name"], r["lib"])] = r
    snr = {t["name"]: t for t in json.load(open(os.path.join(d, "graft-snr.json")))["tensors"]}
    limit = float(os.environ.get("BENCH_F64_LIMIT", 2.5e11))
    truth = reference_f64(os.path.join(d, "mats.safetensors"), list(graft), limit)

    def err(s, name):
        if name not in truth:
            return "-"
        t = truth[name]
        return f"{np.max(np.abs(np.sort(s)[::-1] - t)) / t[0]:.1e}"

    threads = next(iter(graft.values()))["threads"]
    print(f"singular values of an f32 matrix, {threads} thread(s) each, median seconds (repeats)")
    hdr = f"{'matrix':>12} {'graft':>14} {'torch f32':>14} {'numpy f32':>14} {'torch/graft':>12} {'numpy/graft':>12}"
    print(hdr)
    for name, g in graft.items():
        t, n = refs[(name, "torch")], refs[(name, "numpy")]
        print(f"{name[1:]:>12} {g['median']:>9.3f} ({len(g['times'])}) {t['median']:>9.3f} ({len(t['times'])}) "
              f"{n['median']:>9.3f} ({len(n['times'])}) {t['median'] / g['median']:>11.2f}x {n['median'] / g['median']:>11.2f}x")
    print()
    print("accuracy: max |s - s_f64| / s_max against numpy's float64 SVD of the same f32 matrix; SNR vs Spectrum's")
    print(f"{'matrix':>12} {'graft':>9} {'torch f32':>9} {'numpy f32':>9} {'graft snr':>14} {'spectrum snr':>14} {'rel diff':>9}")
    for name in graft:
        gs = np.fromfile(os.path.join(d, "graft", f"{name}.f64"), dtype="<f8")
        ts = np.load(os.path.join(d, f"torch-{name}.npy"))
        ns = np.load(os.path.join(d, f"numpy-{name}.npy"))
        ours = snr[name]["snr"]
        theirs = refs[(name, "torch")]["spectrum_snr"]
        rel = abs(ours - theirs) / abs(theirs)
        print(f"{name[1:]:>12} {err(gs, name):>9} {err(ts, name):>9} {err(ns, name):>9} {ours:>14.8f} {theirs:>14.8f} {rel:>9.1e}")


def parity(graft_json, ckpt, pattern):
    import re

    import torch
    from safetensors import safe_open

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    ours = {t["name"]: t for t in json.load(open(graft_json))["tensors"]}
    files = [ckpt] if os.path.isfile(ckpt) else sorted(
        os.path.join(ckpt, x) for x in os.listdir(ckpt) if x.endswith(".safetensors"))
    worst = 0.0
    for path in files:
        with safe_open(path, framework="pt") as f:
            names = [n for n in f.keys() if re.search(pattern, n) and n in ours and ours[n]["snr"] is not None]
            for name in names:
                w = f.get_tensor(name).to(torch.float32)  # Spectrum loads the model with torch_dtype=float32
                if w.ndim < 2:
                    w = w.unsqueeze(0)
                w = w.reshape(w.shape[0], -1)
                t0 = time.perf_counter()
                theirs = spectrum_snr(torch.linalg.svdvals(w), *w.shape)
                dt = time.perf_counter() - t0
                rel = abs(ours[name]["snr"] - theirs) / abs(theirs)
                worst = max(worst, rel)
                print(f"{name:45s} graft {ours[name]['snr']:.8f} spectrum {theirs:.8f} rel diff {rel:.1e} "
                      f"(torch {dt:.2f} s)")
    print(f"largest relative difference: {worst:.1e}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "gen":
        gen(sys.argv[2])
    elif cmd == "time":
        args = sys.argv[2:]
        path = args[0]
        repeats = int(args[args.index("--repeats") + 1]) if "--repeats" in args else 3
        out = args[args.index("--out") + 1]
        cap = float(args[args.index("--cap") + 1]) if "--cap" in args else 120.0
        time_refs(path, repeats, out, cap)
    elif cmd == "report":
        report(sys.argv[2])
    elif cmd == "parity":
        parity(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
