"""A ~1B-parameter LLaMA at 32K context on one GPU (blockwise attention, full remat, bf16).

    python scripts/train.py --config configs/llama_1b_32k.py --workdir runs/llama_1b_32k \
        --config.data.tokenizer=/path/to/llama/tokenizer --config.model.vocab_size=32000

With more GPUs, put them on sp to grow the context: `--config.mesh.sp=8
--config.data.seq_len=262144` keeps the same memory per device (docs/sharding.md).
"""

import ml_collections

from ringformer.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.train.steps = 10_000
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.save_every = 500
    c.train.peak_flops = 989e12  # H100 SXM dense bf16; set your card's for a meaningful MFU

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, -1, 1, 1

    c.data.seq_len = 32768
    c.data.global_batch_size = 1

    c.model.vocab_size = 32000
    c.model.dim = 2048
    c.model.n_layers = 18
    c.model.n_heads = 16
    c.model.n_kv_heads = 8
    c.model.ffn_dim = 5632
    c.model.rope_theta = 1_000_000.0
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.model.mlp_chunk = 4096
    c.model.loss_chunk = 2048

    c.attention.impl = "ring"  # with sp=1 the ring is plain blockwise attention
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 2048
    c.attention.kv_chunk = 4096

    c.optim.lr = 3e-4
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    return c
