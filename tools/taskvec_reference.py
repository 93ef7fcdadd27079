"""Reference implementations for tools/bench-taskvec: what a PyTorch user writes for a task vector and for the
cosine similarity of two task vectors. Needs: pip install torch safetensors.

  python taskvec_reference.py diff FT BASE OUT.safetensors
  python taskvec_reference.py similarity A B BASE          (prints JSON: cosine, norms)
"""
import json
import math
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def open_checkpoint(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = json.load(open(index))["weight_map"]
    else:
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    files = {name: safe_open(os.path.join(d, name), "pt") for name in set(weight_map.values())}
    return lambda k: files[weight_map[k]].get_tensor(k), list(weight_map)


def diff(ft, base, out):
    get_ft, _ = open_checkpoint(ft)
    get_base, names = open_checkpoint(base)
    tau = {}
    for k in names:
        b = get_base(k)
        if b.is_floating_point():
            tau[k] = get_ft(k).float() - b.float()
    save_file(tau, out, metadata={"format": "pt"})


def similarity(a, b, base):
    get_a, _ = open_checkpoint(a)
    get_b, _ = open_checkpoint(b)
    get_base, names = open_checkpoint(base)
    dot = na = nb = 0.0
    for k in names:
        t = get_base(k)
        if not t.is_floating_point():
            continue
        t = t.float()
        x = (get_a(k).float() - t).double()
        y = (get_b(k).float() - t).double()
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    print(json.dumps({"cosine": dot / math.sqrt(na * nb), "l2_norms": [math.sqrt(na), math.sqrt(nb)]}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"diff": diff, "similarity": similarity}[cmd](*args)
