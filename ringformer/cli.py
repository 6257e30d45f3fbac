"""Shared entry-point plumbing for scripts: one error path and CPU virtual devices.

Every script wraps its body in `run_main`, so expected failures end as one line
`error: <what> (<fix>)` with exit status 2, and `--debug` brings the traceback back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def ensure_cpu_devices(n: int) -> None:
    """Give a CPU-only host `n` virtual devices; must run before jax is imported.

    On a machine with an accelerator the flag is harmless: it only affects the host platform.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, mapping UserError to a one-line message and exit status 2."""
    from ringformer.errors import UserError

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        code = main()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (run the same command again to resume)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def devices_for_mesh(mesh_cfg, num_processes: int = 1) -> int:
    """Virtual CPU devices this process needs for `mesh_cfg` (-1 fills up to 8 in all)."""
    sizes = [int(mesh_cfg[a]) for a in ("dp", "fsdp", "sp", "tp")]
    known = 1
    for s in sizes:
        if s > 0:
            known *= s
    total = known if -1 not in sizes else max(known, 8 // known * known if known <= 8 else known)
    return max(1, total // max(num_processes, 1))


def parse_flags(argv: list[str]) -> None:
    """Parse absl flags, turning a bad flag or config override into a UserError."""
    from absl import flags

    from ringformer.errors import ConfigError

    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(msg, "check the flag names and config keys (--helpfull lists flags)") from None
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"cannot read config file: {e}", "pass an existing configs/NAME.py") from None
