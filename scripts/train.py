"""Train a model from a config file; running it again on the same workdir resumes.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny [--config.train.steps=50]

Will it fit? Compile the step without running it (no workdir needed, none is touched):

    python scripts/train.py --config configs/tiny.py --dry_run [--json]
    python scripts/train.py --config configs/llama_1b_32k.py --dry_run --target h100

A dry run exits 0 when the step fits the device memory and 1 when it does not.
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
flags.DEFINE_bool("dry_run", False, "Compile the training step and report memory and FLOPs per "
                  "device, and whether it fits; runs no step and writes nothing.")
flags.DEFINE_bool("json", False, "With --dry_run: print the report as one JSON object.")
flags.DEFINE_string("target", None, "With --dry_run: compile for this GPU (e.g. h100, compile "
                    "only; needs jax-cuda12-plugin) instead of this machine's devices.")
flags.DEFINE_integer("devices", None, "With --dry_run --target: how many GPUs to compile for "
                     "(default: the mesh's product).")
flags.DEFINE_float("device_memory_gib", None, "With --dry_run: judge against this much memory "
                   "per device instead of the device's own.")
FLAGS = flags.FLAGS


def main() -> None:
    parse_flags(sys.argv)
    if FLAGS.config is None:
        raise ConfigError("no --config given", "pass --config configs/tiny.py")
    if FLAGS.dry_run:
        return _dry_run()
    for name in ("json", "target", "devices", "device_memory_gib"):
        if FLAGS[name].present:
            raise ConfigError(f"--{name} is a dry-run flag", "add --dry_run, or drop it")
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


def _dry_run() -> int:
    if FLAGS.target:
        # Compile-only GPU devices need the CUDA plugin's compiler, not the CUDA runtime
        # whose version it would otherwise check (there is no GPU here to run on).
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    else:
        ensure_cpu_devices(devices_for_mesh(FLAGS.config.mesh, 1))
    import json

    from ringformer.train.dry_run import dry_run, format_report

    memory = None if FLAGS.device_memory_gib is None else int(FLAGS.device_memory_gib * 2**30)
    report = dry_run(FLAGS.config, target=FLAGS.target, n_devices=FLAGS.devices,
                     device_memory_bytes=memory)
    print(json.dumps(report) if FLAGS.json else format_report(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    run_main(main)
