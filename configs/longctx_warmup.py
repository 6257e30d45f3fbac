"""Long-context recipe, warm-up: gap copies until copying by content forms.

    python scripts/prepare_data.py --retrieval_examples 4000 --retrieval_long_examples 400 \
        --retrieval_warmup_examples 100000 --retrieval_gap_copy_examples 40000 \
        --retrieval_rung_examples 30000
    python scripts/train.py --config configs/longctx_warmup.py --workdir runs/longctx/warmup

or all of the recipe: `make longctx` (docs/long_context.md). Stage 1's model (with its
smeared keys) and tokenizer (configs/longctx_stage1.py) on 512-token rows of 32-256-token
gap copies (data/longctx/train_gap_copy.jsonl): a list of one-token words and one number,
filler of random length, the list again. The list's distance changes in every example, so
only copying by content scores; a smeared key carries its predecessor, so that copying is a
one-layer match, and it forms here, suddenly, after ~500 steps (docs/long_context.md). The
rung (configs/longctx_rung.py) and stage 1 then add the retrieval tasks and the 4K reach.
Every device takes its own rows (dp=-1); no ring is needed at 512.
"""

from pathlib import Path

import ml_collections

from ringformer.config import config_module

# By path: a config file is loaded by path too, with no package around it.
longctx_stage1 = config_module(Path(__file__).with_name("longctx_stage1.py"))

GAP_COPY = "data/longctx/train_gap_copy.jsonl"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = longctx_stage1.get_config()
    c.train.init_from = ""
    c.train.steps = 800
    c.train.save_every = 100

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = -1, 1, 1, 1

    c.data.seq_len = 512
    c.data.global_batch_size = 16
    # Only the gap copies: a stdlib file is ~5,000 tokens, all of them targets, so even 2% of
    # documents made two thirds of the loss and a third of the rows code, and copying did
    # not form in 700 steps (measured, docs/long_context.md).
    c.data.sources = GAP_COPY
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
