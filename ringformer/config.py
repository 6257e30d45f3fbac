"""Configuration defaults and start-up validation.

Every experiment in `configs/` starts from `default_config()` and overrides what it needs.
`validate(config, n_devices)` runs before anything is compiled and raises `ConfigError`
with a one-line reason and a fix, so a bad run fails in a second, not after a compile.
"""

from __future__ import annotations

import numbers

import ml_collections

from ringformer.errors import ConfigError

IMPLS = ("ring", "blockwise", "dense")
LAYOUTS = ("contiguous", "striped", "zigzag")
PIPELINE_GRADS = ("auto", "on", "off")
KERNELS = ("xla", "pallas")
SCHEDULES = ("cosine", "linear", "constant")
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims")
ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("dp", "fsdp", "sp", "tp")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.save_every = 50
    c.train.keep_checkpoints = 3
    c.train.seed = 0
    c.train.skip_nonfinite = False  # opt in: skip (and count) steps with a non-finite loss
    c.train.init_from = ""  # a local HF LLaMA dir or a ringformer workdir to start from
    c.train.peak_flops = 0.0  # per device FLOP/s for MFU; 0 measures a matmul at start-up

    c.mesh = ml_collections.ConfigDict()
    c.mesh.dp = 1
    c.mesh.fsdp = -1
    c.mesh.sp = 1
    c.mesh.tp = 1

    c.data = ml_collections.ConfigDict()
    c.data.train_files = "data/stdlib/train.jsonl"
    c.data.eval_files = "data/stdlib/eval.jsonl"
    c.data.text_field = "text"
    c.data.tokenizer = "byte"
    c.data.seq_len = 2048
    c.data.global_batch_size = 8
    c.data.cache_dir = ""  # empty: next to the data files

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 259  # the byte tokenizer: 256 bytes + pad, eos, unk
    c.model.dim = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.n_kv_heads = 4
    c.model.ffn_dim = 704
    c.model.rope_theta = 10000.0
    c.model.rope_scaling = "none"
    c.model.rope_scaling_factor = 1.0
    # llama3 scaling only (transformers' names: low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); Llama 3.1's values.
    c.model.rope_low_freq_factor = 1.0
    c.model.rope_high_freq_factor = 4.0
    c.model.rope_original_max_position = 8192
    c.model.max_position = 0  # 0: no limit checked; otherwise the context the model was built for
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.init_std = 0.02
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.mlp_chunk = 512
    c.model.loss_chunk = 512

    c.attention = ml_collections.ConfigDict()
    c.attention.impl = "ring"
    # Balanced causal work per ring step: measured 1.1-1.35x faster than contiguous with one
    # device per core (docs/BENCHMARKS.md, `bench.py layout`); the data path applies it once.
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 256
    c.attention.kv_chunk = 256
    # Ring backward: send each block's dk/dv one step late so the send overlaps compute, for
    # one more fp32 dk/dv block of memory. auto: on for GPU/TPU meshes, off on CPU (no overlap).
    c.attention.pipeline_grads = "auto"
    # The per-block kernel: "xla" (plain XLA ops, any backend) or "pallas" (fused Triton
    # kernels for GPUs; unmeasured so far, see docs/BENCHMARKS.md, gpu).
    c.attention.kernel = "xla"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.grad_accum_steps = 1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    return c


def _need(cond: bool, what: str, fix: str) -> None:
    if not cond:
        raise ConfigError(what, fix)


def _choice(value, choices, name: str) -> None:
    _need(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}",
          f"set --config.{name} to one of them")


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
    names = MESH_AXES
    sizes = {n: int(mesh_cfg[n]) for n in names}
    fill = [n for n in names if sizes[n] == -1]
    _need(len(fill) <= 1, f"mesh has -1 in {len(fill)} axes ({', '.join(fill)})",
          "use -1 for at most one of dp, fsdp, sp, tp")
    for n in names:
        _need(sizes[n] == -1 or sizes[n] >= 1, f"mesh.{n}={sizes[n]} must be positive",
              "use a positive size or -1 to fill")
    known = 1
    for n in names:
        if sizes[n] != -1:
            known *= sizes[n]
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


def validate(config: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    """Check everything that can be checked without compiling; return the resolved mesh shape."""
    check_config(config)
    return _check_mesh(config, n_devices)


def check_config(config) -> None:
    """What `validate` checks without knowing the device count; runs before jax is imported."""
    check_structure(config)
    t, d, m, a, o = config.train, config.data, config.model, config.attention, config.optim
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
    _choice(a.impl, IMPLS, "attention.impl")
    _choice(a.layout, LAYOUTS, "attention.layout")
    _choice(a.get("pipeline_grads", "auto"), PIPELINE_GRADS, "attention.pipeline_grads")
    _choice(a.get("kernel", "xla"), KERNELS, "attention.kernel")
    _choice(m.remat, REMAT_POLICIES, "model.remat")
    _choice(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")

    for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        _need(m[k] > 0, f"model.{k}={m[k]} must be positive", f"set --config.model.{k}")
    _need(m.n_heads % m.n_kv_heads == 0,
          f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}",
          "choose n_kv_heads that divides n_heads")
    _need(m.dim % m.n_heads == 0, f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}",
          "choose n_heads that divides dim")
    _need((m.dim // m.n_heads) % 2 == 0, f"head_dim={m.dim // m.n_heads} is odd",
          "rotary embeddings need an even head_dim")
    # Each is a divisor or a base in model.py: 0 or less gives inf/NaN, first seen as a
    # non-finite loss after the compile (and a negative factor runs, with nonsense positions).
    _need(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive",
          "set --config.model.rope_theta, e.g. 10000.0")
    _need(m.norm_eps > 0, f"model.norm_eps={m.norm_eps} must be positive",
          "set --config.model.norm_eps, e.g. 1e-5")
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
    _need(d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be positive",
          "set --config.data.global_batch_size to 1 or more")
    _need(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive", "set --config.data.seq_len")


def _check_mesh(config: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    d, m, a, o = config.data, config.model, config.attention, config.optim
    mesh = mesh_shape(config.mesh, n_devices)
    sp, tp, batch_shards = mesh["sp"], mesh["tp"], mesh["dp"] * mesh["fsdp"]
    _need(m.n_kv_heads % tp == 0,
          f"model.n_kv_heads={m.n_kv_heads} (and n_heads={m.n_heads}) not divisible by mesh.tp={tp}",
          "choose tp that divides n_kv_heads")
    _need(m.ffn_dim % tp == 0, f"model.ffn_dim={m.ffn_dim} not divisible by mesh.tp={tp}",
          "choose tp that divides ffn_dim")
    _need(d.global_batch_size % (batch_shards * o.grad_accum_steps) == 0,
          f"data.global_batch_size={d.global_batch_size} is not divisible by dp*fsdp={batch_shards}"
          f" x grad_accum_steps={o.grad_accum_steps}",
          f"use a multiple of {batch_shards * o.grad_accum_steps}")
    local = d.seq_len // sp if d.seq_len % sp == 0 else None
    _need(local is not None, f"data.seq_len={d.seq_len} is not divisible by mesh.sp={sp}",
          f"use a multiple of {sp}")
    if a.layout == "zigzag" and sp > 1:
        _need(local % 2 == 0, f"zigzag layout needs an even block per device, got {local}",
              f"use a data.seq_len that is a multiple of {2 * sp}")
    per_device = local if a.impl == "ring" else d.seq_len
    for k in ("q_chunk", "kv_chunk"):
        c = min(a[k], per_device)
        _need(c > 0 and per_device % c == 0,
              f"attention.{k}={a[k]} does not divide the {per_device} tokens each device attends over"
              f" (seq_len={d.seq_len}, sp={sp})",
              f"use a chunk that divides {per_device}")
    if a.get("kernel", "xla") == "pallas":
        _need(a.impl != "dense" and per_device % 128 == 0,
              f"attention.kernel='pallas' needs ring or blockwise attention over a multiple of 128"
              f" tokens per device; this config has impl={a.impl!r} over {per_device}",
              "use attention.kernel='xla' or a data.seq_len giving a multiple of 128 per device")
    for k in ("mlp_chunk", "loss_chunk"):
        c = min(m[k], local)
        _need(c > 0 and local % c == 0,
              f"model.{k}={m[k]} does not divide the {local} tokens per device"
              f" (seq_len={d.seq_len}, sp={sp})",
              f"use a chunk that divides {local}")
    if a.impl != "ring":
        _need(sp == 1, f"attention.impl={a.impl!r} cannot split the sequence over mesh.sp={sp}",
              "use attention.impl='ring' or mesh.sp=1")
    return mesh
