"""Train a model from a config file; running it again on the same workdir resumes.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny [--config.train.steps=50]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from ml_collections import config_flags

from ringformer.errors import ConfigError
from ringformer.launch.flags import devices_for_mesh, ensure_cpu_devices, parse_flags, run_main

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
FLAGS = flags.FLAGS


def main() -> None:
    parse_flags(sys.argv)
    if FLAGS.config is None:
        raise ConfigError("no --config given", "pass --config configs/tiny.py")
    if not FLAGS.workdir:
        raise ConfigError("no --workdir given", "pass --workdir runs/NAME")
    # Must happen before jax is imported: a CPU host gets the devices the mesh asks for.
    ensure_cpu_devices(devices_for_mesh(FLAGS.config.mesh, FLAGS.num_processes or 1))

    from ringformer.launch.distributed import initialize_distributed
    from ringformer.train.loop import train_and_evaluate

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if result.get("stopped_by_signal"):
        print(f"stopped at step {result['step']}: checkpoint saved, run again to resume",
              file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
