"""Hugging Face LLaMA checkpoints <-> ringformer parameters, with numpy and safetensors only.

A local HF directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. HF stores `nn.Linear` weights as [out, in]; ringformer keeps
[in, out] with heads split out (wq [d, h, k], wo [h, k, d]), stacked over layers.

Rotary layout: Meta's original checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...;
transformers' conversion script permutes the rows of q_proj/k_proj once so that the
rotate-half form (x[:k/2], x[k/2:]) applies. HF directories are therefore already in
rotate-half order, which is what `model.apply_rope` uses, so q/k rows map over unchanged; a
second permutation here would silently break every position but 0. `save_llama` keeps the
same order, so an exported directory loads in transformers as is. (Meta-native weights,
interleaved, would need transformers' convert_llama_weights_to_hf first.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ringformer.config import ModelConfig
from ringformer.errors import CheckpointError
from ringformer.hf.hf_config import check_exportable, config_to_hf, read_config
from ringformer.hf.hf_config import config_from_hf as config_from_hf  # re-exported
from ringformer.model import param_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------- config


# The config.json side lives in hf_config (jax-free: config files read it before jax starts).


# ----------------------------------------------------------------------------- tensors


def _reason(e: Exception) -> str:
    """One line of `e` for an error message (safetensors quotes its messages)."""
    lines = str(e).strip().strip("'\"").splitlines()
    return lines[0] if lines else type(e).__name__


def _open(path: str) -> Any:
    """safe_open, with a damaged file (cut short, not safetensors) as a CheckpointError."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {_reason(e)}",
                              "the file is damaged or incomplete: copy or download it again"
                              ) from e


def _tensor_files(hf_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file path, for a single file or an index of shards."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"cannot read the shard list {index} ({type(e).__name__}: {e})",
                                  "copy it again; it must be JSON with a weight_map of tensor "
                                  "name -> shard file") from e
    single = os.path.join(hf_dir, SINGLE)
    if not os.path.exists(single):
        raise CheckpointError(f"{hf_dir} has neither {SINGLE} nor {INDEX}",
                              "point at a Hugging Face LLaMA directory saved with safetensors")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


class _Reader:
    """Reads tensors on demand, keeping each shard file open once."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.handles: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint",
                                  "check that the directory holds a complete LlamaForCausalLM")
        path = self.files[name]
        if path not in self.handles:
            if not os.path.exists(path):
                raise CheckpointError(f"shard {path} listed in {INDEX} does not exist",
                                      "copy every shard of the checkpoint")
            self.handles[path] = _open(path)
        try:
            x = self.handles[path].get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            # e.g. a dtype numpy cannot hold, or a shard whose header lacks a tensor the index
            # assigns to it.
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {_reason(e)}",
                                  "the file is damaged or not a LLaMA checkpoint: copy it again"
                                  ) from e
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(x.shape)}, config.json "
                                  f"implies {tuple(shape)}", "check config.json against weights")
        return x


def _mapping(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """ringformer leaf -> (HF name pattern, hf->ours, ours->hf) per layer (pattern has {i})."""
    d, h, g, k = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ident = lambda w: w
    return {
        "wq": ("model.layers.{i}.self_attn.q_proj.weight",
               lambda w: w.T.reshape(d, h, k), lambda w: w.reshape(d, h * k).T),
        "wk": ("model.layers.{i}.self_attn.k_proj.weight",
               lambda w: w.T.reshape(d, g, k), lambda w: w.reshape(d, g * k).T),
        "wv": ("model.layers.{i}.self_attn.v_proj.weight",
               lambda w: w.T.reshape(d, g, k), lambda w: w.reshape(d, g * k).T),
        "wo": ("model.layers.{i}.self_attn.o_proj.weight",
               lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T),
        "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", np.transpose, np.transpose),
        "w_up": ("model.layers.{i}.mlp.up_proj.weight", np.transpose, np.transpose),
        "w_down": ("model.layers.{i}.mlp.down_proj.weight", np.transpose, np.transpose),
        "attn_norm": ("model.layers.{i}.input_layernorm.weight", ident, ident),
        "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", ident, ident),
    }


def _hf_shape(ours: tuple[int, ...], to_hf: Callable) -> tuple[int, ...]:
    return tuple(to_hf(np.empty(ours, np.int8)).shape)


def load_llama(hf_dir: str, **overrides: Any) -> tuple[ModelConfig, dict]:
    """Read a local HF LLaMA directory into (ModelConfig, params) as host numpy arrays.

    Params come back in `param_dtype` (fp32 by default) with ringformer's tree structure;
    place them with `jax.device_put(params, sharding.param_shardings(...))`. `overrides` set
    the ModelConfig fields HF does not describe (dtype, remat, attention impl, chunks, ...).
    """
    cfg = read_config(hf_dir, **overrides)
    dtype = _NP_DTYPES[cfg.param_dtype]
    reader = _Reader(_tensor_files(hf_dir))
    shapes = param_shapes(cfg)

    def read(name: str, shape: tuple[int, ...], to_ours: Callable, to_hf: Callable):
        return np.ascontiguousarray(to_ours(reader.get(name, _hf_shape(shape, to_hf)))).astype(
            dtype)

    layers = {}
    for leaf, (pattern, to_ours, to_hf) in _mapping(cfg).items():
        shape = shapes["layers"][leaf][1:]
        layers[leaf] = np.stack([read(pattern.format(i=i), shape, to_ours, to_hf)
                                 for i in range(cfg.n_layers)])
    ident = lambda w: w
    params = {
        "embed": read("model.embed_tokens.weight", shapes["embed"], ident, ident),
        "layers": layers,
        "final_norm": read("model.norm.weight", shapes["final_norm"], ident, ident),
    }
    if not cfg.tie_embeddings:
        if not reader.has("lm_head.weight"):
            raise CheckpointError("lm_head.weight is missing but tie_word_embeddings is false",
                                  "set tie_word_embeddings=true in config.json if it is tied")
        params["lm_head"] = read("lm_head.weight", shapes["lm_head"], np.transpose, np.transpose)
    return cfg, params


def save_llama(cfg: ModelConfig, params: dict, out_dir: str) -> None:
    """Write config.json + model.safetensors that `LlamaForCausalLM.from_pretrained` loads.

    Tensors are written in `param_dtype`. Params may be sharded jax arrays; they are gathered
    to this host one at a time (single-process runs; multi-host export should gather first).
    """
    check_exportable(cfg)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a parent is a file, or not writable
        raise CheckpointError(f"cannot create {out_dir}: {e.strerror or e}",
                              "choose an output directory whose parents are writable directories"
                              ) from e
    dtype = _NP_DTYPES[cfg.param_dtype]
    host = lambda x: np.asarray(jax.device_get(x)).astype(dtype)
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": host(params["embed"]),
        "model.norm.weight": host(params["final_norm"]),
    }
    for leaf, (pattern, _, to_hf) in _mapping(cfg).items():
        stacked = host(params["layers"][leaf])
        for i in range(cfg.n_layers):
            tensors[pattern.format(i=i)] = to_hf(stacked[i])
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = host(params["lm_head"]).T
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    # Write to temporary names first so a crash never leaves a half-written directory behind.
    tmp_weights = os.path.join(out_dir, SINGLE + ".tmp")
    tmp_cfg = os.path.join(out_dir, "config.json.tmp")
    try:
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        with open(tmp_cfg, "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)
    except BaseException as e:
        for tmp in (tmp_weights, tmp_cfg):
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError | SafetensorError):  # e.g. disk full: nothing was replaced
            raise CheckpointError(f"cannot write {out_dir}: {_reason(e)}",
                                  "free space or choose another output directory") from e
        raise
    os.replace(tmp_weights, os.path.join(out_dir, SINGLE))
    os.replace(tmp_cfg, os.path.join(out_dir, "config.json"))

