r"""Generate text from a trained run or a local Hugging Face LLaMA (docs/generation.md).

    python scripts/generate.py --workdir runs/tiny --prompt "def main(" --max_new_tokens 64
    python scripts/generate.py --hf HF_DIR --prompt_file prompts.jsonl --temperature 0.8 \
        --top_p 0.95 --seed 1 --json [--mesh dp=1,fsdp=1,sp=8,tp=1] [--chat]

A prompt starts like a training document ([BOS] + its ids when the tokenizer has a BOS).
One prompt streams to the terminal; several show a progress bar. --json prints one object per
prompt and line: prompt, text, tokens, prefill_tokens_per_sec, decode_tokens_per_sec.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from ringformer.config import parse_mesh_flag
from ringformer.errors import ConfigError
from ringformer.launch.flags import devices_for_mesh, ensure_cpu_devices, parse_flags, run_main

flags.DEFINE_string("workdir", None, "Training run to generate with (its newest checkpoint).")
flags.DEFINE_integer("step", None, "Use this checkpoint step of --workdir instead.")
flags.DEFINE_string("hf", None, "Local Hugging Face LLaMA directory to generate with instead.")
flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat the flag for a batch).")
flags.DEFINE_string("prompt_file", None, "A .txt file (one prompt) or .jsonl (one per line, `text`).")
flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all; 1: greedy).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the likeliest tokens holding this mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")
flags.DEFINE_multi_string("stop", [], "Stop a prompt's text at this string (repeatable).")
flags.DEFINE_string("mesh", None, "dp=..,fsdp=..,sp=..,tp=.. (default: all devices on sp).")
flags.DEFINE_string("tokenizer", None, "'byte' or a local path (default: the model's own).")
flags.DEFINE_string("dtype", "auto", "Compute dtype: auto (run's own; float32 for --hf), ...")
flags.DEFINE_bool("chat", False, "Wrap each prompt in the tokenizer's chat template.")
flags.DEFINE_bool("json", False, "One JSON object per prompt and line.")
flags.DEFINE_bool("allow_longer_context", False, "Allow generating past max_position.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
FLAGS = flags.FLAGS


def main() -> None:
    parse_flags(sys.argv)
    if bool(FLAGS.workdir) == bool(FLAGS.hf) or (FLAGS.hf and FLAGS.step is not None):
        raise ConfigError("pass exactly one of --workdir [--step N] and --hf",
                          "name the model to generate with")
    # Before jax is imported: a CPU host gets the devices the mesh asks for, 8 by default.
    sizes = parse_mesh_flag(FLAGS.mesh) if FLAGS.mesh else None
    ensure_cpu_devices(devices_for_mesh(sizes or {"dp": 1, "fsdp": 1, "sp": -1, "tp": 1},
                                        FLAGS.num_processes or 1))
    from ringformer.generate.sampling import Sampling
    from ringformer.generate.tool import check_options, read_prompts, run
    from ringformer.launch.distributed import initialize_distributed

    # Before waiting for peers or loading anything; run() checks again for callers in Python.
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
    prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file)
    check_options(prompts, max_new_tokens=FLAGS.max_new_tokens, sampling=sampling)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    run(prompts=prompts, max_new_tokens=FLAGS.max_new_tokens, sampling=sampling,
        workdir=FLAGS.workdir, step=FLAGS.step, hf_dir=FLAGS.hf, mesh_sizes=sizes,
        tokenizer=FLAGS.tokenizer, chat=FLAGS.chat, stop=FLAGS.stop, json_lines=FLAGS.json,
        allow_longer_context=FLAGS.allow_longer_context, dtype=FLAGS.dtype)


if __name__ == "__main__":
    run_main(main)
