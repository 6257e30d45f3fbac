"""Move weights between Hugging Face LLaMA directories and ringformer workdirs.

    python scripts/convert_hf.py import HF_DIR --workdir DIR [--config configs/NAME.py] [--config.x=y]
    python scripts/convert_hf.py export --workdir DIR --out HF_DIR [--step N]

`import` writes a step-0 checkpoint (the HF weights, a fresh optimizer state) into a new
workdir; `scripts/train.py --workdir DIR` with a config whose model matches then fine-tunes
from it (the command to use is printed), with that config's optimizer, seed and data.
`export` writes the newest valid (or --step) checkpoint's parameters as config.json +
model.safetensors for transformers, into a new or empty --out (one holding files is refused).
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from ml_collections import config_flags

from ringformer.cli import parse_flags, run_main
from ringformer.errors import ConfigError, UserError

config_flags.DEFINE_config_file("config", None, "Run config for import (default: defaults).")
flags.DEFINE_string("workdir", None, "ringformer workdir (checkpoints/ inside).")
flags.DEFINE_string("out", None, "export: the Hugging Face directory to write.")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: newest valid).")
FLAGS = flags.FLAGS
USAGE = "use: convert_hf.py import HF_DIR --workdir DIR | export --workdir DIR --out HF_DIR"
# What a HF config.json decides; everything else (dtype, remat, chunks, mesh) is the run's.
HF_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta",
             "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
             "rope_high_freq_factor", "rope_original_max_position", "max_position", "norm_eps",
             "tie_embeddings")
ONE_HOST_MESH = {"dp": 1, "fsdp": -1, "sp": 1, "tp": 1}  # converting needs no particular mesh


def import_hf(hf_dir: str, workdir: str, config) -> None:
    import jax
    import jax.numpy as jnp

    from ringformer import hf, model, optim, train
    from ringformer.checkpoint import Checkpointer
    from ringformer.config import default_config, validate
    from ringformer.mesh import make_mesh
    from ringformer.workdir import WorkdirLock, missing_dirs, prepare_workdir, remove_unused_workdir

    config = default_config() if config is None else config
    hf_cfg = hf.read_config(hf_dir)
    with config.unlocked():
        for k in HF_FIELDS:
            config.model[k] = getattr(hf_cfg, k)
    # The saved config is what fine-tuning resumes with, so a value that cannot train (e.g.
    # keep_checkpoints=0) is refused now, before any weight is read or directory made. Checked
    # on this import's one-host mesh: the fine-tuning run checks its own mesh when it starts.
    checked = config.copy_and_resolve_references()
    with checked.unlocked():
        checked.mesh.update(ONE_HOST_MESH)
    validate(checked, 1)
    _, params = hf.load_llama(hf_dir)
    model_cfg = model.ModelConfig.from_config(config)
    created = missing_dirs(workdir)
    path = prepare_workdir(workdir)
    with WorkdirLock(path):
        try:
            ckpt = Checkpointer(path, keep=config.train.keep_checkpoints, async_save=False)
            try:
                if ckpt.all_steps():
                    raise UserError(f"{path} already holds checkpoints {ckpt.all_steps()}",
                                    "import into a new --workdir")
                mesh = make_mesh(ONE_HOST_MESH)
                tx = optim.make_optimizer(config.optim, config.train.steps)
                abstract = jax.eval_shape(lambda: params)
                shard = train.state_shardings(model_cfg, tx, mesh, abstract)
                placed = jax.device_put(params, shard.params)
                state = train.TrainState(jax.device_put(jnp.zeros((), jnp.int32), shard.step),
                                         placed,
                                         jax.jit(tx.init, out_shardings=shard.opt_state)(placed))
                config_json = json.loads(config.to_json_best_effort())
                ckpt.save(0, state, data_state={"seed": config.train.seed, "batches": 0},
                          config_json=config_json)
                ckpt.wait()
            finally:
                ckpt.close()
            (path / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        except BaseException:
            # A new workdir that got no checkpoint must not look like a run; done under the
            # lock, as train_and_evaluate does.
            remove_unused_workdir(created)
            raise
    flags_needed = " ".join(f"--config.model.{k}={config.model[k]}" for k in HF_FIELDS)
    print(f"imported {hf_dir} into {path} as step 0; fine-tune with\n  python scripts/train.py "
          f"--config CONFIG --workdir {path} {flags_needed}")


def export_hf(workdir: str, out_dir: str, step: int | None) -> None:
    from ringformer import hf, model, train
    from ringformer.workdir import missing_dirs

    # Refused before anything is read: writing into a directory that holds files would replace
    # its config.json (a run's own, if --out is a workdir) or mix two models' files.
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory",
                        "choose a new --out directory (it is created)")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out_dir} already holds files",
                        "choose a new --out or empty it")
    config, state = train.restore_run(workdir, ONE_HOST_MESH, step=step)
    cfg = model.ModelConfig.from_config(config)
    # HF needs a position limit; a run without one (0) claims the context it was trained at.
    cfg = dataclasses.replace(cfg, max_position=cfg.max_position or int(config.data.seq_len))
    created = missing_dirs(out)
    try:
        hf.save_llama(cfg, state.params, out_dir)
    except BaseException:
        # save_llama removes its own partial files; the directories made for it go too.
        for d in created:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    print(f"exported step {int(state.step)} of {workdir} to {out_dir}")


def main() -> None:
    argv = list(sys.argv)
    command = argv.pop(1) if len(argv) > 1 and not argv[1].startswith("-") else None
    if command not in ("import", "export"):
        raise ConfigError(f"unknown command {command!r}", USAGE)
    hf_dir = None
    if command == "import":
        if len(argv) < 2 or argv[1].startswith("-"):
            raise ConfigError("import needs the Hugging Face directory", USAGE)
        hf_dir = argv.pop(1)
    parse_flags(argv)
    if not FLAGS.workdir:
        raise ConfigError("no --workdir given", USAGE)
    if command == "import":
        import_hf(hf_dir, FLAGS.workdir, FLAGS.config)
    else:
        if not FLAGS.out:
            raise ConfigError("export needs --out HF_DIR", USAGE)
        export_hf(FLAGS.workdir, FLAGS.out, FLAGS.step)


if __name__ == "__main__":
    run_main(main)
