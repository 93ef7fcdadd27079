"""PyTorch CPU reference for tools/bench-train: the same networks as graft's `mlp` and `sepcnn`, the same data
files, batch size, AdamW settings and epoch structure; prints one JSON line with samples/s per epoch.

Needs: torch, numpy (pip install torch numpy).
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn


class SepConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
        self.bn_depthwise = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1)
        self.bn_pointwise = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn_pointwise(self.pointwise(self.bn_depthwise(self.depthwise(x))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = SepConv(c, c)
        self.conv2 = SepConv(c, c)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class Head(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.linear = nn.Linear(i, o)
        self.bn = nn.BatchNorm1d(o)


class SepCnn(nn.Module):
    def __init__(self, cin, widths, depths, fc, classes):
        super().__init__()
        self.stem = SepConv(cin, widths[0])
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        prev = widths[0]
        for s, (c, d) in enumerate(zip(widths, depths)):
            self.transitions.append(SepConv(prev, c) if s > 0 else nn.Identity())
            self.stages.append(nn.Sequential(*[Block(c) for _ in range(d)]))
            prev = c
        self.mlp = nn.ModuleList()
        for h in fc:
            self.mlp.append(Head(prev, h))
            prev = h
        self.drop = nn.Dropout(0.4)
        self.classifier = nn.Linear(prev, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for s, (t, st) in enumerate(zip(self.transitions, self.stages)):
            if s > 0:
                x = t(nn.functional.max_pool2d(x, 2))
            x = st(x)
        x = x.mean((2, 3))
        for i, h in enumerate(self.mlp):
            x = torch.relu(h.bn(h.linear(x)))
            if i < len(self.mlp) - 1:
                x = self.drop(x)
        return self.classifier(x)


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def main():
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    x = np.fromfile(cfg["images"], dtype=np.uint8).reshape([-1] + cfg["shape"])
    y = np.fromfile(cfg["labels"], dtype=np.uint8)
    x = torch.from_numpy((x.astype(np.float32) / 255.0 - 0.5) / 0.5)
    y = torch.from_numpy(y.astype(np.int64))
    if cfg["arch"] == "mlp":
        model = mlp(cfg["sizes"])
        x = x.reshape(len(x), -1)
    else:
        model = SepCnn(cfg["shape"][0], cfg["widths"], cfg["depths"], cfg["fc"], cfg["classes"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    b = cfg["batch"]
    g = torch.Generator().manual_seed(0)
    for _ in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        start = time.perf_counter()
        seen = 0
        for i in range(0, len(x), b):
            idx = perm[i : i + b]
            if len(idx) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    print(json.dumps({"samples_per_s": rates, "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
