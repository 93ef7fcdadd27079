"""Builds the vocabulary-merge fixtures and mergekit's union merge of them (tests/merge_vocab.rs compares graft to it).

Run from anywhere with a Python that has mergekit 0.1.5, torch, safetensors, pyyaml (e.g. /work/venv/bin/python):

    python tools/mergekit_vocab_parity.py

Writes
- fixtures/llama-vocab/donor_a: fixtures/llama/ft_a with a different vocabulary: the ids of "the" and "a" swapped
  (its embedding and head rows swapped with them), ordinary tokens "graft" and "merge" and the special added token
  "<|im_start|>" appended (rows drawn from a seeded generator);
- fixtures/llama-vocab/donor_b: fixtures/llama/ft_b with "merge" and "vocab" appended;
- fixtures/expected/union_llama: mergekit's `tokenizer_source: union` linear merge of fixtures/llama/base and the
  two donors (config.yml, model.safetensors, tokenizer.json, config.json);
- fixtures/expected/donor_llama: the same merge with `tokenizer_source: fixtures/llama-vocab/donor_a` (the legacy
  key, which mergekit reads as `tokenizer: {source: ...}`: rows remapped onto donor_a's vocabulary).

So the output vocabulary has tokens held by all three models (at moved ids in donor_a), by one donor only ("graft",
"vocab", "<|im_start|>": mergekit's rule gives every model lacking them the donor's row) and by both donors but not
the base ("merge": the mean of the donors' rows). mergekit numbers the new ordinary tokens in hash-map order, so
comparisons go by token, not by id.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = os.path.join(ROOT, "fixtures", "llama")
V = os.path.join(ROOT, "fixtures", "llama-vocab")
OUT = os.path.join(ROOT, "fixtures", "expected", "union_llama")
DONOR_OUT = os.path.join(ROOT, "fixtures", "expected", "donor_llama")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def donor(src, dst, swap, ordinary, added, seed):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    if swap:
        a, b = swap
        vocab[a], vocab[b] = vocab[b], vocab[a]
    n = len(vocab)
    for t in ordinary:
        vocab[t] = n
        n += 1
    for t in added:
        vocab[t] = n
        tok["added_tokens"].append(
            {"id": n, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
        )
        n += 1
    json.dump(tok, open(os.path.join(dst, "tokenizer.json"), "w"), indent=1, ensure_ascii=False)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["vocab_size"] = n
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        t = tensors[name].clone()
        if swap:
            ia, ib = json.load(open(os.path.join(src, "tokenizer.json")))["model"]["vocab"][swap[0]], \
                json.load(open(os.path.join(src, "tokenizer.json")))["model"]["vocab"][swap[1]]
            t[[ia, ib]] = t[[ib, ia]]
        extra = (torch.randn((n - t.shape[0], t.shape[1]), generator=gen) * 0.05).to(t.dtype)
        tensors[name] = torch.cat([t, extra]).contiguous()
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def main():
    donor(os.path.join(L, "ft_a"), os.path.join(V, "donor_a"), ("the", "a"), ["graft", "merge"], ["<|im_start|>"], 1)
    donor(os.path.join(L, "ft_b"), os.path.join(V, "donor_b"), None, ["merge", "vocab"], [], 2)
    config = {
        "merge_method": "linear",
        "base_model": "fixtures/llama/base",
        "models": [
            {"model": "fixtures/llama/base", "parameters": {"weight": 0.5}},
            {"model": "fixtures/llama-vocab/donor_a", "parameters": {"weight": 0.3}},
            {"model": "fixtures/llama-vocab/donor_b", "parameters": {"weight": 0.2}},
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    expected_merge(config, OUT)
    expected_merge(dict(config, tokenizer_source="fixtures/llama-vocab/donor_a"), DONOR_OUT)
    print("wrote", V, "and", OUT, "and", DONOR_OUT, file=sys.stderr)


def expected_merge(config, out):
    """Runs mergekit on `config` (paths relative to the repository) and keeps its tensors, tokenizer and config."""
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        run_merge(MergeConfiguration.model_validate(config), tmp, MergeOptions(copy_tokenizer=True))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out)
        for f in ("model.safetensors", "tokenizer.json", "config.json"):
            shutil.copy(os.path.join(tmp, f), os.path.join(out, f))
    with open(os.path.join(out, "config.yml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


if __name__ == "__main__":
    main()
