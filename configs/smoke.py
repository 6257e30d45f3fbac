"""The smallest complete config: seconds per step on a CPU, for tests and quick checks.

    python scripts/train.py --config configs/smoke.py --workdir runs/smoke \
        --config.data.train_files=data/stdlib/train.jsonl

Same mesh shape as configs/tiny.py (fsdp=2 x sp=4), so the ring and parameter sharding run.
"""

import ml_collections

from ringformer.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.train.steps = 6
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.eval_batches = 1
    c.train.save_every = 2
    c.train.peak_flops = 1e11  # skip the start-up matmul measurement

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, 2, 4, 1

    c.data.seq_len = 128
    c.data.global_batch_size = 2

    c.model.dim = 32
    c.model.n_layers = 2
    c.model.n_heads = 2
    c.model.n_kv_heads = 1
    c.model.ffn_dim = 64
    c.model.dtype = "float32"
    c.model.remat = "full"
    c.model.mlp_chunk = 16
    c.model.loss_chunk = 16

    c.attention.impl = "ring"
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 8
    c.attention.kv_chunk = 8

    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    return c
