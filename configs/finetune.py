"""Fine-tune a model you already have, with its shape read from where it is, not retyped.

PATH is a Hugging Face LLaMA directory, or a ringformer workdir (an import by
`convert_hf.py import`, or an earlier run). The model's fields (sizes, RoPE, norm eps, tied
embeddings, position limit) come from PATH's config.json; the weights are taken from PATH
(`train.init_from`) by the first run, which then resumes from its own checkpoints:

    python scripts/convert_hf.py import /path/to/SmolLM-135M --workdir runs/ft
    python scripts/train.py --config configs/finetune.py:runs/ft --workdir runs/ft \
        --config.data.train_files=my.jsonl [--config.data.eval_files=held_out.jsonl]

or straight from the HF directory (its tokenizer is used when it has one):

    python scripts/train.py --config configs/finetune.py:/path/to/SmolLM-135M \
        --workdir runs/ft --config.data.train_files=my.jsonl

Everything else (optimizer, context, mesh, dtype) is this file's, and any `--config.x=y`
overrides it. An override of a model field that contradicts PATH's model is an error when
the run starts (the weights would not fit the model).
"""

import ml_collections

from ringformer.config import default_config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    import json
    from pathlib import Path

    from ringformer.hf.hf_config import model_fields  # jax-free

    if not arg:
        raise ValueError("name the model to fine-tune: --config configs/finetune.py:PATH "
                         "(a Hugging Face LLaMA directory or a ringformer workdir)")
    c = default_config()
    c.model.update(model_fields(arg))
    c.train.init_from = arg  # unused once the run (or an import in its workdir) has a checkpoint
    source = Path(arg)
    if any((source / f).is_file() for f in _TOKENIZER_FILES):
        c.data.tokenizer = arg
    elif (source / "checkpoints").is_dir():
        c.data.tokenizer = json.loads((source / "config.json").read_text())["data"]["tokenizer"]

    c.train.steps = 1000
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.save_every = 200
    c.train.peak_flops = 0.0  # the device kind's datasheet peak (docs/metrics.md)

    c.mesh.dp, c.mesh.fsdp, c.mesh.sp, c.mesh.tp = 1, -1, 1, 1  # sp > 1 for long contexts

    c.data.seq_len = 2048
    c.data.global_batch_size = 8
    # The default stdlib corpus is not the user's data: evaluate only on files they name.
    c.data.eval_files = ""

    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"

    c.optim.lr = 2e-5
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    return c
