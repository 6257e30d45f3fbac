"""Teacher-forced retrieval probe of a run: how far back each kind of answer token is found.

    python scripts/longctx_probe.py --workdir runs/longctx/stage1 \
        --lengths 64,256,1024,4096 --out runs/longctx/probe_stage1.json

Fresh training-format examples of each task (passkey, key-value, copy) and passkeys on the
benchmark's held-out filler and keys (heldout_passkey) at each length, fed with their
answers; the argmax accuracy of first digits, later digits and other answer tokens
(ringformer/eval/retrieval_probe.py). Writes OUT.json, OUT.png (heatmap) and prints a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringformer.config import parse_mesh_flag
from ringformer.errors import ConfigError
from ringformer.launch.flags import ArgumentParser, devices_for_mesh, ensure_cpu_devices, run_main


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="Training run (its newest checkpoint).")
    p.add_argument("--step", type=int, default=None, help="This checkpoint step instead.")
    p.add_argument("--tasks", default="passkey,kv,copy,heldout_passkey",
                   help="Retrieval tasks, comma-separated.")
    p.add_argument("--lengths", default="64,256,1024,4096", help="Example lengths in tokens.")
    p.add_argument("--per_length", type=int, default=8, help="Examples per task and length.")
    p.add_argument("--mesh", default=None, help="dp=..,fsdp=..,sp=..,tp=.. (default: sp).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="Output JSON; the heatmap PNG goes beside it.")
    a = p.parse_args()
    from ringformer.eval.retrieval_probe import TASKS

    tasks = [t for t in a.tasks.split(",") if t]
    if not tasks or set(tasks) - set(TASKS):
        raise ConfigError(f"--tasks {a.tasks!r} names no task or an unknown one",
                          f"choose from {','.join(sorted(TASKS))}")
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 16 or a.per_length < 1:
        raise ConfigError(f"--lengths {a.lengths!r} / --per_length {a.per_length} are not "
                          "lengths of 16 tokens or more and a positive count",
                          "use e.g. --lengths 64,1024 --per_length 8")
    sizes = parse_mesh_flag(a.mesh) if a.mesh else None
    ensure_cpu_devices(devices_for_mesh(sizes or {"dp": 1, "fsdp": 1, "sp": -1, "tp": 1}))

    from ringformer.eval import retrieval_probe as probe
    from ringformer.eval.tool import eval_mesh, load_model, model_tokenizer

    mesh, sizes = eval_mesh(sizes, max(lengths), None)
    cfg, params, spec, source = load_model(mesh_sizes=sizes, context=max(lengths),
                                           workdir=a.workdir, step=a.step)
    tok = model_tokenizer(spec or "byte", cfg, None)
    result = probe.run_probe(probe.model_argmax(cfg, params, mesh), tok, tasks=tasks,
                             lengths=lengths, per_length=a.per_length, seed=a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": source, **result}, indent=1))
    png = probe.plot(result, out.with_suffix(".png"), title=f"retrieval probe: {source}")
    print(probe.markdown(result), end="")
    print(f"-> {out} {png}")
    return 0


if __name__ == "__main__":
    run_main(main)
