"""Stage 1 and stage 2 of the long-context recipe side by side (docs/long_context.md).

    python scripts/longctx_report.py --eval stage1=runs/longctx/eval_stage1.json \
        --eval stage2=runs/longctx/eval_stage2.json --out_dir docs/images

Writes OUT_DIR/longctx_passkey.png (greedy passkey heatmaps), longctx_distance.png (accuracy
by how far back the key sits), longctx_loss_by_position.png (both loss-by-position curves on
one plot) and longctx_summary.md (accuracy per length and per distance).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringformer.errors import ConfigError
from ringformer.launch.flags import ArgumentParser, run_main


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", action="append", required=True,
                        help="NAME=PATH of an eval.py OUT.json (repeat, in plot order)")
    parser.add_argument("--out_dir", default="docs/images")
    parser.add_argument("--prefix", default="longctx")
    args = parser.parse_args()
    evals = {}
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--eval {item!r} is not NAME=PATH", "e.g. --eval stage1=eval.json")
        evals[name] = path

    from ringformer.eval.report import compare

    made = compare(evals, args.out_dir, args.prefix)
    print(made["markdown"], end="")
    print("plots:", made["loss_plot"], made.get("passkey_plot", "(no passkey table)"),
          made.get("distance_plot", ""))
    return 0


if __name__ == "__main__":
    run_main(main)
