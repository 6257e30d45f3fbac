"""Every script in scripts/ answers --help: exit 0 and a usage text that names its flags.

The scripts run side by side as subprocesses (help stops before jax is imported, so each
takes about a second); a script added later is covered without touching this file.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))

# Flags each known script must list; a new script only has to print a usage with some flag.
EXPECTED = {
    "train.py": ["--config", "--workdir", "--num_processes", "--config.KEY=VALUE"],
    "eval.py": ["--workdir", "--hf", "--data", "--context", "--out", "--passkey_lengths"],
    "convert_hf.py": ["--workdir", "--out", "--step", "--config"],
    "prepare_data.py": ["--out", "--limit", "--passkey_lengths", "--passkey_depths",
                        "--eval_fraction"],
    "bench.py": ["--json", "--seq", "--sp", "--budget_gib", "--target"],
    "generate.py": ["--workdir", "--hf", "--prompt", "--max_new_tokens", "--temperature"],
}


def _help_outputs(flag: str) -> dict[str, subprocess.CompletedProcess]:
    procs = {p.name: subprocess.Popen([sys.executable, str(p), flag], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for p in SCRIPTS}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_every_script_prints_its_flags_on_help():
    assert {p.name for p in SCRIPTS} >= set(EXPECTED)
    for name, r in _help_outputs("--help").items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert r.stdout.startswith("usage:"), (name, r.stdout[:500])
        assert "--" in r.stdout and "Traceback" not in r.stderr, name
        for flag in EXPECTED.get(name, []):
            assert flag in r.stdout, (name, flag)


def test_short_help_works_too():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval.py"), "-h"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--context" in r.stdout, r.stderr[-2000:]
