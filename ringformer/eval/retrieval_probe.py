"""Teacher-forced retrieval probe: how far back can a model fetch each kind of answer token?

Greedy passkey accuracy needs every token of a key right, so a model that finds a key's first
digit 4K tokens back but loses the next four scores the same 0% as one that finds nothing.
The probe shows the difference. It builds fresh examples of each retrieval task in the
training format (`ringformer.data.retrieval.TASKS`, training filler and keys) at each
length, feeds prompt and answer in one forward pass (teacher forcing), and counts how often
the argmax at an answer position is the answer token, in three classes:

- first digit: the first digit of a number. It is found by what precedes it ("The pass key
  is", "The code of NAME is"): a match on several earlier tokens;
- other digits: a digit right after a digit. Its previous token is the digit just written,
  and the same digit can sit anywhere in the context: this is copying (induction);
- other: every other answer token (names copied from the question, words, punctuation).

Chance for a digit is about 0.1. The probe is a reading for people, not a benchmark. Its
tasks (`TASKS`) are the training ones and `heldout_passkey`: passkeys on the benchmark's own
filler with held-out keys, as `scripts/eval.py` scores them, which shows when a model that
retrieves in the training format fails on the benchmark's filler (docs/long_context.md).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ringformer.data import retrieval
from ringformer.data.tokenizer import Tokenizer
from ringformer.eval import plots

FIRST, REST, OTHER = "first digit", "other digits", "other"
TASKS = {**retrieval.TASKS, "heldout_passkey": retrieval.heldout_passkey_example}
CLASSES = (FIRST, REST, OTHER)
# ids [s] -> argmax [s] of the prediction at each position (of the token after it).
ArgmaxFn = Callable[[np.ndarray], np.ndarray]


def token_classes(pieces: Sequence[str]) -> list[str]:
    """The class of each answer token given the decoded tokens before and in the answer:
    `pieces[0]` is the last prompt token, the rest are the answer's."""
    out = []
    for prev, piece in itertools.pairwise(pieces):
        if piece.strip().isdigit():
            out.append(REST if prev.strip().isdigit() else FIRST)
        else:
            out.append(OTHER)
    return out


def sized_examples(task: str, tokenizer: Tokenizer, length: int, n: int,
                   rng: np.random.Generator) -> list[dict]:
    """`n` examples of `task` of about `length` tokens (answer and EOS included): the
    generators count characters, so characters per token are measured on a first few."""
    make = TASKS[task]
    trial = [make(rng, 4 * length) for _ in range(4)]
    chars = sum(len(r["prompt"]) + len(r["response"]) for r in trial)
    tokens = sum(len(tokenizer.encode(r["prompt"] + r["response"])) for r in trial)
    return [make(rng, max(1, round((length - 1) * chars / tokens))) for _ in range(n)]


def score_example(argmax: ArgmaxFn, tokenizer: Tokenizer, example: dict) -> dict[str, list[int]]:
    """{class: [correct, total]} over the answer tokens of one example."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompt = bos + tokenizer.encode(example["prompt"])
    ids = np.asarray(prompt + tokenizer.encode(example["response"]), np.int32)
    best = np.asarray(argmax(ids))
    start = len(prompt)
    classes = token_classes([tokenizer.decode([int(t)]) for t in ids[start - 1:]])
    counts = {c: [0, 0] for c in CLASSES}
    for j, c in zip(range(start, len(ids)), classes, strict=True):
        counts[c][0] += int(best[j - 1] == ids[j])
        counts[c][1] += 1
    return counts


def run_probe(argmax: ArgmaxFn, tokenizer: Tokenizer, *, tasks: Sequence[str],
              lengths: Sequence[int], per_length: int, seed: int = 0,
              progress: bool = True) -> dict:
    """Accuracy per task, class and length: {"tasks", "lengths", "classes", "accuracy":
    {task: {class: [acc or None per length]}}, "counts": the same with [correct, total]}."""
    rng = np.random.default_rng(seed)
    counts = {t: {c: [[0, 0] for _ in lengths] for c in CLASSES} for t in tasks}
    bar = tqdm(total=len(tasks) * len(lengths) * per_length, desc="retrieval probe",
               unit="example", disable=not progress)
    for task in tasks:
        for i, n in enumerate(lengths):
            for ex in sized_examples(task, tokenizer, n, per_length, rng):
                for c, (ok, total) in score_example(argmax, tokenizer, ex).items():
                    counts[task][c][i][0] += ok
                    counts[task][c][i][1] += total
                bar.update()
    bar.close()
    accuracy = {t: {c: [ok / total if total else None for ok, total in counts[t][c]]
                    for c in CLASSES} for t in tasks}
    return {"tasks": list(tasks), "lengths": [int(n) for n in lengths],
            "classes": list(CLASSES), "accuracy": accuracy, "counts": counts}


def markdown(result: dict) -> str:
    """One row per task and class, one column per length."""
    lengths = result["lengths"]
    lines = ["| task | answer tokens | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|" + "---|" * (len(lengths) + 2)]
    for t in result["tasks"]:
        for c in result["classes"]:
            cells = ["-" if a is None else f"{a:.2f}" for a in result["accuracy"][t][c]]
            lines.append(f"| {t} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_argmax(cfg, params: dict, mesh) -> ArgmaxFn:
    """The argmax function of a model on `mesh` (ring attention over sp, any length): ids
    are padded to the length the layout and the attention chunks divide, as for prefill."""
    import jax
    import jax.numpy as jnp

    from ringformer import model
    from ringformer.generate.api import prefill_config

    @functools.partial(jax.jit, static_argnames="run_cfg")
    def best(run_cfg, params, tokens):
        return jnp.argmax(model.logits(run_cfg, params, tokens, mesh=mesh), axis=-1)

    def argmax(ids: np.ndarray) -> np.ndarray:
        run_cfg, s = prefill_config(cfg, len(ids), mesh.shape["sp"])
        rows = mesh.shape["dp"] * mesh.shape["fsdp"]
        tokens = np.zeros((rows, s), np.int32)
        tokens[:, :len(ids)] = ids  # padding only follows: causal, it changes nothing before
        return np.asarray(best(run_cfg, params, tokens))[0, :len(ids)]

    return argmax


def plot(result: dict, path, title: str = ""):
    """Accuracy heatmap: one row per task and answer-token class, one column per length."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(t, c) for t in result["tasks"] for c in result["classes"]]
    acc = np.array([[np.nan if a is None else a for a in result["accuracy"][t][c]]
                    for t, c in rows], float)
    lengths = result["lengths"]
    fig = Figure(figsize=(3.0 + 0.9 * len(lengths), 1.2 + 0.32 * len(rows)), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = plots.accuracy_grid(ax, acc, [str(n) for n in lengths], [f"{t}: {c}" for t, c in rows],
                             "example length (tokens)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="teacher-forced argmax accuracy")
    ax.set_title(title or "retrieval probe (chance for a digit ~0.1)")
    path = Path(path)
    fig.savefig(path)
    return path
