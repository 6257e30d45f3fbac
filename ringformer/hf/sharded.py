"""Export of parameters spread over several processes: sharded safetensors, no global gather.

`save_sharded` writes `model-0000k-of-0000n.safetensors` (one file per process, tensors dealt
out so the files are about equal in bytes), `model.safetensors.index.json` and `config.json`.
Each HF tensor is assembled once: every process joins one small collective that replicates
that tensor (a layer's slice of a stacked leaf), and only the process whose file holds it
copies it to host memory and appends it. Host memory therefore stays at about one tensor,
whatever the model's size; a file's header is known up front (shapes and dtypes come from the
config), so the data streams to disk tensor by tensor instead of being collected first.
Every process must see `out_dir` at the same path (the shared filesystem checkpoints need).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ringformer.config import ModelConfig
from ringformer.errors import CheckpointError
from ringformer.hf import mapping as hf
from ringformer.model import param_shapes

SHARD = "model-{:05d}-of-{:05d}.safetensors"
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# What transformers' save_pretrained writes for a tokenizer (whichever of them exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], int | None, Callable,
                                               tuple[int, ...]]]:
    """(HF name, leaf path in params, layer index or None, ours->HF transform, HF shape) for
    every tensor, in the order the files hold them."""
    shapes = param_shapes(cfg)
    ident = lambda w: w
    plan = [("model.embed_tokens.weight", ("embed",), None, ident, tuple(shapes["embed"]))]
    for leaf, (pattern, _, to_hf) in hf._mapping(cfg).items():
        shape = hf._hf_shape(tuple(shapes["layers"][leaf][1:]), to_hf)
        plan += [(pattern.format(i=i), ("layers", leaf), i, to_hf, shape)
                 for i in range(cfg.n_layers)]
    plan.append(("model.norm.weight", ("final_norm",), None, ident, tuple(shapes["final_norm"])))
    if not cfg.tie_embeddings:
        plan.append(("lm_head.weight", ("lm_head",), None, np.transpose,
                     tuple(shapes["lm_head"])[::-1]))
    return plan


def assign_files(sizes: list[int], n_files: int) -> list[int]:
    """File index per tensor: largest first to the file with the fewest bytes so far, so each
    process writes about 1/n of the model."""
    load, owner = [0] * n_files, [0] * len(sizes)
    for t in sorted(range(len(sizes)), key=lambda t: -sizes[t]):
        k = min(range(n_files), key=lambda f: (load[f], f))
        owner[t], load[k] = k, load[k] + sizes[t]
    return owner


@functools.cache
def _replicator(mesh) -> tuple[Callable, Callable]:
    """Jitted (whole leaf) and (one layer of a stacked leaf) copies onto every device: the
    only collective of the export. The layer index is traced, so one compile per leaf shape."""
    out = NamedSharding(mesh, PartitionSpec())
    return (jax.jit(lambda a: a, out_shardings=out),
            jax.jit(lambda a, i: a[i], out_shardings=out))


class _StreamWriter:
    """A safetensors file written tensor by tensor: header first (offsets from the known
    shapes), then each tensor's bytes in header order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str):
        self.path, self.dtype, self.itemsize = path, dtype, np.dtype(hf._NP_DTYPES[dtype]).itemsize
        header, offset = {}, 0
        for name, shape in entries:
            n = int(np.prod(shape)) * self.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.pending = list(entries)
        self.f = open(path, "wb")  # noqa: SIM115 (closed in finish/abort)
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, x: np.ndarray) -> None:
        want, shape = self.pending.pop(0)
        if (name, tuple(x.shape)) != (want, tuple(shape)):  # a bug, not bad input
            raise AssertionError(f"wrote {name}{x.shape}, header expects {want}{shape}")
        x = np.ascontiguousarray(x.astype(hf._NP_DTYPES[self.dtype], copy=False))
        self.f.write(x.reshape(-1).view(np.uint8).data)

    def finish(self) -> None:
        assert not self.pending, self.pending
        self.f.close()

    def abort(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


def _leaf(params: dict, path: tuple[str, ...]):
    for k in path:
        params = params[k]
    return params


def _stream_tensors(cfg: ModelConfig, params: dict, out: Path, plan, files: list[str],
                    owner: list[int]) -> None:
    """Every process walks the plan in the same order (the replication is collective); the
    owner of each tensor appends it to its file, written under a temporary name."""
    me, mesh = jax.process_index(), _leaf(params, ("embed",)).sharding.mesh
    mine = [t for t, k in enumerate(owner) if k == me]
    writer = None
    if mine:
        writer = _StreamWriter(out / (files[me] + ".tmp"),
                               [(plan[t][0], plan[t][4]) for t in mine], cfg.param_dtype)
    whole, layer = _replicator(mesh)
    try:
        for t, (name, path, index, to_hf, _) in enumerate(plan):
            x = _leaf(params, path)
            full = whole(x) if index is None else layer(x, np.int32(index))
            if owner[t] == me:
                writer.write(name, to_hf(np.asarray(full.addressable_data(0))))
            del full
        if writer is not None:
            writer.finish()
            os.replace(writer.path, out / files[me])
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def save_sharded(cfg: ModelConfig, params: dict, out_dir: str) -> list[str]:
    """Write the HF directory from parameters sharded over all processes (every process calls
    this); returns the weight file names. Process 0 writes the index and config.json last,
    once every file is complete, so a directory with config.json is a finished export."""
    hf.check_exportable(cfg)
    from jax.experimental import multihost_utils

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out_dir}: {e.strerror or e}",
                              "choose an output directory whose parents are writable") from e
    plan = tensor_plan(cfg)
    itemsize = np.dtype(hf._NP_DTYPES[cfg.param_dtype]).itemsize
    sizes = [int(np.prod(p[4])) * itemsize for p in plan]
    n_files = min(jax.process_count(), len(plan))
    owner = assign_files(sizes, n_files)
    files = [SHARD.format(k + 1, n_files) for k in range(n_files)]
    try:
        _stream_tensors(cfg, params, out, plan, files, owner)
    except OSError as e:  # disk full, a file in the way: this process's file is removed
        raise CheckpointError(f"cannot write {out_dir}: {e.strerror or e}",
                              "free space or choose another output directory") from e
    multihost_utils.sync_global_devices("ringformer export: every weight file written")
    if jax.process_index() == 0:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {p[0]: files[k] for p, k in zip(plan, owner, strict=True)}}
        _write_json(out / hf.INDEX, index)
        _write_json(out / "config.json", hf.config_to_hf(cfg))
    return files


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def copy_tokenizer(spec: str | None, out_dir: str) -> list[str]:
    """Copy a local HF tokenizer (a directory, or a tokenizer.json) next to the weights, so the
    export loads with AutoTokenizer too; 'byte' has no files. Returns the names copied."""
    if not spec or spec.strip() == "byte":
        return []
    src = Path(spec).expanduser()
    if src.is_file():  # a bare tokenizer.json, whatever its name: HF looks for this one
        pairs = [(src, "tokenizer.json")]
    else:
        pairs = [(src / n, n) for n in TOKENIZER_FILES if (src / n).is_file()]
    for path, name in pairs:
        shutil.copyfile(path, Path(out_dir) / name)
    return [name for _, name in pairs]
