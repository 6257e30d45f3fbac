"""Long-context recipe, stage 1: a small LLaMA learns retrieval at 4K tokens per row.

    python scripts/prepare_data.py --retrieval_examples 4000 --retrieval_long_examples 400 \
        --retrieval_warmup_examples 100000 --retrieval_gap_copy_examples 40000 \
        --retrieval_rung_examples 30000
    python scripts/train.py --config configs/longctx_warmup.py --workdir runs/longctx/warmup
    python scripts/train.py --config configs/longctx_rung.py --workdir runs/longctx/rung
    python scripts/train.py --config configs/longctx_stage1.py --workdir runs/longctx/stage1

or all of it, with stage 2 and the evaluation: `make longctx` (docs/long_context.md).

Starts from the rung (`train.init_from`: gap copies, where copying by content forms, then
short retrieval examples) and teaches it to reach across 4K: supervised retrieval examples of
256-4096 tokens (data/longctx/train_short.jsonl: passkeys at random depths, half of them
on nonsense filler, many-pair key-value lookups, texts to copy; the loss only on the
answers), some 16-128-token examples (train_warmup.jsonl) so the short reach is kept, a
little of the stdlib corpus so the model still reads real text. Trained on whole documents,
small models learn the filler and answer one fixed key (issue 23): the answers carry the
loss here. The recipe's 2048-token BPE (data/longctx/tokenizer.json, digits one token each)
makes each match 1-2 tokens long where bytes need 4-6. Four layers of four heads, keys
smeared with two predecessors: enough for copying by content, and small enough (dim 128) for
hundreds of steps in minutes on two cores.
Mesh fsdp=2 x sp=4: each 4096-token row on a ring of 4.
"""

import ml_collections

from ringformer.config import default_config

STDLIB = "data/stdlib/train.jsonl"
SHORT = "data/longctx/train_short.jsonl"
WARMUP = "data/longctx/train_warmup.jsonl"
TOKENIZER = "data/longctx/tokenizer.json"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default_config()
    c.train.init_from = "runs/longctx/rung"
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
    # Shares of documents. A stdlib file is ~5x longer than a retrieval example and all its
    # tokens are targets, against ~300 answer tokens of an example: 1% of documents is
    # already a sixth of the loss. A warm-up example is ~8x shorter than a short one.
    c.data.sources = f"{STDLIB}:0.01,{WARMUP}:0.3,{SHORT}:0.69"
    c.data.tokenizer = TOKENIZER
    c.data.eval_files = "data/longctx/heldout_long.jsonl"

    c.model.vocab_size = 2048  # the BPE prepare_data.py trains (--retrieval_vocab)
    c.model.dim = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.ffn_dim = 384
    c.model.rope_theta = 10000.0
    # A key carries its predecessor, so "the token after X" is a one-layer match: without
    # it gap copies never formed copying by content in 800 steps; with it they did
    # (docs/long_context.md). The warm-up, the rung and stage 2 inherit it.
    c.model.smear_keys = True
    # And two tokens back, queries one: the match is "key is", not "is". With one token, the
    # held-out filler's hundreds of "is" outvoted the pass key's (0% greedy; measured in
    # docs/long_context.md).
    c.model.smear_tokens = 2
    c.model.dtype = "float32"  # bf16 matmuls are emulated, hence slow, on most CPUs
    c.model.remat = "none"
    c.model.mlp_chunk = 512
    c.model.loss_chunk = 512

    c.attention.impl = "ring"
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 256
    c.attention.kv_chunk = 256

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    return c
