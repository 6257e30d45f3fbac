"""Move weights between Hugging Face LLaMA directories and ringformer workdirs.

    python scripts/convert_hf.py import HF_DIR --workdir DIR [--config configs/NAME.py] [--config.x=y]
    python scripts/convert_hf.py export --workdir DIR --out HF_DIR [--step N]
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

`import` writes a step-0 checkpoint (the HF weights, a fresh optimizer state) into a new
workdir; `scripts/train.py --workdir DIR` with a config whose model matches then fine-tunes
from it (the command to use is printed), with that config's optimizer, seed and data.
`export` writes the newest valid (or --step) checkpoint's parameters as config.json +
model.safetensors for transformers, into a new or empty --out (one holding files is refused),
with the run's tokenizer files when it used a local one. Run by every process of a
multi-process job, it writes model-0000k-of-0000n.safetensors (one per process, no process
gathers the model) and model.safetensors.index.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from ml_collections import config_flags

from ringformer.errors import ConfigError
from ringformer.launch.flags import devices_for_mesh, ensure_cpu_devices, exit_if_help, parse_flags, run_main

config_flags.DEFINE_config_file("config", None, "Run config for import (default: defaults).")
flags.DEFINE_string("workdir", None, "ringformer workdir (checkpoints/ inside).")
flags.DEFINE_string("out", None, "export: the Hugging Face directory to write.")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: newest valid).")
flags.DEFINE_string("coordinator_address", None, "export: HOST:PORT of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "export: number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "export: this process's index in a multi-process run.")
FLAGS = flags.FLAGS
USAGE = "use: convert_hf.py import HF_DIR --workdir DIR | export --workdir DIR --out HF_DIR"


def main() -> None:
    exit_if_help(sys.argv)  # before the command is read: `convert_hf.py --help` has none
    argv = list(sys.argv)
    command = argv.pop(1) if len(argv) > 1 and not argv[1].startswith("-") else None
    if command not in ("import", "export"):
        raise ConfigError(f"unknown command {command!r}", USAGE)
    hf_dir = None
    if command == "import":
        if len(argv) < 2 or argv[1].startswith("-"):
            raise ConfigError("import needs the Hugging Face directory", USAGE)
        hf_dir = argv.pop(1)
    parse_flags(argv)
    # Before jax is imported: a CPU process gets its share of the 8 devices the run used.
    ensure_cpu_devices(devices_for_mesh({"dp": 1, "fsdp": -1, "sp": 1, "tp": 1},
                                        FLAGS.num_processes or 1))
    from ringformer.hf import convert

    if not FLAGS.workdir:
        raise ConfigError("no --workdir given", USAGE)
    if command == "import":
        convert.import_hf(hf_dir, FLAGS.workdir, FLAGS.config)
    else:
        if not FLAGS.out:
            raise ConfigError("export needs --out HF_DIR", USAGE)
        from ringformer.launch.distributed import initialize_distributed

        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        convert.export_hf(FLAGS.workdir, FLAGS.out, FLAGS.step)


if __name__ == "__main__":
    run_main(main)
