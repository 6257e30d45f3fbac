"""HF LLaMA `config.json` <-> ModelConfig, without jax: config files and the fine-tune
config read a model's shape before jax starts (its device count is set from the config)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ringformer.config import ModelConfig
from ringformer.errors import CheckpointError, ConfigError
from ringformer.limits import FLOAT32_MAX, INT32_MAX

# What a HF config.json decides; everything else (dtype, remat, chunks, mesh) is the run's.
HF_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta",
             "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
             "rope_high_freq_factor", "rope_original_max_position", "max_position", "norm_eps",
             "tie_embeddings")

# Fields that are sizes or divisors: 0, negative, non-finite or past int32 cannot build a
# model (zero heads divides by zero, theta 0 gives NaN rotations), whatever tool reads them.
_POSITIVE = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
             "intermediate_size", "vocab_size", "head_dim", "rms_norm_eps", "rope_theta")
_ROPE_POSITIVE = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")


def _check_numbers(hf: dict[str, Any], rope: dict[str, Any]) -> None:
    fields = [(k, hf[k]) for k in _POSITIVE if hf.get(k) is not None]
    fields += [(f"rope {k}", rope[k]) for k in _ROPE_POSITIVE if rope.get(k) is not None]
    if hf.get("max_position_embeddings") not in (None, 0):
        fields.append(("max_position_embeddings", hf["max_position_embeddings"]))
    for key, v in fields:
        ok = (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
              and 0 < v <= (INT32_MAX if isinstance(v, int) else FLOAT32_MAX))
        if not ok:
            raise ConfigError(f"config.json {key}={v!r} is not a positive finite number",
                              "the directory's config.json is damaged or not a usable LLaMA:"
                              " fix it or use another checkpoint")


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a parsed HF `config.json` (transformers 4.x or 5.x spelling).

    `overrides` set ModelConfig fields the HF file does not describe (dtype, remat, chunks,
    `attention=AttentionConfig(...)`, ...). Raises ConfigError for architectures this model cannot reproduce.
    """
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"model_type={hf.get('model_type')!r} is not a LLaMA checkpoint",
                          "convert a model_type='llama' directory")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported", "only SwiGLU (silu) LLaMA")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{flag}=true is not supported", "use a LLaMA without biases")
    # transformers 5 nests rope under rope_parameters; 4.x has rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    _check_numbers(hf, rope)
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ConfigError(f"head_dim={head_dim} x num_attention_heads={heads} != "
                          f"hidden_size={dim}", "only head_dim = hidden_size / heads is supported")

    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    max_pos = int(hf.get("max_position_embeddings", 0) or 0)
    kw: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads, n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_dim=int(hf["intermediate_size"]), rope_theta=theta, max_position=max_pos,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if kind == "default":
        kw["rope_scaling"] = "none"
    elif kind == "linear":
        kw.update(rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
    elif kind == "llama3":
        kw.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_position=int(rope.get("original_max_position_embeddings",
                                                          max_pos)))
    else:
        raise ConfigError(f"rope type {kind!r} is not supported",
                          "use a checkpoint with default, linear or llama3 rope scaling")
    kw.update(overrides)
    return ModelConfig(**kw)


def check_exportable(cfg: ModelConfig) -> None:
    """ConfigError for a model transformers' LLaMA cannot compute."""
    if cfg.smear_keys:
        raise ConfigError("a model with model.smear_keys has no Hugging Face LLaMA equivalent",
                          "export a run trained without smeared keys")
    if cfg.logn_base:
        raise ConfigError("a model with model.logn_base has no Hugging Face LLaMA equivalent",
                          "export a run trained with model.logn_base=0")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild `cfg`'s architecture."""
    check_exportable(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position or 2048, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope, "attention_bias": False, "mlp_bias": False,
        "dtype": cfg.param_dtype, "initializer_range": cfg.init_std,
    }


def read_config(hf_dir: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a local HF LLaMA directory, from its config.json alone (no weights
    are read, so a caller can check it against a run's config cheaply)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist",
                              "point at a Hugging Face LLaMA directory (config.json + safetensors)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise CheckpointError(f"cannot read {path}: {e}", "check the file is valid JSON") from e
    try:
        if not isinstance(hf, dict):
            raise TypeError(f"a JSON {type(hf).__name__}, not an object")
        cfg = config_from_hf(hf, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path} lacks or mangles a LLaMA field ({e})",
                          "use a config.json written by transformers") from e
    return cfg


def model_fields(source: str) -> dict:
    """The model's identity (`HF_FIELDS`) from where it already is: a HF LLaMA directory's
    config.json, or a ringformer workdir's config.json (an import or a run). jax-free, so a
    config file can call it (configs/finetune.py) before jax starts."""
    path = Path(source)
    if (path / "checkpoints").is_dir():
        try:
            model = json.loads((path / "config.json").read_text())["model"]
            return {k: model[k] for k in HF_FIELDS}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the model of the run in {source} from its config.json "
                            f"({type(e).__name__}: {e})",
                            "point at a workdir written by convert_hf.py import or a training run"
                            ) from e
    if (path / "config.json").is_file():
        cfg = read_config(source)
        return {k: getattr(cfg, k) for k in HF_FIELDS}
    raise CheckpointError(f"{source!r} is neither a ringformer workdir nor a Hugging Face model directory",
                    "point at a workdir with checkpoints/ or a directory with config.json")
