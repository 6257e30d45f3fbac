"""Long-context recipe, stage 2: extend stage 1's model from 4K to 16K tokens per row.

    python scripts/train.py --config configs/longctx_stage2.py --workdir runs/longctx/stage2

Starts from runs/longctx/stage1 (`train.init_from`: its parameters, a fresh optimizer). RoPE
theta goes up 256x, to 2.56M (Code Llama went to 1M for 16K): the reach stage 1 learned, about
1K tokens back, stretches with the base. Raising it r times slows the slow rotations almost r
times, so a key D tokens back looks as one D / r back did in stage 1. From one stage 1,
theta x4 / x16 / x64 / x256 found 0 / 0 / 6 / 8 of the 8 held-out keys 8-16K tokens back
(docs/long_context.md, "RoPE theta"). The mixture up-samples long
documents: stdlib files of 16K tokens or more four times per epoch, retrieval examples of 4K
to 16K tokens (data/longctx/train_long.jsonl) beside the short ones, so the answers now come
from far back. Mesh sp=8: one 16K row on a ring of 8.
"""

from pathlib import Path

import ml_collections

from ringformer.config import config_module

# By path: a config file is loaded by path too, with no package around it.
longctx_stage1 = config_module(Path(__file__).with_name("longctx_stage1.py"))

LONG = "data/longctx/train_long.jsonl"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = longctx_stage1.get_config()
    c.train.init_from = "runs/longctx/stage1"
    c.train.steps = 30
    c.train.log_every = 5
    c.train.eval_every = 30
    c.train.save_every = 30

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, 1, 8, 1

    c.data.seq_len = 16384
    c.data.global_batch_size = 1
    c.data.sources = (f"{longctx_stage1.STDLIB}:0.02:16384:4,{longctx_stage1.SHORT}:0.49,"
                      f"{LONG}:0.48")

    c.model.rope_theta = 2_560_000.0

    c.optim.lr = 5e-4
    c.optim.warmup_steps = 5
    return c
