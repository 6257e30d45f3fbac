"""Long-context recipe, the rung: the retrieval tasks join the copying, at up to 512 tokens.

    python scripts/train.py --config configs/longctx_rung.py --workdir runs/longctx/rung

after the warm-up (configs/longctx_warmup.py, whose docstring has the data command), or all
of the recipe: `make longctx` (docs/long_context.md). Starts from the warm-up
(`train.init_from`), whose copying by content is there but has only ever copied lists, and
trains on 1024-token rows of 32-512-token examples (data/longctx/train_rung.jsonl): gap
copies 30%, passkeys 40% (half on nonsense filler), key-value lookups 30%
(`retrieval.RUNG_SHARES`). Short enough for the answers to be most of the loss, long enough
that a key is hundreds of tokens back: stage 1's 4K rows then only lengthen a reach that
exists.
"""

from pathlib import Path

import ml_collections

from ringformer.config import config_module

# By path: a config file is loaded by path too, with no package around it.
longctx_warmup = config_module(Path(__file__).with_name("longctx_warmup.py"))

RUNG = "data/longctx/train_rung.jsonl"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = longctx_warmup.get_config()
    c.train.init_from = "runs/longctx/warmup"
    c.train.steps = 300

    c.data.seq_len = 1024
    c.data.global_batch_size = 8
    c.data.sources = RUNG

    c.optim.lr = 2e-3
    return c
