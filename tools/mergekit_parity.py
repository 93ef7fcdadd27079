"""Writes mergekit's outputs on the committed fixtures into fixtures/expected/<case>/ (run via tools/mergekit-parity).

Each case is a mergekit YAML config over repository-relative fixture paths. The llama fixtures are a real Llama
architecture that mergekit knows. The mlp fixtures' config.json is graft's own (no `model_type`), which transformers
cannot read, so mergekit runs on temporary copies whose config.json names a model type transformers can read but
not build as a language model (resnet), so mergekit infers the layout from the tensor names (`layers.<i>.`); the tensors are the
committed ones. Only model.safetensors and config.yml are kept, so fixtures/expected stays small.
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

L = "fixtures/llama"
M = "fixtures/mlp"


def models(*entries):
    return [{"model": m, "parameters": p} if p else {"model": m} for m, p in entries]


CASES = {
    # linear and slerp: mergekit computes in f32 whatever the dtype and rounds the result.
    "linear_llama": {
        "merge_method": "linear",
        "models": models((f"{L}/ft_a", {"weight": 0.3}), (f"{L}/ft_b", {"weight": [0.9, 0.5]})),
        "dtype": "bfloat16",
    },
    "linear_mlp_filters": {
        "merge_method": "linear",
        "models": models(
            (f"{M}/ft_a", {"weight": [{"filter": "layers.0", "value": 0.2}, {"value": 0.6}]}),
            (f"{M}/ft_b", {"weight": 0.5}),
            (f"{M}/base", {"weight": [1.0, 0.0]}),
        ),
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "slerp_llama_gradients": {
        "merge_method": "slerp",
        "base_model": f"{L}/ft_a",
        "models": models((f"{L}/ft_a", None), (f"{L}/ft_b", None)),
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                {"filter": "mlp", "value": [1.0, 0.3]},
                {"value": 0.4},
            ]
        },
        "dtype": "bfloat16",
    },
    "slerp_llama_slices": {
        "merge_method": "slerp",
        "base_model": f"{L}/ft_a",
        "slices": [
            {
                "sources": [
                    {"model": f"{L}/ft_a", "layer_range": [0, 2]},
                    {"model": f"{L}/ft_b", "layer_range": [0, 2]},
                ]
            }
        ],
        "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.6}]},
        "dtype": "bfloat16",
    },
    "slerp_mlp": {
        "merge_method": "slerp",
        "base_model": f"{M}/base",
        "models": models((f"{M}/base", None), (f"{M}/ft_a", None)),
        "parameters": {"t": [0.1, 0.9]},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "passthrough_llama_stack": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": f"{L}/ft_a", "layer_range": [0, 2]}]},
            {"sources": [{"model": f"{L}/ft_b", "layer_range": [1, 2]}]},
        ],
        "dtype": "bfloat16",
    },
}

# The task-vector family: mergekit computes in its working dtype; both bf16 and f32 are recorded.
for dtype, tag in (("bfloat16", "bf16"), ("float32", "f32")):
    CASES[f"task_arithmetic_llama_{tag}"] = {
        "merge_method": "task_arithmetic",
        "base_model": f"{L}/base",
        "models": models((f"{L}/ft_a", {"weight": 0.7}), (f"{L}/ft_b", {"weight": [0.2, 0.6]})),
        "parameters": {"lambda": 0.9},
        "dtype": dtype,
        "out_dtype": "bfloat16",
    }
    CASES[f"ties_llama_{tag}"] = {
        "merge_method": "ties",
        "base_model": f"{L}/base",
        "models": models(
            (f"{L}/ft_a", {"weight": 0.5, "density": 0.5}),
            (f"{L}/ft_b", {"weight": 0.7, "density": [0.7, 0.3]}),
        ),
        "dtype": dtype,
        "out_dtype": "bfloat16",
    }
    CASES[f"breadcrumbs_llama_{tag}"] = {
        "merge_method": "breadcrumbs",
        "base_model": f"{L}/base",
        "models": models(
            (f"{L}/ft_a", {"weight": 0.6, "density": 0.6, "gamma": 0.05}),
            (f"{L}/ft_b", {"weight": 0.4, "density": 0.5, "gamma": 0.1}),
        ),
        "dtype": dtype,
        "out_dtype": "bfloat16",
    }
CASES["ties_mlp_f32"] = {
    "merge_method": "ties",
    "base_model": f"{M}/base",
    "models": models((f"{M}/ft_a", {"weight": 1.0, "density": 0.3}), (f"{M}/ft_b", {"weight": 1.0, "density": 0.3})),
    "parameters": {"normalize": True},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}


def mergekit_view(cfg, tmp):
    """The config with mlp fixture paths replaced by copies mergekit can read."""

    def fix(path):
        if not path.startswith(M + "/"):
            return path
        dst = os.path.join(tmp, path)
        if not os.path.isdir(dst):
            os.makedirs(dst)
            shutil.copy(os.path.join(path, "model.safetensors"), dst)
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump({"model_type": "resnet", "architectures": ["GraftMlp"]}, f)
        return dst

    def walk(v):
        if isinstance(v, dict):
            return {k: (fix(x) if k in ("model", "base_model") and isinstance(x, str) else walk(x)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(cfg)

# Methods added later (sce, multislerp): f32 working dtype, so the comparison measures the algorithms.
CASES["sce_llama_f32"] = {
    "merge_method": "sce",
    "base_model": f"{L}/base",
    "models": models((f"{L}/ft_a", None), (f"{L}/ft_b", None)),
    "parameters": {"select_topk": 0.5},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["multislerp_llama_f32"] = {
    "merge_method": "multislerp",
    "base_model": f"{L}/base",
    "models": models((f"{L}/ft_a", {"weight": 0.6}), (f"{L}/ft_b", {"weight": [0.2, 0.5]})),
    "dtype": "float32",
    "out_dtype": "bfloat16",
}

# Methods added with the base-optional interface: f32 working dtype, so the comparison measures the algorithms.
CASES["multislerp_llama_nobase_f32"] = {
    "merge_method": "multislerp",
    "models": models((f"{L}/ft_a", {"weight": 0.3}), (f"{L}/ft_b", {"weight": 0.5}), (f"{L}/base", {"weight": 0.2})),
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["karcher_llama_f32"] = {
    "merge_method": "karcher",
    "models": models((f"{L}/base", None), (f"{L}/ft_a", None), (f"{L}/ft_b", None)),
    "parameters": {"max_iter": 20},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["nuslerp_llama_f32"] = {
    "merge_method": "nuslerp",
    "base_model": f"{L}/base",
    "models": models((f"{L}/ft_a", {"weight": 0.6}), (f"{L}/ft_b", {"weight": [0.2, 0.7]})),
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["nuslerp_llama_rows_nobase_f32"] = {
    "merge_method": "nuslerp",
    "models": models((f"{L}/ft_a", {"weight": 0.6}), (f"{L}/ft_b", {"weight": 0.3})),
    "parameters": {"nuslerp_flatten": False},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["nuslerp_llama_columns_f32"] = {
    "merge_method": "nuslerp",
    "base_model": f"{L}/base",
    "models": models((f"{L}/ft_a", {"weight": 0.5}), (f"{L}/ft_b", {"weight": 0.5})),
    "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["arcee_fusion_llama_f32"] = {
    "merge_method": "arcee_fusion",
    "base_model": f"{L}/base",
    "models": models((f"{L}/base", None), (f"{L}/ft_a", None)),
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["ram_llama_f32"] = {
    "merge_method": "ram",
    "base_model": f"{L}/base",
    "models": models((f"{L}/ft_a", None), (f"{L}/ft_b", None)),
    "parameters": {"epsilon": 0.01},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}
CASES["ramplus_tl_llama_f32"] = {
    "merge_method": "ramplus_tl",
    "base_model": f"{L}/base",
    "models": models((f"{L}/ft_a", None), (f"{L}/ft_b", None)),
    "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.8},
    "dtype": "float32",
    "out_dtype": "bfloat16",
}


def main():
    torch.set_num_threads(1)
    wanted = sys.argv[1:] or list(CASES)
    for name in wanted:
        cfg = CASES[name]
        out_dir = os.path.join("fixtures", "expected", name)
        os.makedirs(out_dir, exist_ok=True)
        text = yaml.safe_dump(cfg, sort_keys=False)
        with tempfile.TemporaryDirectory() as tmp:
            merge_cfg = MergeConfiguration.model_validate(mergekit_view(cfg, tmp))
            out = os.path.join(tmp, "out")
            run_merge(
                merge_cfg,
                out,
                MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
            )
            shutil.copy(os.path.join(out, "model.safetensors"), os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.yml"), "w") as f:
            f.write(f"# Generated by tools/mergekit-parity with mergekit 0.1.5, torch {torch.__version__}.\n")
            f.write(text)
        print(f"{name}: {out_dir}")


if __name__ == "__main__":
    main()
