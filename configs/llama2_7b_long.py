"""LLaMA-2-7B context extension in the style of the Large World Model ladder (Liu et al. 2024),
sized for the paper's TPU v4-512 (32 GiB HBM per chip).

Each stage starts from the previous stage's checkpoint (the first from a converted HF
LLaMA-2-7B), raises RoPE theta and the context, and moves chips from fsdp to sp so that every
chip holds the same 8K tokens of one sequence at every stage:

    python scripts/convert_hf.py import /path/to/Llama-2-7b-hf --workdir runs/llama2_7b_base
    python scripts/train.py --config configs/llama2_7b_long.py:ctx=32k \
        --workdir runs/lwm_32k --config.train.init_from=runs/llama2_7b_base
    python scripts/train.py --config configs/llama2_7b_long.py:ctx=128k \
        --workdir runs/lwm_128k --config.train.init_from=runs/lwm_32k
    ... ctx=256k, 512k, 1m

| stage | RoPE theta | tokens | sequences per batch | mesh on 512 chips (dp, fsdp, sp, tp) |
|---|---|---|---|---|
| 32k | 1M | 4.8B | 128 | 1, 128, 4, 1 |
| 128k | 10M | 12B | 32 | 1, 32, 16, 1 |
| 256k | 10M | 12B | 16 | 1, 16, 32, 1 |
| 512k | 25M | 3B | 8 | 1, 8, 64, 1 |
| 1m | 50M | 1.8B | 4 | 1, 4, 128, 1 |

fsdp is -1 (the chips left after sp), so on another slice the context still splits over sp
and the rest shard parameters; the batch (4M tokens) must divide over dp x fsdp. Parameters
and Adam's moments shard over fsdp x sp (all 512 chips, ~160 MB each); what grows with the
context is the saved input of every layer, 32 x 8K tokens x 4096 x 2 bytes = 2 GiB per chip
at every stage. Check a stage before booking the chips (docs/BENCHMARKS.md has the table):

    python scripts/train.py --config configs/llama2_7b_long.py:ctx=1m --dry_run \
        --target h100 --devices 512 --device_memory_gib 32

The LWM paper ran sequence parallelism on a mesh axis it calls tp (its mesh 1,-1,16,4 at 1M);
here the ring is sp, and tensor parallelism is not needed at 7B once sp shards the
parameters too. Every stage uses 4M tokens per batch and a constant learning rate of 4e-5.
Documented and dry-run checked, not trained on CI.
"""

import ml_collections

from ringformer.config import default_config

STAGES = {
    # ctx: (seq_len, rope_theta, tokens, sp): 8K tokens of a sequence per chip
    "32k": (32_768, 1e6, 4.8e9, 4),
    "128k": (131_072, 1e7, 12e9, 16),
    "256k": (262_144, 1e7, 12e9, 32),
    "512k": (524_288, 2.5e7, 3e9, 64),
    "1m": (1_048_576, 5e7, 1.8e9, 128),
}
TOKENS_PER_BATCH = 4 * 2**20


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    ctx = (arg or "ctx=32k").split("=")[-1].lower()
    if ctx not in STAGES:
        raise ValueError(f"unknown stage {ctx!r}; use ctx= one of {', '.join(STAGES)}")
    seq_len, theta, tokens, sp = STAGES[ctx]
    c = default_config()
    c.train.steps = int(tokens // TOKENS_PER_BATCH)
    c.train.log_every = 1
    c.train.eval_every = 100
    c.train.save_every = 50
    c.train.peak_flops = 0.0  # the device kind's datasheet peak (docs/metrics.md)

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, -1, sp, 1

    c.data.tokenizer = "/path/to/Llama-2-7b-hf"  # a local tokenizer directory
    c.data.seq_len = seq_len
    c.data.global_batch_size = TOKENS_PER_BATCH // seq_len

    c.model.vocab_size = 32000
    c.model.dim = 4096
    c.model.n_layers = 32
    c.model.n_heads = 32
    c.model.n_kv_heads = 32
    c.model.ffn_dim = 11008
    c.model.rope_theta = theta
    c.model.norm_eps = 1e-5
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.mlp_chunk = 8192
    c.model.loss_chunk = 4096

    c.attention.impl = "ring"
    c.attention.layout = "zigzag"
    c.attention.q_chunk = 2048
    c.attention.kv_chunk = 4096

    c.optim.lr = 4e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    return c
