"""Hugging Face LLaMA directories <-> ringformer workdirs, as `scripts/convert_hf.py` runs them.

`import_hf` writes the weights as a step-0 checkpoint that a training run starts from (with
its own optimizer, seed and data); `export_hf` writes a checkpoint's parameters as
config.json + model.safetensors (one process) or sharded safetensors with an index (several
processes, `ringformer/hf/sharded.py`), plus the run's local tokenizer files. The tensor
mapping itself is `ringformer/hf/mapping.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ringformer.errors import UserError
from ringformer.hf.hf_config import HF_FIELDS

ONE_HOST_MESH = {"dp": 1, "fsdp": -1, "sp": 1, "tp": 1}  # converting needs no particular mesh


def import_hf(hf_dir: str, workdir: str, config=None) -> None:
    """Write `hf_dir`'s weights into the new `workdir` as step 0; `config` (default: the
    defaults) supplies everything a HF config.json does not decide."""
    import jax
    import jax.numpy as jnp

    from ringformer import model, optim
    from ringformer.config import default_config, validate
    from ringformer.hf import mapping as hf
    from ringformer.mesh import make_mesh
    from ringformer.train import state as train_state
    from ringformer.train.checkpoint import Checkpointer
    from ringformer.train.workdir import WorkdirLock, missing_dirs, prepare_workdir, remove_unused_workdir

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
                shard = train_state.state_shardings(model_cfg, tx, mesh, abstract)
                placed = jax.device_put(params, shard.params)
                state = train_state.TrainState(jax.device_put(jnp.zeros((), jnp.int32), shard.step),
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
    print(f"imported {hf_dir} into {path} as step 0; fine-tune with\n  python scripts/train.py "
          f"--config configs/finetune.py:{path} --workdir {path} --config.data.train_files=F")


def export_hf(workdir: str, out_dir: str, step: int | None = None) -> None:
    """Write `workdir`'s newest valid (or `step`) parameters into the new or empty `out_dir`."""
    import jax

    from ringformer import model
    from ringformer.hf import mapping as hf
    from ringformer.hf import sharded
    from ringformer.train import state as train_state
    from ringformer.train.workdir import missing_dirs, remove_unused_workdir

    # Refused before anything is read: writing into a directory that holds files would replace
    # its config.json (a run's own, if --out is a workdir) or mix two models' files.
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory",
                        "choose a new --out directory (it is created)")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out_dir} already holds files",
                        "choose a new --out or empty it")
    config, state = train_state.restore_run(workdir, ONE_HOST_MESH, step=step)
    cfg = model.ModelConfig.from_config(config)
    # HF needs a position limit; a run without one (0) claims the context it was trained at.
    cfg = dataclasses.replace(cfg, max_position=cfg.max_position or int(config.data.seq_len))
    created = missing_dirs(out)
    lead = jax.process_index() == 0
    try:
        if jax.process_count() > 1:
            # The parameters are spread over the processes: each writes its own file.
            sharded.save_sharded(cfg, state.params, out_dir)
        else:
            hf.save_llama(cfg, state.params, out_dir)
        if lead:
            sharded.copy_tokenizer(config.data.tokenizer, out_dir)
    except BaseException:
        # The writers remove their own partial files; the directories made for them go too.
        if lead:
            remove_unused_workdir(created)
        raise
    if lead:
        print(f"exported step {int(state.step)} of {workdir} to {out_dir}")
