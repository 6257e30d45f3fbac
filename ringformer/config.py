"""Every setting once: allowed values, defaults, typed sections and the checks on them.

The frozen dataclasses below are the one place a default is written: `default_config()`
builds the ConfigDict sections from their fields, and `ModelConfig.from_config` (and every
other `Section.from_section`) builds them back from a ConfigDict. Every experiment in
`configs/` starts from `default_config()` and overrides what it needs. `validate(config,
n_devices)` runs before anything is compiled and raises `ConfigError` with a one-line reason
and a fix, so a bad run fails in a second, not after a compile. The rules shared with code
that checks arrays or flags (heads by kv_heads, kv_heads by tp, batch by dp*fsdp, ...) are
functions here that those callers use. No jax: scripts import this before jax starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import ml_collections

from ringformer import limits
from ringformer.data import mixture
from ringformer.errors import ConfigError
from ringformer.ops import layouts

# The layout names live with what each layout is; re-exported here with the other choices.
LAYOUTS = layouts.LAYOUTS
IMPLS = ("ring", "blockwise", "dense")
PIPELINE_GRADS = ("auto", "on", "off")
KERNELS = ("xla", "pallas")
SCHEDULES = ("cosine", "linear", "constant")
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims")
ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("dp", "fsdp", "sp", "tp")


class Section:
    """A frozen, typed view of one ConfigDict section; the fields' defaults are the defaults."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The section's keys and defaults, in field order (nested sections left out)."""
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    @classmethod
    def from_section(cls, values: Mapping[str, Any], name: str = "") -> Self:
        """From a complete section (ConfigDict or dict); a missing key is a ConfigError."""
        keys = cls.defaults()
        missing = [k for k in keys if k not in values]
        _need(not missing, f"config key {name or cls.__name__}.{missing[0] if missing else ''} is missing",
              "start the config from ringformer.config.default_config()")
        return cls(**{k: values[k] for k in keys})


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    steps: int = 100
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    skip_nonfinite: bool = False  # opt in: skip (and count) steps with a non-finite loss
    init_from: str = ""  # a local HF LLaMA dir or a ringformer workdir to start from
    peak_flops: float = 0.0  # per device FLOP/s for MFU; 0 measures a matmul at start-up


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    dp: int = 1
    fsdp: int = -1  # -1: the devices the other axes leave
    sp: int = 1
    tp: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    train_files: str = "data/stdlib/train.jsonl"  # or a list of paths
    eval_files: str = "data/stdlib/eval.jsonl"
    text_field: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 2048
    global_batch_size: int = 8
    cache_dir: str = ""  # empty: next to the data files
    # Weighted training sources "FILES:WEIGHT[:TOKENS:REPEAT],..."; empty: train_files alone.
    sources: str = ""
    min_doc_tokens: int = 0  # training documents shorter than this are dropped (BOS+text+EOS)
    max_doc_tokens: int = 0  # ... and longer than this; 0: no limit
    upsample_long: str = ""  # "TOKENS:REPEAT": repeat documents of TOKENS or more in each epoch


@dataclasses.dataclass(frozen=True)
class AttentionConfig(Section):
    impl: str = "ring"
    # Balanced causal work per ring step: measured 1.1-1.35x faster than contiguous with one
    # device per core (docs/BENCHMARKS.md, `bench.py layout`); the data path applies it once.
    layout: str = "zigzag"
    q_chunk: int = 256
    kv_chunk: int = 256
    # Ring backward: send each block's dk/dv one step late so the send overlaps compute, for
    # one more fp32 dk/dv block of memory. auto: on for GPU/TPU meshes, off on CPU (no overlap).
    pipeline_grads: str = "auto"
    # The per-block kernel: "xla" (plain XLA ops, any backend) or "pallas" (fused Triton
    # kernels for GPUs; unmeasured so far, see docs/BENCHMARKS.md, gpu).
    kernel: str = "xla"

    def __post_init__(self) -> None:
        check_attention(self)


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0: no clipping
    grad_accum_steps: int = 1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """Everything the model computes with; frozen (and hashable) so it can be a static jit
    argument. `config.model` plus `config.attention`, which it holds as `attention`."""

    vocab_size: int = 259  # the byte tokenizer: 256 bytes + pad, eos, unk
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 704
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    # llama3 scaling only (transformers' names: low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); Llama 3.1's values.
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position: int = 0  # 0: no limit checked; otherwise the context the model was built for
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Each key mixes in its predecessor's (smeared keys, Olsson et al. 2022): a one-layer
    # path to copying by content (docs/long_context.md). Not a LLaMA: no HF export.
    smear_keys: bool = False
    # Tokens back a smeared key reaches. 1: a weight per kv head. 2: per channel, keys mix the
    # two before them and queries the one before, so a head matches "key is", not any "is".
    smear_tokens: int = 1
    # Queries at p (0 at their document's start) times max(1, log_base(p + 1)), Qwen's log-n
    # attention: logits sharpen as the keys they spread over multiply. 0: off; no HF export.
    logn_base: int = 0
    init_std: float = 0.02
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "full"
    mlp_chunk: int = 512
    loss_chunk: int = 512
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        check_model(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def with_attention(self, **changes: Any) -> ModelConfig:
        """This config with some attention settings changed (`layout="contiguous"`, ...)."""
        return dataclasses.replace(self, attention=dataclasses.replace(self.attention, **changes))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ModelConfig:
        """From the full ConfigDict: `config.model` and `config.attention`.

        Keys this class does not know are ignored and missing ones keep their defaults: a run
        saved before a key existed ran with what is now its default, and must still restore.
        """
        kw = {k: v for k, v in dict(config.model).items() if k in cls.defaults()}
        attn = dict(config.get("attention", {}))
        kw["attention"] = AttentionConfig(**{k: attn[k] for k in AttentionConfig.defaults() if k in attn})
        # A model trained past the positions it was built for (a context-extension stage from
        # an imported LLaMA) supports the context it was trained at.
        trained = int(config.get("data", {}).get("seq_len", 0))
        if kw.get("max_position", 0) > 0:
            kw["max_position"] = max(kw["max_position"], trained)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The inverse of `to_dict`; unknown keys are ignored."""
        kw = {k: v for k, v in d.items() if k in cls.defaults()}
        attn = dict(d.get("attention") or {})
        # Backward compatibility, reading only: ModelConfigs written before the attention
        # settings were nested held them flat under these names.
        for old, new in _FLAT_ATTENTION_KEYS.items():
            if old in d and new not in attn:
                attn[new] = d[old]
        kw["attention"] = AttentionConfig(**{k: attn[k] for k in AttentionConfig.defaults() if k in attn})
        return cls(**kw)


_FLAT_ATTENTION_KEYS = {"attn_impl": "impl", "attn_layout": "layout", "q_chunk": "q_chunk",
                        "kv_chunk": "kv_chunk", "attn_pipeline_grads": "pipeline_grads",
                        "attn_kernel": "kernel"}
SECTIONS: dict[str, type[Section]] = dict(train=TrainConfig, mesh=MeshConfig, data=DataConfig,
                                          model=ModelConfig, attention=AttentionConfig, optim=OptimConfig)


def config_module(path: str | os.PathLike):
    """The config file at `path` as a module (its `get_config` builds the ConfigDict). Config
    files live outside the package and are loaded by path, so a config that extends another
    (configs/longctx_stage2.py on stage 1) and the benchmark tools load it through this."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_config() -> ml_collections.ConfigDict:
    """Every section with every key at its default (the dataclass fields above)."""
    return ml_collections.ConfigDict({name: cls.defaults() for name, cls in SECTIONS.items()})


# ----------------------------------------------------------------------------- rules


def _need(cond: bool, what: str, fix: str) -> None:
    if not cond:
        raise ConfigError(what, fix)


def _choice(value, choices, name: str) -> None:
    _need(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}",
          f"set --config.{name} to one of them")


def check_heads(n_heads: int, n_kv_heads: int, *, label: str = "model.") -> None:
    """Grouped-query attention: each key/value head serves a whole number of query heads."""
    _need(n_heads % n_kv_heads == 0,
          f"{label}n_heads={n_heads} is not divisible by {label}n_kv_heads={n_kv_heads}",
          "choose n_kv_heads that divides n_heads")


def check_tp(n_kv_heads: int, tp: int, *, n_heads: int, ffn_dim: int | None = None,
             label: str = "model.") -> None:
    """Tensor parallelism splits the key/value heads (so the query heads) and the MLP."""
    _need(n_kv_heads % tp == 0,
          f"{label}n_kv_heads={n_kv_heads} (and n_heads={n_heads}) not divisible by mesh.tp={tp}",
          "choose tp that divides n_kv_heads")
    _need(ffn_dim is None or ffn_dim % tp == 0,
          f"{label}ffn_dim={ffn_dim} not divisible by mesh.tp={tp}", "choose tp that divides ffn_dim")


def check_batch(batch: int, shards: int, *, label: str = "data.global_batch_size",
                accum: int | None = None) -> None:
    """The batch splits evenly over dp x fsdp (and into `accum` microbatches, if given)."""
    per = "" if accum is None else f" x grad_accum_steps={accum}"
    _need(batch % (shards * (accum or 1)) == 0,
          f"{label}={batch} is not divisible by dp*fsdp={shards}{per}",
          f"use a multiple of {shards * (accum or 1)}")


def check_seq(seq_len: int, sp: int, *, label: str = "data.seq_len") -> int:
    """The sequence splits evenly over the sp ring; returns the tokens per device."""
    _need(seq_len % sp == 0, f"{label}={seq_len} is not divisible by mesh.sp={sp}",
          f"use a multiple of {sp}")
    return seq_len // sp


def check_attention(a) -> None:
    """The attention section alone (a ConfigDict or an AttentionConfig)."""
    _choice(a.impl, IMPLS, "attention.impl")
    _choice(a.layout, LAYOUTS, "attention.layout")
    _choice(a.pipeline_grads, PIPELINE_GRADS, "attention.pipeline_grads")
    _choice(a.kernel, KERNELS, "attention.kernel")
    for k in ("q_chunk", "kv_chunk"):
        _need(getattr(a, k) > 0, f"attention.{k}={getattr(a, k)} must be positive",
              f"set --config.attention.{k}")


def check_model(m) -> None:
    """The model section alone (a ConfigDict or a ModelConfig): what the model can compute."""
    _choice(m.remat, REMAT_POLICIES, "model.remat")
    _choice(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")
    for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "mlp_chunk",
              "loss_chunk"):
        _need(getattr(m, k) > 0, f"model.{k}={getattr(m, k)} must be positive", f"set --config.model.{k}")
    check_heads(m.n_heads, m.n_kv_heads)
    _need(m.smear_tokens in (1, 2), f"model.smear_tokens={m.smear_tokens} is not 1 or 2",
          "set --config.model.smear_tokens=1 (the predecessor) or 2 (two tokens back)")
    _need(m.smear_tokens == 1 or m.smear_keys, f"model.smear_tokens={m.smear_tokens} without"
          " model.smear_keys", "set --config.model.smear_keys=True, or smear_tokens=1")
    _need(m.dim % m.n_heads == 0, f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}",
          "choose n_heads that divides dim")
    _need((m.dim // m.n_heads) % 2 == 0, f"head_dim={m.dim // m.n_heads} is odd",
          "rotary embeddings need an even head_dim")
    _need(m.logn_base == 0 or m.logn_base >= 2, f"model.logn_base={m.logn_base} is not 0 or at"
          " least 2", "set --config.model.logn_base=0 (off) or the context trained at, e.g. 4096")
    # Each is a divisor or a base in model.py: 0 or less gives inf/NaN, first seen as a
    # non-finite loss after the compile (and a negative factor runs, with nonsense positions).
    for k, example in (("rope_theta", 10000.0), ("norm_eps", 1e-5)):
        v = getattr(m, k)
        _need(v > 0, f"model.{k}={v} must be positive", f"set --config.model.{k}, e.g. {example}")
    if m.rope_scaling != "none":
        _need(m.rope_scaling_factor > 0,
              f"model.rope_scaling_factor={m.rope_scaling_factor} must be positive with"
              f" rope_scaling={m.rope_scaling!r}",
              "set --config.model.rope_scaling_factor, e.g. 8.0, or model.rope_scaling='none'")
    if m.rope_scaling == "llama3":
        lo, hi = m.rope_low_freq_factor, m.rope_high_freq_factor
        _need(0 < lo < hi, f"model.rope_low_freq_factor={lo} and rope_high_freq_factor={hi} need"
              " 0 < low < high: llama3 scaling divides by both and by their difference",
              "use e.g. Llama 3.1's low 1.0, high 4.0")
        _need(m.rope_original_max_position > 0,
              f"model.rope_original_max_position={m.rope_original_max_position} must be positive",
              "set it to the context the model was pre-trained at, e.g. 8192")


# ----------------------------------------------------------------------------- whole configs


def parse_mesh_flag(text: str) -> dict[str, int]:
    """Parse `dp=1,fsdp=1,sp=4,tp=1` (missing axes default to 1, one may be -1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ConfigError(f"bad --mesh entry {part!r}", "write e.g. --mesh dp=1,fsdp=1,sp=4,tp=1")
        sizes[name] = int(value)
    return sizes


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Resolve -1 in (dp, fsdp, sp, tp) against the device count; raise ConfigError if it cannot fit."""
    sizes = {n: int(mesh_cfg[n]) for n in MESH_AXES}
    fill = [n for n in MESH_AXES if sizes[n] == -1]
    _need(len(fill) <= 1, f"mesh has -1 in {len(fill)} axes ({', '.join(fill)})",
          "use -1 for at most one of dp, fsdp, sp, tp")
    for n in MESH_AXES:
        _need(sizes[n] == -1 or sizes[n] >= 1, f"mesh.{n}={sizes[n]} must be positive",
              "use a positive size or -1 to fill")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        _need(n_devices % known == 0,
              f"mesh {sizes} cannot fill {n_devices} devices: {n_devices} is not divisible by {known}",
              "choose axis sizes whose product divides the device count")
        sizes[fill[0]] = n_devices // known
    total = sizes["dp"] * sizes["fsdp"] * sizes["sp"] * sizes["tp"]
    _need(total == n_devices,
          f"mesh dp={sizes['dp']} x fsdp={sizes['fsdp']} x sp={sizes['sp']} x tp={sizes['tp']}"
          f" = {total} devices, but {n_devices} are available",
          "make the product equal the device count, or set one axis to -1")
    return sizes


_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _type_ok(value, default, key: str) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int to Python, never a size or a rate here
        return False
    if isinstance(default, int):
        return isinstance(value, numbers.Integral)
    if isinstance(default, float):
        return isinstance(value, numbers.Real)
    if isinstance(default, str) and key.endswith("_files") and isinstance(value, list | tuple):
        return all(isinstance(v, str) for v in value)  # the data readers take a list of paths
    return isinstance(value, type(default))


def check_structure(config) -> None:
    """Every section and key of `default_config()` is there, with a value of the default's type.

    A config file that builds its own ConfigDict, deletes a key or sets one to None otherwise
    fails as an AttributeError or TypeError wherever the key is first read, sometimes after
    minutes of compiling; a key the defaults lack would be silently ignored.
    """
    fix = "start get_config() from ringformer.config.default_config(), as configs/tiny.py does"
    _need(isinstance(config, ml_collections.ConfigDict),
          f"the config is a {type(config).__name__}, not an ml_collections.ConfigDict", fix)
    defaults = default_config()
    for section, keys in defaults.items():
        given = config.get(section)
        _need(isinstance(given, ml_collections.ConfigDict), f"config section {section!r} is missing"
              if given is None else f"config section {section!r} is a {type(given).__name__}", fix)
        for key, default in keys.items():
            _need(key in given, f"config key {section}.{key} is missing",
                  f"add it, default {default!r}, or {fix}")
            value = given[key]
            kind = _KINDS.get(type(default), type(default).__name__)
            unset = "; '' leaves it unset" if default == "" else ""
            _need(_type_ok(value, default, key), f"{section}.{key}={value!r} is not {kind}",
                  f"set --config.{section}.{key} to {kind} like the default {default!r}{unset}")
        unknown = sorted(set(given) - set(keys))
        _need(not unknown, f"unknown config key {section}.{unknown[0] if unknown else ''}",
              "every key and its default is in ringformer/config.py")
    unknown = sorted(set(config) - set(defaults))
    _need(not unknown, f"unknown config section {unknown[0] if unknown else ''!r}",
          f"use only the sections {', '.join(defaults)}")
    # inf, NaN and sizes past int32 pass the type check but break deep inside jax or optax.
    limits.check_values(config)


def validate(config: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    """Check everything that can be checked without compiling; return the resolved mesh shape."""
    check_config(config)
    return _check_mesh(config, n_devices)


def check_config(config) -> None:
    """What `validate` checks without knowing the device count; runs before jax is imported."""
    check_structure(config)
    t, d, o = config.train, config.data, config.optim
    _need(t.steps > 0, f"train.steps={t.steps} must be positive", "set --config.train.steps=N with N >= 1")
    for k in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
        _need(t[k] > 0, f"train.{k}={t[k]} must be positive", f"set --config.train.{k} to 1 or more")
    _need(t.eval_batches >= 0, f"train.eval_batches={t.eval_batches} is negative",
          "set --config.train.eval_batches to 1 or more")
    # 0 batches would evaluate nothing, silently; an empty data.eval_files is the one off switch.
    _need(t.eval_batches > 0 or not d.eval_files,
          f"train.eval_batches=0 evaluates nothing, though data.eval_files={d.eval_files!r} is set",
          "set --config.train.eval_batches to 1 or more, or --config.data.eval_files= for no evaluation")
    _need(o.lr > 0, f"optim.lr={o.lr} must be positive", "set --config.optim.lr to e.g. 3e-4")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} is negative", "use 0 or more")
    _need(o.grad_accum_steps >= 1, f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1",
          "use 1 for no accumulation")
    _need(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} is negative", "use 0 to disable clipping")
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    check_attention(config.attention)
    check_model(config.model)
    _need(d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be positive",
          "set --config.data.global_batch_size to 1 or more")
    _need(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive", "set --config.data.seq_len")
    check_data_mixture(d)


def check_data_mixture(d) -> None:
    """data.sources, the length filters and up-sampling (parsed by ringformer.data.mixture)."""
    mixture.parse_sources(d.sources, d.upsample_long)
    for k in ("min_doc_tokens", "max_doc_tokens"):
        _need(d[k] >= 0, f"data.{k}={d[k]} is negative", f"set --config.data.{k} to 0 (no limit) or more")
    _need(not d.max_doc_tokens or d.max_doc_tokens >= d.min_doc_tokens,
          f"data.max_doc_tokens={d.max_doc_tokens} is below data.min_doc_tokens={d.min_doc_tokens}",
          "raise data.max_doc_tokens (0: no limit) or lower data.min_doc_tokens")


def _check_mesh(config: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    d, m, a, o = config.data, config.model, config.attention, config.optim
    mesh = mesh_shape(config.mesh, n_devices)
    sp, tp = mesh["sp"], mesh["tp"]
    check_tp(m.n_kv_heads, tp, n_heads=m.n_heads, ffn_dim=m.ffn_dim)
    check_batch(d.global_batch_size, mesh["dp"] * mesh["fsdp"], accum=o.grad_accum_steps)
    local = check_seq(d.seq_len, sp)
    unit = layouts.pieces(a.layout, sp)
    _need(d.seq_len % unit == 0, f"data.seq_len={d.seq_len} does not split into the {unit} pieces"
          f" of the {a.layout} layout over mesh.sp={sp}", f"use a data.seq_len that is a multiple of {unit}")
    per_device = local if a.impl == "ring" else d.seq_len
    for k in ("q_chunk", "kv_chunk"):
        c = min(a[k], per_device)
        _need(per_device % c == 0,
              f"attention.{k}={a[k]} does not divide the {per_device} tokens each device attends over"
              f" (seq_len={d.seq_len}, sp={sp})",
              f"use a chunk that divides {per_device}")
    if a.kernel == "pallas":
        _need(a.impl != "dense" and per_device % 128 == 0,
              f"attention.kernel='pallas' needs ring or blockwise attention over a multiple of 128"
              f" tokens per device; this config has impl={a.impl!r} over {per_device}",
              "use attention.kernel='xla' or a data.seq_len giving a multiple of 128 per device")
    for k in ("mlp_chunk", "loss_chunk"):
        c = min(m[k], local)
        _need(local % c == 0,
              f"model.{k}={m[k]} does not divide the {local} tokens per device"
              f" (seq_len={d.seq_len}, sp={sp})",
              f"use a chunk that divides {local}")
    if a.impl != "ring":
        _need(sp == 1, f"attention.impl={a.impl!r} cannot split the sequence over mesh.sp={sp}",
              "use attention.impl='ring' or mesh.sp=1")
    return mesh
