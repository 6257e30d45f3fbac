"""The side-by-side report: accuracy by the key's distance from the question, its table and plot."""

import json

from ringformer.eval import report


def _example(prompt_tokens: int, depth: float, greedy: bool) -> dict:
    return {"prompt_tokens": prompt_tokens, "depth": depth, "greedy": greedy}


# (prompt tokens, depth, found) -> bucket, by hand: (1 - depth) x prompt tokens back.
EXAMPLES = [
    (1000, 0.0, True, 0),     # 1000 back
    (16000, 1.0, True, 0),    # at the end of a long prompt: 0 back
    (4000, 0.5, False, 1),    # 2000
    (8192, 0.5, True, 3),     # 4096: a bucket's start belongs to it
    (8192, 0.75, False, 2),   # 2048
    (16000, 0.0, False, 4),   # 16000
    (20000, 0.0, True, 4),    # past the last edge: counted in the last bucket
]


def _passkey(examples=EXAMPLES) -> dict:
    return {"lengths": [1024], "depths": [0.0], "greedy_accuracy": [[0.0]],
            "greedy_by_length": [0.0], "greedy_mean": 0.0,
            "examples": [_example(n, d, g) for n, d, g, _ in examples]}


def test_by_distance_counts_each_prompt_in_its_bucket():
    want = [[0, 0] for _ in report.DISTANCE_EDGES[:-1]]
    for _, _, found, bucket in EXAMPLES:
        want[bucket][0] += found
        want[bucket][1] += 1
    assert report.by_distance(_passkey()) == [tuple(w) for w in want]
    assert report.by_distance(_passkey()) == [(2, 2), (0, 1), (0, 1), (1, 1), (1, 2)]


def test_distance_table_and_plot_beside_the_others(tmp_path):
    evals = {}
    for name, ex in (("stage 1", EXAMPLES[:3]), ("stage 2", EXAMPLES)):
        path = tmp_path / f"{name[-1]}.json"
        result = {"loss": 5.0, "tokens": 8, "passkey": _passkey(ex),
                  "loss_by_position": [{"start": 0, "end": 8, "loss": 5.0, "tokens": 8}]}
        path.write_text(json.dumps(result))
        evals[name] = path
    made = report.compare(evals, tmp_path / "out")
    assert (tmp_path / "out" / "longctx_distance.png").stat().st_size > 0
    assert made["distance_plot"].endswith("longctx_distance.png")
    table = made["markdown"].split("\n\n")[1]
    assert "| stage 1 | 2/2 | 0/1 | - | - | - |" in table
    assert "| stage 2 | 2/2 | 0/1 | 0/1 | 1/1 | 1/2 |" in table
    assert (tmp_path / "out" / "longctx_summary.md").read_text() == made["markdown"]


def test_no_distance_table_without_examples(tmp_path):
    """Older evaluations kept no per-prompt examples: the report leaves the table out."""
    passkey = {k: v for k, v in _passkey().items() if k != "examples"}
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"loss": 5.0, "tokens": 8, "passkey": passkey,
                                "loss_by_position": [{"start": 0, "end": 8, "loss": 5.0,
                                                      "tokens": 8}]}))
    made = report.compare({"old": path}, tmp_path / "out")
    assert "distance_plot" not in made and made["markdown"].count("| run |") == 1  # one table
    assert not (tmp_path / "out" / "longctx_distance.png").exists()
