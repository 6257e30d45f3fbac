"""A tiny LLaMA trained on the standard-library corpus with an 8-device ring on the CPU.

The default for `make train` (a few minutes on a 2-core machine):

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny

Mesh fsdp=2 x sp=4: parameters sharded over 2 devices, each 1024-token row split over a
ring of 4, so ring attention runs for real on virtual CPU devices. Rows of 1024 rather than
4096: on two cores a small model learns from the number of updates more than from the length
of its rows, and 1500 steps of 2 x 1024 tokens (about 5 minutes) reach an eval loss of 1.89
nats/byte, where 150 steps of 2 x 4096 (about as long) stopped at 2.8 and wrote only whitespace.
Longer contexts are the long-context recipe's job (configs/longctx_stage1.py).
"""

import ml_collections

from ringformer.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.train.steps = 1500
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.eval_batches = 8  # 16K tokens, as two batches of 4096-token rows were
    c.train.save_every = 500

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, 2, 4, 1

    c.data.seq_len = 1024
    c.data.global_batch_size = 2

    c.model.dim = 128
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.ffn_dim = 384
    c.model.dtype = "float32"  # bf16 matmuls are emulated, hence slow, on most CPUs
    c.model.remat = "none"
    c.model.mlp_chunk = 512
    c.model.loss_chunk = 512

    c.attention.impl = "ring"
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 128
    c.attention.kv_chunk = 128

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    return c
