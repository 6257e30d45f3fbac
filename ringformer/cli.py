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
