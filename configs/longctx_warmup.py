"""Long-context recipe, warm-up: short retrieval examples until copying forms (stage 1's first part).

    python scripts/prepare_data.py --retrieval_examples 4000 --retrieval_long_examples 400 \
        --retrieval_warmup_examples 100000
    python scripts/train.py --config configs/longctx_warmup.py --workdir runs/longctx/warmup

or all of the recipe: `make longctx` (docs/long_context.md). Stage 1's model and tokenizer
(configs/longctx_stage1.py) on 512-token rows of 16-128-token examples
(data/longctx/train_warmup.jsonl), where each retrieval target is at most about a hundred
tokens from its answer and half the passkeys sit right before the question: the copying
(induction) circuits form here, where a token is about 1.6x
cheaper than in stage 1's 4K rows, and stage 1 (`train.init_from` this workdir) then teaches
them to reach across 4K. Every device takes its own rows (dp=-1); no ring is needed at 512.
"""

from pathlib import Path

import ml_collections

from ringformer.config import config_module

# By path: a config file is loaded by path too, with no package around it.
longctx_stage1 = config_module(Path(__file__).with_name("longctx_stage1.py"))

WARMUP = "data/longctx/train_warmup.jsonl"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = longctx_stage1.get_config()
    c.train.init_from = ""
    c.train.steps = 500
    c.train.save_every = 100

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = -1, 1, 1, 1

    c.data.seq_len = 512
    c.data.global_batch_size = 16
    # Only the examples: a stdlib file is ~5,000 tokens, all of them targets, so even 2% of
    # documents made two thirds of the loss and a third of the rows code, and copying did
    # not form in 700 steps (measured, docs/long_context.md).
    c.data.sources = WARMUP
    # No evaluation here: the three held-out 16K documents cannot be dealt to 8 data shards,
    # and stages 1 and 2 evaluate them.
    c.data.eval_files = ""

    c.attention.impl = "blockwise"
    c.attention.q_chunk = c.attention.kv_chunk = 128

    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    # Copying appears suddenly at a step no one can predict; a decaying rate only delays it.
    # Stage 1 brings its own warm-up and decay.
    c.optim.schedule = "constant"
    return c
