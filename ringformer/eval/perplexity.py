"""Evaluation: the loss the trainer reports, and perplexity of long documents.

The trainer's `eval_loss` runs `make_eval_step` (model.loss_fn). The long-document evaluator
scores with `token_nll`, built from the same two pieces as loss_fn (model.hidden_states and
loss.chunked_cross_entropy), so a number printed during training means the same as one
printed by `scripts/eval.py` (tests check the two agree).

Long documents are cut into windows of at most `context` input tokens (`plan_windows`):
consecutive and non-overlapping by default, or sliding by `stride`, where each window scores
only the targets no earlier window scored. Every token of a document except its first (it has
no predecessor) is scored exactly once, and each window keeps its document's true positions.
Windows are padded to one sequence length that the mesh and the attention chunks divide, laid
out for ring attention on the host, scored by a jitted function that returns per-position
NLL (full logits never exist), and unpermuted back. Passkey retrieval is in passkey.py, the
plots in plots.py, and the command-line tool (loading, options, output files) in tool.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ringformer import loss as losses
from ringformer import model, sharding
from ringformer.config import check_batch
from ringformer.ops import layouts


def make_eval_step(model_cfg: model.ModelConfig, mesh) -> Callable:
    """jit(params, batch) -> (summed token NLL, token count) over one global batch."""
    return jax.jit(lambda params, batch: model.loss_fn(model_cfg, params, batch, mesh=mesh))


def eval_loss(eval_step: Callable, params, batches: Iterable[dict]) -> dict:
    """Token-weighted mean NLL over `batches`, its perplexity and the number of tokens."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, n = jax.device_get(eval_step(params, batch))
        total, count = total + float(loss_sum), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}


def token_nll(cfg: model.ModelConfig, params: dict, batch: dict, *, mesh) -> jax.Array:
    """Per-position next-token NLL [b, s] (0 where loss_mask is 0), in the batch's layout order.

    The same computation as `model.loss_fn` without the final sum, so its total equals it.
    """
    h = model.hidden_states(cfg, params, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch.get("segment_ids"), mesh=mesh)
    _, _, per = losses.chunked_cross_entropy(h, model.lm_head(cfg, params), batch["targets"],
                                             batch["loss_mask"], chunk=cfg.loss_chunk,
                                             return_per_position=True, mesh=mesh)
    return per


# ----------------------------------------------------------------------------- windows


@dataclasses.dataclass(frozen=True)
class Window:
    """Inputs doc[start : start + length] predicting doc[start + 1 : start + length + 1];
    only predictions at window index >= score_from count (earlier ones were scored before)."""

    doc: int
    start: int
    length: int
    score_from: int


def plan_windows(doc_lengths: Sequence[int], context: int,
                 stride: int | None = None) -> list[Window]:
    """Windows over documents of `doc_lengths` tokens covering each target exactly once.

    A document of n tokens has n - 1 targets (tokens 1..n-1). Without `stride` the windows
    are consecutive (every window scores all of its inputs' targets). With `stride` S <=
    context, window k starts at k*S and scores the targets past the previous window's end,
    so each scored token has at least context - S tokens of context (except in the first).
    """
    if context < 1:
        raise ValueError(f"context={context} must be at least 1")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    out = []
    for d, n in enumerate(doc_lengths):
        last = n - 1  # index of the last input with a target
        scored_to, start = 0, 0  # inputs [0, scored_to) have had their targets scored
        while scored_to < last:
            end = min(start + context, last)
            out.append(Window(d, start, end - start, scored_to - start))
            scored_to, start = end, start + stride
    return out


def covered_targets(windows: Sequence[Window]) -> list[tuple[int, int]]:
    """(doc, target index) of every scored prediction; what the coverage property checks."""
    return [(w.doc, w.start + i + 1) for w in windows for i in range(w.score_from, w.length)]


# ----------------------------------------------------------------------------- shapes


def eval_model_config(cfg: model.ModelConfig, context: int,
                      n_sp: int) -> tuple[model.ModelConfig, int]:
    """(config to evaluate with, padded sequence length) for `context` tokens over `n_sp`.

    Evaluation always uses ring attention: it is exact, and with one sp device it is blockwise
    attention. The length is rounded up so the layout's pieces and the attention chunks divide
    it (chunks shrink to fit a short context rather than pad it far out).
    """
    lay = layouts.effective(cfg.attention.layout, n_sp)
    pieces = layouts.pieces(lay, n_sp)
    piece = -(-context // pieces)
    cq, ck = min(cfg.attention.q_chunk, piece), min(cfg.attention.kv_chunk, piece)
    unit = math.lcm(cq, ck)
    piece = -(-piece // unit) * unit
    run = dataclasses.replace(cfg.with_attention(impl="ring", layout=lay, q_chunk=cq, kv_chunk=ck),
                              remat="none")
    return run, piece * pieces




# ----------------------------------------------------------------------------- evaluator


class Evaluator:
    """A model placed on a mesh, scoring [batch, seq_len] rows given in natural token order.

    Rows go through the layout permutation on the host, and results come back in natural
    order, so callers never see the layout.
    """

    def __init__(self, cfg: model.ModelConfig, params: dict, *, context: int, mesh=None,
                 batch_size: int | None = None):
        self.mesh = mesh
        self.n_sp = sharding.seq_shards(mesh)
        self.base_cfg, self.context = cfg, context
        self.cfg, self.seq_len = eval_model_config(cfg, context, self.n_sp)
        shards = 1 if mesh is None else mesh.shape["dp"] * mesh.shape["fsdp"]
        self.batch_size = batch_size or shards
        check_batch(self.batch_size, shards, label="batch size")
        self.params = self._place_params(params)
        self.perm = layouts.permutation(self.cfg.attention.layout, self.seq_len, self.n_sp)
        self._out = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
        self._nll = jax.jit(lambda p, b: token_nll(self.cfg, p, b, mesh=mesh), **self._out)
        self._answer_shapes: dict[int, tuple] = {}

    def _place_params(self, params: dict) -> dict:
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, params)
        shard = sharding.param_shardings(jax.eval_shape(lambda: params),
                                         model.param_logical_axes(self.cfg), self.mesh)

        def put(x, s):
            if isinstance(x, jax.Array):
                return jax.device_put(x, s)
            # Host arrays: every process holds the same values and gives each device its part.
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

        return jax.tree.map(put, params, shard)

    def _device(self, host: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, jax.Array]:
        """Natural-order host rows -> layout-order global arrays."""
        laid = {k: np.ascontiguousarray(v[:, perm]) for k, v in host.items()}
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in laid.items()}
        place = sharding.batch_sharding(self.mesh)
        return {k: jax.make_array_from_callback(v.shape, place, lambda idx, v=v: v[idx])
                for k, v in laid.items()}

    def nll(self, host: dict[str, np.ndarray]) -> np.ndarray:
        """Per-position NLL [b, seq_len] in natural order; host has tokens, targets, positions,
        loss_mask [b, seq_len] in natural order."""
        per = np.asarray(jax.device_get(self._nll(self.params, self._device(host, self.perm))))
        return per[:, np.argsort(self.perm)]

    def _answer_shape(self, n_tokens: int) -> tuple[int, np.ndarray, Callable]:
        """(padded length, layout permutation, jitted scorer) for rows of up to n_tokens.

        Rows are padded to a power of two (at most the context), not to the full context:
        a short passkey prompt then costs its own length, for a few extra compiles.
        """
        bucket = min(self.context, 1 << max(0, n_tokens - 1).bit_length())
        if bucket not in self._answer_shapes:
            cfg, seq_len = eval_model_config(self.base_cfg, bucket, self.n_sp)
            perm = layouts.permutation(cfg.attention.layout, seq_len, self.n_sp)
            fn = jax.jit(lambda p, b: _answer_logprobs(cfg, p, b, self.mesh), **self._out)
            self._answer_shapes[bucket] = (seq_len, perm, fn)
        return self._answer_shapes[bucket]

    def answer_scores(self, rows: Sequence[tuple[np.ndarray, int]]
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For rows (ids, answer_start): log p(ids[j] | ids[:j]) and argmax ids[:j] for
        answer_start <= j < len(ids), teacher-forced. Only those few positions get logits."""
        for ids, start in rows:
            if len(ids) > self.context or not 1 <= start < len(ids):
                raise ValueError(f"row of {len(ids)} tokens (answer at {start}) does not fit "
                                 f"the context {self.context}")
        width = max(len(ids) - start for ids, start in rows)
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        groups: dict[int, list[int]] = {}
        rep = (lambda x: jnp.asarray(x)) if self.mesh is None else \
            (lambda x: jax.device_put(x, sharding.replicated(self.mesh)))
        for i, (ids, _) in enumerate(rows):
            groups.setdefault(self._answer_shape(len(ids))[0], []).append(i)
        for members in groups.values():
            seq_len, perm, fn = self._answer_shape(len(rows[members[0]][0]))
            inv = layouts.inverse(perm)
            for lo in range(0, len(members), self.batch_size):
                chunk = members[lo:lo + self.batch_size]
                host = _empty_rows(self.batch_size, seq_len)
                index = np.zeros((self.batch_size, width), np.int32)
                answer = np.zeros((self.batch_size, width), np.int32)
                for r, i in enumerate(chunk):
                    ids, start = rows[i]
                    n = len(ids) - start
                    host["tokens"][r, :len(ids)] = ids
                    host["positions"][r, :len(ids)] = np.arange(len(ids))
                    index[r, :n] = inv[np.arange(start - 1, len(ids) - 1)]  # their predictors
                    answer[r, :n] = ids[start:]
                batch = self._device({k: host[k] for k in ("tokens", "positions")}, perm)
                batch.update(index=rep(index), answer=rep(answer))
                logp, best = (np.asarray(x) for x in jax.device_get(fn(self.params, batch)))
                for r, i in enumerate(chunk):
                    n = len(rows[i][0]) - rows[i][1]
                    out[i] = (logp[r, :n], best[r, :n])
        return [out[i] for i in range(len(rows))]


def _answer_logprobs(cfg: model.ModelConfig, params, batch, mesh):
    """(log p of batch["answer"], argmax) [b, n] at layout indices batch["index"] [b, n]:
    logits only at those positions, never for the whole sequence."""
    h = model.hidden_states(cfg, params, batch["tokens"], positions=batch["positions"], mesh=mesh)
    picked = jnp.take_along_axis(h, batch["index"][..., None], axis=1)  # [b, n, d]
    head = model.lm_head(cfg, params).astype(h.dtype)
    logp = jax.nn.log_softmax(jnp.einsum("bnd,dv->bnv", picked, head,
                                         preferred_element_type=jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, batch["answer"][..., None], axis=-1)[..., 0]
    return target, jnp.argmax(logp, axis=-1).astype(jnp.int32)


def _empty_rows(b: int, s: int) -> dict[str, np.ndarray]:
    return {"tokens": np.zeros((b, s), np.int32), "targets": np.zeros((b, s), np.int32),
            "positions": np.zeros((b, s), np.int32), "loss_mask": np.zeros((b, s), np.float32)}


def window_batches(docs: Sequence[np.ndarray], windows: Sequence[Window], seq_len: int,
                   batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], list[Window]]]:
    """Host batches [batch_size, seq_len] in natural order; unused rows are all padding."""
    for lo in range(0, len(windows), batch_size):
        group = list(windows[lo:lo + batch_size])
        host = _empty_rows(batch_size, seq_len)
        for r, w in enumerate(group):
            doc, n = docs[w.doc], w.length
            host["tokens"][r, :n] = doc[w.start:w.start + n]
            host["targets"][r, :n] = doc[w.start + 1:w.start + n + 1]
            host["positions"][r, :n] = np.arange(w.start, w.start + n)  # the document's own
            host["loss_mask"][r, w.score_from:n] = 1.0
        yield host, group


# ----------------------------------------------------------------------------- perplexity


def position_bucket(i: np.ndarray) -> np.ndarray:
    """Bucket of window index i on a log2 scale: 0 -> 0, 1 -> 1, [2,4) -> 2, [4,8) -> 3, ..."""
    i = np.asarray(i)
    return np.where(i == 0, 0, np.floor(np.log2(np.maximum(i, 1))).astype(int) + 1)


def loss_by_position(sums: np.ndarray, counts: np.ndarray, context: int) -> list[dict]:
    """Buckets {start, end, loss, tokens} from per-window-index NLL sums and counts."""
    buckets = position_bucket(np.arange(len(sums)))
    out = []
    for b in np.unique(buckets):
        sel = buckets == b
        n = float(counts[sel].sum())
        if n:
            start = 0 if b == 0 else 2 ** (int(b) - 1)
            out.append({"start": start, "end": min(2 * start if start else 1, context),
                        "loss": float(sums[sel].sum() / n), "tokens": int(n)})
    return out


def evaluate_documents(evaluator: Evaluator, docs: Sequence[np.ndarray], *,
                       stride: int | None = None, progress: bool = False) -> dict:
    """Perplexity of `docs` (token arrays) with windows of `evaluator.context` tokens.

    Returns ppl, loss (mean NLL per scored token), tokens, documents, context, stride,
    windows and loss_by_position (log2 buckets of the index within the window).
    """
    from tqdm.auto import tqdm

    context = evaluator.context
    windows = plan_windows([len(d) for d in docs], context, stride)
    sums, counts = np.zeros(context), np.zeros(context)
    total = 0.0
    with tqdm(total=len(windows), unit="window", desc="eval", disable=not progress,
              dynamic_ncols=True) as bar:
        for host, group in window_batches(docs, windows, evaluator.seq_len,
                                          evaluator.batch_size):
            per = evaluator.nll(host).astype(np.float64)
            for r, w in enumerate(group):
                vals = per[r, w.score_from:w.length]
                sums[w.score_from:w.length] += vals
                counts[w.score_from:w.length] += 1
                total += float(vals.sum())
            bar.update(len(group))
            bar.set_postfix(loss=f"{total / max(counts.sum(), 1):.4f}")
    n = int(counts.sum())
    loss = total / max(n, 1)
    return {"ppl": math.exp(min(loss, 700.0)), "loss": loss, "tokens": n,
            "documents": len({w.doc for w in windows}), "context": context,
            "stride": stride or context, "windows": len(windows),
            "loss_by_position": loss_by_position(sums, counts, context)}

