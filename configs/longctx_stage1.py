"""Long-context recipe, stage 1: a small LLaMA learns retrieval at 4K tokens per row.

    python scripts/prepare_data.py --retrieval_examples 4000 --retrieval_long_examples 400
    python scripts/train.py --config configs/longctx_stage1.py --workdir runs/longctx/stage1

or all of it, with stage 2 and the evaluation: `make longctx` (docs/long_context.md).

Mostly supervised retrieval examples (data/longctx/train_short.jsonl: passkeys at random
depths, many-pair key-value lookups, texts to copy; the loss only on the answers), a little
of the stdlib corpus so the model still reads real text. Trained on whole documents, small models learn the
filler and answer one fixed key (issue 23): the answers carry the loss here. Four layers of
four heads: enough for the previous-token and induction (copying) heads retrieval needs, and
small enough (dim 128) for hundreds of steps in minutes on two cores.
Mesh fsdp=2 x sp=4: each 4096-token row on a ring of 4.
"""

import ml_collections

from ringformer.config import default_config

STDLIB = "data/stdlib/train.jsonl"
SHORT = "data/longctx/train_short.jsonl"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.train.steps = 400
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 1
    c.train.save_every = 100
    c.train.keep_checkpoints = 1
    c.train.peak_flops = 1e11  # skip the start-up matmul measurement (MFU is not the point)

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, 2, 4, 1

    c.data.seq_len = 4096
    c.data.global_batch_size = 2
    # Shares of documents: a stdlib file is ~10x longer than a retrieval example.
    c.data.sources = f"{STDLIB}:0.02,{SHORT}:0.98"
    c.data.eval_files = "data/longctx/heldout_long.jsonl"

    c.model.dim = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.ffn_dim = 384
    c.model.rope_theta = 10000.0
    c.model.dtype = "float32"  # bf16 matmuls are emulated, hence slow, on most CPUs
    c.model.remat = "none"
    c.model.mlp_chunk = 512
    c.model.loss_chunk = 512

    c.attention.impl = "ring"
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 256
    c.attention.kv_chunk = 256

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    return c
