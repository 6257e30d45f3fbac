r"""Perplexity of long documents, loss by position in the window, and passkey retrieval.

    python scripts/eval.py --workdir runs/tiny --data data/stdlib/eval.jsonl --context 16384 \
        --out runs/tiny/eval.json [--stride 8192] [--mesh dp=1,fsdp=1,sp=8,tp=1] [--passkey]
        [--passkey_generate] [--passkey_file data/longctx/heldout_passkey.jsonl]
    python scripts/eval.py --hf HF_DIR --tokenizer HF_DIR --data doc.txt --context 4096 --out r.json

Writes OUT.json, OUT.png (loss against position) and, with --passkey, OUT_passkey.png.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from ringformer.config import parse_mesh_flag
from ringformer.errors import ConfigError
from ringformer.launch.flags import devices_for_mesh, ensure_cpu_devices, parse_flags, run_main

flags.DEFINE_string("workdir", None, "Training run to evaluate (its newest checkpoint).")
flags.DEFINE_integer("step", None, "Evaluate this checkpoint step of --workdir instead.")
flags.DEFINE_string("hf", None, "Local Hugging Face LLaMA directory to evaluate instead.")
flags.DEFINE_multi_string("data", None, "Data paths (txt, jsonl, parquet, save_to_disk dirs).")
flags.DEFINE_integer("context", None, "Evaluation context: input tokens per window.")
flags.DEFINE_integer("stride", None, "Sliding-window stride (default: non-overlapping windows).")
flags.DEFINE_string("mesh", None, "dp=..,fsdp=..,sp=..,tp=.. (default: all devices on sp).")
flags.DEFINE_string("tokenizer", None, "'byte' or a local path (default: the model's own).")
flags.DEFINE_integer("batch", None, "Windows per step (a multiple of dp*fsdp).")
flags.DEFINE_string("out", None, "Output JSON; plots are written beside it.")
flags.DEFINE_string("dtype", "auto", "Compute dtype: auto (run's own; float32 for --hf), ...")
flags.DEFINE_string("text_field", "text", "Text field of jsonl/parquet/dataset records.")
flags.DEFINE_bool("allow_longer_context", False, "Allow a context past max_position.")
flags.DEFINE_bool("passkey", False, "Also score passkey retrieval (lengths x depths).")
flags.DEFINE_list("passkey_lengths", None, "Prompt lengths (default: context/8 .. context).")
flags.DEFINE_list("passkey_depths", ["0", "0.25", "0.5", "0.75", "1"], "Key depths in [0, 1].")
flags.DEFINE_integer("passkey_trials", 2, "Prompts per (length, depth).")
flags.DEFINE_integer("passkey_candidates", 8, "Candidate keys ranked by likelihood.")
flags.DEFINE_bool("passkey_generate", False, "Score passkey retrieval by real greedy "
                  "generation (exact match of the generated key) instead of candidates.")
flags.DEFINE_string("passkey_file", None, "Passkey prompts (JSON lines: prompt, key, length, "
                    "depth), e.g. data/longctx/heldout_passkey.jsonl; implies --passkey_generate.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
FLAGS = flags.FLAGS


def join_data_args(argv: list[str]) -> list[str]:
    """`--data a b c` (several paths after one flag) -> `--data=a,b,c` for absl."""
    out, i = [], 0
    while i < len(argv):
        j = i + 1
        if argv[i] == "--data":
            while j < len(argv) and not argv[j].startswith("-"):
                j += 1
            out.append("--data=" + ",".join(argv[i + 1:j]))
        else:
            out.append(argv[i])
        i = j
    return out


def main() -> None:
    parse_flags(join_data_args(sys.argv))
    if bool(FLAGS.workdir) == bool(FLAGS.hf) or (FLAGS.hf and FLAGS.step is not None):
        raise ConfigError("pass exactly one of --workdir [--step N] and --hf",
                          "name the model to evaluate")
    for name in ("data", "context", "out"):
        # `is None` for --context: 0 was given, and check_options says what is wrong with it.
        if FLAGS[name].value is None or FLAGS[name].value in ("", []):
            raise ConfigError(f"no --{name} given", "see the usage at the top of scripts/eval.py")
    # Before jax is imported (ringformer.mesh imports it): a CPU host gets the devices the
    # mesh asks for, 8 by default.
    sizes = parse_mesh_flag(FLAGS.mesh) if FLAGS.mesh else None
    ensure_cpu_devices(devices_for_mesh(sizes or {"dp": 1, "fsdp": 1, "sp": -1, "tp": 1},
                                        FLAGS.num_processes or 1))
    try:
        lengths = [int(x) for x in FLAGS.passkey_lengths or []]
        depths = [float(x) for x in FLAGS.passkey_depths]
    except ValueError as e:
        raise ConfigError(f"bad passkey lengths or depths: {e}", "use e.g. 1024,4096") from None

    from ringformer.eval.options import check_options
    from ringformer.eval.tool import run
    from ringformer.launch.distributed import initialize_distributed

    # Before waiting for peers or loading anything; run() checks again for callers in Python.
    check_options(context=FLAGS.context, out=FLAGS.out, stride=FLAGS.stride,
                  batch_size=FLAGS.batch,
                  passkey=FLAGS.passkey or FLAGS.passkey_generate or bool(FLAGS.passkey_file),
                  passkey_lengths=lengths,
                  passkey_depths=depths, passkey_trials=FLAGS.passkey_trials,
                  passkey_candidates=FLAGS.passkey_candidates)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    r = run(data=FLAGS.data, context=FLAGS.context, out=FLAGS.out, workdir=FLAGS.workdir,
            step=FLAGS.step, hf_dir=FLAGS.hf, stride=FLAGS.stride, mesh_sizes=sizes,
            tokenizer=FLAGS.tokenizer, batch_size=FLAGS.batch,
            passkey=FLAGS.passkey or FLAGS.passkey_generate,
            passkey_lengths=lengths, passkey_depths=depths, passkey_trials=FLAGS.passkey_trials,
            passkey_candidates=FLAGS.passkey_candidates, dtype=FLAGS.dtype,
            allow_longer_context=FLAGS.allow_longer_context, text_field=FLAGS.text_field,
            passkey_generate=FLAGS.passkey_generate, passkey_file=FLAGS.passkey_file)
    summary = f"ppl {r['ppl']:.4f}  loss {r['loss']:.4f}  tokens {r['tokens']}  -> {FLAGS.out}"
    if "passkey" in r:
        summary += f"  passkey greedy {r['passkey']['greedy_mean']:.0%}"
    import jax

    if jax.process_index() == 0:  # one summary per run, as one OUT.json
        print(summary)


if __name__ == "__main__":
    run_main(main)
