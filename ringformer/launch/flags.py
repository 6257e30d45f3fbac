"""The scripts' flags and entry-point plumbing: one error path, --help, CPU virtual devices.

Every script wraps its body in `run_main`, so expected failures end as one line
`error: <what> (<fix>)` with exit status 2, and `--debug` brings the traceback back.
Scripts built on a config file (train, eval, convert_hf) use absl flags through
`parse_flags`; the others use `ArgumentParser`. Both answer --help with exit 0 and spell
flags with underscores.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

from ringformer.config import check_config, check_structure
from ringformer.errors import ConfigError, UserError


def ensure_cpu_devices(n: int, *, exactly: bool = False) -> None:
    """Give a CPU-only host `n` virtual devices; must run before jax is imported.

    A count already in XLA_FLAGS (the test suite sets 8) wins, unless `exactly`: then it is
    replaced, and a call after jax was imported is an error rather than a silent no-op.
    On a machine with an accelerator the flag is harmless: it only affects the host platform.
    """
    if "jax" in sys.modules:
        if exactly:
            raise RuntimeError("ensure_cpu_devices(exactly=True) must run before jax is imported")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if exactly:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags).strip()
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own error path prints usage and a second line; ours is one `error:` line."""

    def error(self, message: str):
        raise ConfigError(message, "see --help")


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`, mapping UserError to a one-line message and exit status 2."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        code = main()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        _exit_all_processes(f"error: {e}", 2)
        _exit_past_stuck_threads(2)
        sys.exit(2)
    except KeyboardInterrupt:
        message = "error: interrupted (run the same command again to resume)"
        print(message, file=sys.stderr)
        # A signal before the training loop reaches this process alone; its peers, waiting
        # in a collective for it, must leave now with the same message, not after a timeout.
        _exit_all_processes(message, 130)
        sys.exit(130)
    sys.exit(code or 0)


def _exit_past_stuck_threads(code: int) -> None:
    """Exit now if a library thread would keep the process alive after the error.

    A failed checkpoint save leaves orbax's writer threads (not daemons) waiting 300 s each
    for a directory that was never made, and Python joins them at exit. Everything of ours is
    closed by now (the trainer's `finally` blocks ran), so nothing is lost by not waiting.
    """
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_all_processes(message: str, code: int) -> None:
    """In a multi-process run, stop the other processes with this error, then exit now.

    The peers may be blocked in a collective waiting for this process; `stop_peers` makes
    them exit with the message, and exiting without JAX's shutdown barrier keeps this one
    from waiting out its timeout for peers that are leaving. Returns on a single process.
    """
    dist = sys.modules.get("ringformer.launch.distributed")  # not imported: no distributed run
    if dist is None or dist.distributed_watchdog() is None:
        return
    dist.stop_peers(message, code)
    dist._hard_exit(code)


# The CPU devices are made when jax starts, before the mesh can be checked: a typo such as
# sp=20000 had the host build 40000 of them and hang. No host holds this many accelerators
# either, so past it the mesh is a mistake or wants more processes.
MAX_DEVICES_PER_PROCESS = 512


def devices_for_mesh(mesh_cfg, num_processes: int = 1) -> int:
    """Virtual CPU devices this process needs for `mesh_cfg` (-1 fills up to 8 in all)."""
    axes = ("dp", "fsdp", "sp", "tp")
    try:
        sizes = [int(mesh_cfg[a]) for a in axes]
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"mesh sizes {dict(mesh_cfg)} are not all integers",
                          "set each of dp, fsdp, sp, tp to a positive integer or -1") from e
    known = 1
    for s in sizes:
        if s > 0:
            known *= s
    total = known if -1 not in sizes else max(known, 8 // known * known if known <= 8 else known)
    per_process = max(1, total // max(num_processes, 1))
    if per_process > MAX_DEVICES_PER_PROCESS:
        shape = " x ".join(f"{a}={s}" for a, s in zip(axes, sizes, strict=True))
        raise ConfigError(f"mesh {shape} needs {per_process} devices in one process, more than the "
                          f"{MAX_DEVICES_PER_PROCESS} allowed",
                          "check the mesh sizes for a typo; a bigger mesh runs as several processes,"
                          " see --num_processes")
    return per_process


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull")


def exit_if_help(argv: list[str]) -> None:
    """Print the script's usage and its flags, then exit 0, if `argv` asks for help.

    absl defines --help only inside `app.run`, which the scripts do not use (`run_main` is
    their error path), so without this `--help` was refused as an unknown flag.
    `--helpfull` adds the flags of every library module (absl's own included).
    """
    asked = [a for a in argv[1:] if a in HELP_FLAGS]
    if not asked:
        return
    from absl import flags

    main = sys.modules.get("__main__")
    script = os.path.relpath(argv[0]) if argv and argv[0] else "script"
    print(f"usage: python {script} [flags]")
    doc = ((main.__doc__ if main else None) or "").strip()
    if doc:
        print(f"\n{doc}")
    if "--helpfull" in asked:
        listing = flags.FLAGS.get_help()
    else:
        listing = flags.FLAGS.main_module_help()
    print(f"\nflags:\n{listing.strip() or '  (none)'}")
    from ml_collections.config_flags.config_flags import is_config_flag

    if any(is_config_flag(flags.FLAGS[n]) for n in flags.FLAGS):
        print("  --config.KEY=VALUE: override any key of the config file (every key and its "
              "default is in ringformer/config.py)")
    print("  --debug: show the traceback of an error")
    sys.stdout.flush()
    sys.exit(0)


def parse_flags(argv: list[str]) -> None:
    """Parse absl flags, turning a bad flag, config file or config override into a ConfigError.

    ml_collections reports these in three different ways, none of them one line: an unknown
    `--config.a.b` key escapes as a raw AttributeError/KeyError, an exception inside the
    config file's code escapes as itself, and a config file that cannot be read is only
    recorded, to be raised as OSError when the config is first touched. All three end here,
    each chained to the original exception so that `--debug` shows where it began.
    A loaded config is then checked as far as it can be without devices (`check_config`).
    """
    exit_if_help(argv)
    from absl import flags

    # Public in the submodule, though not re-exported by the package.
    from ml_collections.config_flags.config_flags import is_config_flag

    config_names = [n for n in flags.FLAGS if is_config_flag(flags.FLAGS[n])]
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        msg = lines[0]
        if "Error whilst parsing config file" in msg:  # the cause is the traceback's last line
            msg = f"{msg} {lines[-1]}"
        raise ConfigError(msg, "check the flag names and config keys (--helpfull lists flags)"
                          ) from e
    except Exception as e:
        unknown = _unknown_override(e, argv, config_names)
        if unknown is not None:
            raise unknown from e
        raise ConfigError(f"config file {_config_path(argv, config_names)} failed to load: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "fix that file (--debug shows the traceback)") from e
    for name in config_names:
        flag = flags.FLAGS[name]
        if not flag.present:
            continue
        path = flag.config_filename.split(":", 1)[0]
        try:
            flag.value.keys()  # ml_collections raises its recorded load error on first touch
        except OSError as e:
            if not os.path.exists(path):
                raise ConfigError(f"config file {path} does not exist",
                                  "pass an existing file, e.g. --config configs/tiny.py") from e
            raise ConfigError(f"cannot read config file {path}",
                              "check that it is a readable Python file") from e
        except AttributeError as e:
            raise ConfigError(f"config file {path} does not return a config from get_config()",
                              "make get_config() return an ml_collections.ConfigDict") from e
        # Before jax starts: scripts read config.mesh next to size the CPU devices, and a
        # missing or None key would escape there as a raw AttributeError or TypeError.
        try:
            check_structure(flag.value)
        except ConfigError as e:
            raise ConfigError(_blame(e.what, argv, name, path), e.fix) from e
        check_config(flag.value)


def _blame(what: str, argv: list[str], name: str, path: str) -> str:
    """`what` ("section.key=value ...") said of the flag that set the value, else of the file.

    A value given as `--config.optim.lr=inf` was reported as "config file X.py: ...", sending
    the user to a file that never held it.
    """
    key = re.match(r"([A-Za-z_]\w*\.[A-Za-z_]\w*)=", what)
    if key:
        for arg in argv:
            for prefix in (f"--{name}.", f"-{name}."):
                if arg.startswith(prefix) and arg[len(prefix):].split("=", 1)[0] == key[1]:
                    return f"--{name}.{what}"
    return f"config file {path}: {what}"


def _config_path(argv: list[str], config_names: list[str]) -> str:
    """The value given to the first config flag (`--config X` or `--config=X`), for messages."""
    for i, arg in enumerate(argv):
        for name in config_names:
            for prefix in (f"--{name}", f"-{name}"):
                if arg.startswith(prefix + "="):
                    return arg.split("=", 1)[1]
                if arg == prefix and i + 1 < len(argv):
                    return argv[i + 1]
    return "(unknown)"


def _unknown_override(err: Exception, argv: list[str], config_names: list[str]):
    """A ConfigError naming the `--config.a.b` override `err` complains about, else None.

    ml_collections raises KeyError (or AttributeError wrapping one) whose text is the missing
    key, quoted, optionally followed by a `Did you mean "x"` line. The error counts as an
    unknown override only if that key is a segment of an override given on the command
    line; otherwise it came from the config file's own code.
    """
    if not isinstance(err, AttributeError | KeyError | IndexError):
        return None
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    text = str(err.args[0]) if err.args else ""
    key, _, hint = text.partition("\n")
    key = key.strip().strip("'\"")
    for arg in argv:
        for name in config_names:
            for prefix in (f"--{name}.", f"--no{name}.", f"-{name}.", f"-no{name}."):
                if arg.startswith(prefix):
                    path = arg[len(prefix):].split("=", 1)[0]
                    if key in path.split("."):
                        fix = (f"{hint.strip()} Every" if hint.strip() else "every") + \
                            " key and its default is in ringformer/config.py"
                        return ConfigError(f"unknown config key {key!r} in --{name}.{path}", fix)
    return None
