"""The retrieval probe (ringformer/eval/retrieval_probe.py) against predictors whose scores
are known without the probe: an oracle that always names the next token, one that repeats
the current token, and the classes counted by hand. The real model path runs in
tests/test_longctx.py on the recipe's toy stage 1."""

import numpy as np
import pytest

from ringformer.data.tokenizer import ByteTokenizer
from ringformer.eval import retrieval_probe as probe


def test_token_classes_split_first_digit_from_the_rest():
    pieces = ["is", " ", "3", "6", "6", ".", "\n", "7"]
    assert probe.token_classes(pieces) == [probe.OTHER, probe.FIRST, probe.REST, probe.REST,
                                           probe.OTHER, probe.OTHER, probe.FIRST]


def _oracle(ids):
    # The prediction at j is the token at j + 1: perfect under teacher forcing.
    return np.append(ids[1:], 0)


def test_oracle_scores_one_and_every_answer_token_is_counted():
    tok = ByteTokenizer()
    r = probe.run_probe(_oracle, tok, tasks=["passkey", "kv", "copy", "heldout_passkey"],
                        lengths=[64, 300], per_length=3, seed=1, progress=False)
    for t in r["tasks"]:
        for c in probe.CLASSES:
            assert all(a == 1.0 for a in r["accuracy"][t][c] if a is not None), (t, c)
    # A byte passkey answer " 12345." (+ no EOS in the response) has one first digit,
    # four others and two other bytes, for each of the 3 examples per length.
    assert r["counts"]["passkey"][probe.FIRST] == [[3, 3], [3, 3]]
    assert r["counts"]["passkey"][probe.REST] == [[12, 12], [12, 12]]
    assert r["counts"]["passkey"][probe.OTHER] == [[6, 6], [6, 6]]
    assert r["counts"]["heldout_passkey"] == r["counts"]["passkey"]  # the same answer shape
    table = probe.markdown(r)
    assert "| passkey | first digit | 1.00 | 1.00 |" in table


def test_repeating_the_current_token_is_right_only_on_repeated_digits():
    tok = ByteTokenizer()
    ex = {"prompt": "The pass key is", "response": " 33945."}
    counts = probe.score_example(lambda ids: ids, tok, ex)  # predicts ids[j] at j: a repeat
    # targets " ", "3", "3", "9", "4", "5", ".": right only where "3" follows "3".
    assert counts == {probe.FIRST: [0, 1], probe.REST: [1, 4], probe.OTHER: [0, 2]}


def test_examples_are_sized_in_tokens_and_seeded():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for task in ("passkey", "kv", "copy", "heldout_passkey"):
        exs = probe.sized_examples(task, tok, 500, 4, rng)
        n = [len(tok.encode(e["prompt"] + e["response"])) + 1 for e in exs]
        assert all(350 <= x <= 500 for x in n), (task, n)
    a = probe.run_probe(_oracle, tok, tasks=["kv"], lengths=[100], per_length=2, seed=5,
                        progress=False)
    assert a == probe.run_probe(_oracle, tok, tasks=["kv"], lengths=[100], per_length=2,
                                seed=5, progress=False)


def test_plot_writes_a_png(tmp_path):
    r = probe.run_probe(_oracle, ByteTokenizer(), tasks=["passkey"], lengths=[64],
                        per_length=1, progress=False)
    path = probe.plot(r, tmp_path / "probe.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "passkey,nope"], "--tasks"),
    (["--lengths", "64,abc"], "--lengths"),
    (["--lengths", "8"], "--lengths"),
    (["--per_length", "0"], "--per_length"),
])
def test_script_refuses_bad_options_with_one_line(argv, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "scripts" / "longctx_probe.py"),
                        "--workdir", str(tmp_path), "--out", str(tmp_path / "p.json"), *argv],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "p.json").exists()
