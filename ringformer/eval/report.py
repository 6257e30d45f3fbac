"""Side-by-side report of several evaluations (the long-context recipe's stage 1 and 2).

Reads the OUT.json files of `scripts/eval.py` runs with a generation passkey table, draws
both stages' heatmaps in one PNG, their loss-by-position curves on one plot and their
accuracy by how far back the key sits on another, and returns the accuracy per length and per
distance as markdown tables for docs/long_context.md.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from ringformer.errors import DataError
from ringformer.eval import plots


def _load(path: str | Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the evaluation {path}: {e}",
                        "run scripts/eval.py --out FILE first") from None
    if not isinstance(result, dict) or "loss_by_position" not in result:
        raise DataError(f"{path} is not an evaluation of scripts/eval.py",
                        "pass the OUT.json files eval.py wrote")
    return result


def markdown(results: dict) -> str:
    """Greedy passkey accuracy per length (rows: runs) and the held-out loss, as markdown."""
    lengths = sorted({n for r in results.values() for n in r.get("passkey", {}).get("lengths", [])})
    head = "| run | " + " | ".join(f"{n:,}" for n in lengths) + " | all | held-out loss |"
    lines = [head, "|" + "---|" * (len(lengths) + 3)]
    for name, r in results.items():
        pk = r.get("passkey", {})
        acc = dict(zip(pk.get("lengths", []), pk.get("greedy_by_length", []), strict=False))
        cells = [f"{acc[n]:.0%}" if acc.get(n) is not None else "-" for n in lengths]
        mean = pk.get("greedy_mean")
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {'-' if mean is None else f'{mean:.0%}'} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


# Buckets of how far back a key sits from the question. Accuracy by length mixes near and far
# keys (at depth 100% of a 16K prompt the key is a sentence back); this separates them.
DISTANCE_EDGES = (0, 1024, 2048, 4096, 8192, 16384)


def by_distance(passkey: dict, edges: Sequence[int] = DISTANCE_EDGES) -> list[tuple[int, int]]:
    """(found, prompts) per bucket [edges[i], edges[i + 1]) of the distance from each prompt's
    key to its end, (1 - depth) x prompt tokens (the filler around the key sets the depth; the
    question after it is a few tokens); the last bucket also takes anything further."""
    counts = [[0, 0] for _ in edges[:-1]]
    for e in passkey.get("examples", []):
        back = (1.0 - e["depth"]) * e["prompt_tokens"]
        bucket = counts[min(max(bisect.bisect_right(edges, back) - 1, 0), len(counts) - 1)]
        bucket[0] += bool(e["greedy"])
        bucket[1] += 1
    return [(found, n) for found, n in counts]


def distance_markdown(results: dict, edges: Sequence[int] = DISTANCE_EDGES) -> str:
    """Greedy keys found / prompts per distance bucket (rows: runs), as markdown."""
    names = [f"{a:,}-{b:,}" for a, b in itertools.pairwise(edges)]
    lines = ["| run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, r in results.items():
        cells = [f"{f}/{n}" if n else "-" for f, n in by_distance(r.get("passkey", {}), edges)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(evals: dict[str, str | Path], out_dir: str | Path, prefix: str = "longctx") -> dict:
    """PNGs `prefix`_passkey.png, `prefix`_distance.png and `prefix`_loss_by_position.png, and
    `prefix`_summary.md, in out_dir; returns their paths and the markdown."""
    results = {name: _load(p) for name, p in evals.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = {"loss_plot": str(plots.plot_stages_loss(results, out / f"{prefix}_loss_by_position.png"))}
    tables = {n: r["passkey"] for n, r in results.items() if "greedy_by_length" in r.get("passkey", {})}
    if tables:
        made["passkey_plot"] = str(plots.plot_stages_passkey(tables, out / f"{prefix}_passkey.png"))
    made["markdown"] = markdown(results)
    if any(t.get("examples") for t in tables.values()):
        rows = {n: by_distance(t) for n, t in tables.items()}
        made["distance_plot"] = str(plots.plot_stages_distance(rows, DISTANCE_EDGES,
                                                               out / f"{prefix}_distance.png"))
        made["markdown"] += "\n" + distance_markdown(results)
    (out / f"{prefix}_summary.md").write_text(made["markdown"])
    return made
