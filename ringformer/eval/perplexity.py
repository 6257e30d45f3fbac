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
NLL (full logits never exist), and unpermuted back. Passkey retrieval is in passkey_eval.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ringformer import loss as losses
from ringformer import model, sharding
from ringformer.errors import ConfigError, DataError, UserError
from ringformer.eval import options as eval_options
from ringformer.ops import layouts
from ringformer.train.state import restore_run
from ringformer.train.workdir import require_checkpoints

# A ring block shorter than this wastes the devices on communication: the default mesh puts
# fewer devices on sp rather than give each one fewer tokens.
MIN_TOKENS_PER_DEVICE = 8


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
    lay = cfg.attn_layout if n_sp > 1 else "contiguous"
    pieces = n_sp * (2 if lay == "zigzag" else 1)
    piece = -(-context // pieces)
    cq, ck = min(cfg.q_chunk, piece), min(cfg.kv_chunk, piece)
    unit = math.lcm(cq, ck)
    piece = -(-piece // unit) * unit
    run = dataclasses.replace(cfg, attn_impl="ring", attn_layout=lay, q_chunk=cq, kv_chunk=ck,
                              remat="none")
    return run, piece * pieces


def default_mesh(n_devices: int, context: int) -> dict[str, int]:
    """All devices on sp when each keeps MIN_TOKENS_PER_DEVICE tokens; the rest on fsdp."""
    sp = max(d for d in range(1, n_devices + 1)
             if n_devices % d == 0 and (d == 1 or context // d >= MIN_TOKENS_PER_DEVICE))
    return {"dp": 1, "fsdp": n_devices // sp, "sp": sp, "tp": 1}


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
        if self.batch_size % shards:
            raise ValueError(f"batch size {self.batch_size} is not divisible by dp*fsdp={shards}")
        self.params = self._place_params(params)
        self.perm = layouts.permutation(self.cfg.attn_layout, self.seq_len, self.n_sp)
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
            perm = layouts.permutation(cfg.attn_layout, seq_len, self.n_sp)
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


def plot_loss_by_position(result: dict, path: str | Path, title: str = "") -> Path:
    """Mean NLL against tokens of context (log2 x axis), one point per bucket, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    buckets = result["loss_by_position"]
    # A prediction at window index i has seen i + 1 tokens: bucket [start, end) spans
    # [start + 1, end] tokens of context; plot at its geometric middle.
    x = [math.sqrt((b["start"] + 1) * b["end"]) for b in buckets]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(x, [b["loss"] for b in buckets], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context seen (position in window + 1)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title(title or f"context {result['context']}: loss {result['loss']:.4f}, "
                          f"ppl {result['ppl']:.3f}, {result['tokens']:,} tokens")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- the tool


def check_context(cfg: model.ModelConfig, context: int, allow_longer: bool = False) -> None:
    """A context past the positions a model was built for is an error unless asked for:
    without rope scaling the model has never seen such distances."""
    if cfg.max_position > 0 and context > cfg.max_position and cfg.rope_scaling == "none" \
            and not allow_longer:
        raise ConfigError(f"--context {context} is longer than the {cfg.max_position} positions "
                          "the model supports (max_position, no rope scaling)",
                          f"use --context {cfg.max_position} or less, or pass "
                          "--allow_longer_context to measure extrapolation anyway")


def _hf_tokenizer_spec(hf_dir: str) -> str | None:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return hf_dir if any((Path(hf_dir) / n).is_file() for n in names) else None


def load_model(*, mesh_sizes: dict, context: int, workdir: str | None = None,
               step: int | None = None, hf_dir: str | None = None, dtype: str = "auto",
               allow_longer_context: bool = False) -> tuple[model.ModelConfig, dict, str | None, str]:
    """(model config, params, the model's own tokenizer spec or None, description).

    HF models are evaluated in float32 unless `dtype` says otherwise, with the zigzag layout
    (balanced causal work on the ring); runs keep their own dtype and layout.
    """
    over = {} if dtype == "auto" else {"dtype": dtype}
    if hf_dir:
        from ringformer.hf import mapping as hf

        # Checked on config.json alone, before any weight is loaded.
        check_context(hf.read_config(hf_dir), context, allow_longer_context)
        cfg, params = hf.load_llama(hf_dir, **{"dtype": "float32", "attn_layout": "zigzag", **over})
        return cfg, params, _hf_tokenizer_spec(hf_dir), f"hf {hf_dir}"
    require_checkpoints(workdir, "point --workdir at a run that saved a checkpoint, or use --hf")

    config, state = restore_run(workdir, mesh_sizes, step=step)
    cfg = dataclasses.replace(model.ModelConfig.from_config(config), **over)
    check_context(cfg, context, allow_longer_context)
    return cfg, state.params, config.data.tokenizer, f"run {workdir} step {int(state.step)}"


def run(*, data: Sequence[str] | str, context: int, out: str, workdir: str | None = None,
        step: int | None = None, hf_dir: str | None = None, stride: int | None = None,
        mesh_sizes: dict | None = None, tokenizer: str | None = None,
        batch_size: int | None = None, passkey: bool = False,
        passkey_lengths: Sequence[int] | None = None, passkey_depths: Sequence[float] | None = None,
        passkey_trials: int = 1, passkey_candidates: int = 8, allow_longer_context: bool = False,
        dtype: str = "auto", text_field: str = "text", progress: bool = True) -> dict:
    """What `scripts/eval.py` does: load, score, write OUT.json and its PNGs (process 0)."""
    import json

    from ringformer.data.pipeline import document_tokens
    from ringformer.data.sources import resolve_files
    from ringformer.data.tokenizer import load_tokenizer
    from ringformer.eval import passkey as passkey_eval
    from ringformer.mesh import make_mesh

    eval_options.check_options(context=context, out=out, stride=stride, batch_size=batch_size,
                  passkey=passkey, passkey_lengths=passkey_lengths,
                  passkey_depths=passkey_depths, passkey_trials=passkey_trials,
                  passkey_candidates=passkey_candidates)
    try:
        resolve_files(data)  # paths only, before the model is loaded; reading comes later
    except DataError as e:
        raise eval_options.eval_data_error(e) from e
    sizes = dict(mesh_sizes) if mesh_sizes else default_mesh(jax.device_count(), context)
    mesh = make_mesh(sizes)
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    shards = sizes["dp"] * sizes["fsdp"]
    if batch_size is not None and batch_size % shards:
        raise ConfigError(f"--batch {batch_size} is not a positive multiple of dp*fsdp={shards}",
                          f"use a multiple of {shards}")
    cfg, params, own_tok, source = load_model(
        mesh_sizes=sizes, context=context, workdir=workdir, step=step, hf_dir=hf_dir,
        dtype=dtype, allow_longer_context=allow_longer_context)
    if cfg.n_kv_heads % sizes["tp"] or cfg.ffn_dim % sizes["tp"]:
        raise ConfigError(f"mesh tp={sizes['tp']} does not divide n_kv_heads={cfg.n_kv_heads} "
                          f"and ffn_dim={cfg.ffn_dim}", "use a smaller tp in --mesh")
    spec = tokenizer or own_tok
    if spec is None:
        raise ConfigError(f"{hf_dir} holds no tokenizer", "pass --tokenizer byte or a local path")
    tok = load_tokenizer(spec)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {spec!r} has {tok.vocab_size} ids but the model only "
                          f"{cfg.vocab_size}", "pass the tokenizer the model was trained with")
    tasks = None
    if passkey:
        lengths = list(passkey_lengths or passkey_eval.default_lengths(context, tok))
        passkey_eval.check_lengths(tok, lengths, context)
        depths = list(passkey_depths or passkey_eval.DEPTHS)
        try:
            tasks = passkey_eval.make_tasks(tok, lengths, depths, trials=passkey_trials,
                                            n_candidates=passkey_candidates)
        except ValueError as e:  # a subword tokenizer's key took more room than min_length's
            raise ConfigError(f"cannot build passkey prompts: {e}",
                              "use longer --passkey_lengths") from None
    try:
        docs = document_tokens(data, tok, text_field=text_field)
    except DataError as e:
        raise eval_options.eval_data_error(e) from e
    out_path = Path(out)
    try:  # before the long part, but only once the model and the data are known to be good
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of --out {out}: {e}",
                        "choose another path") from None
    lead = jax.process_index() == 0
    evaluator = Evaluator(cfg, params, context=context, mesh=mesh, batch_size=batch_size)
    result = evaluate_documents(evaluator, docs, stride=stride, progress=progress and lead)
    result.update(model=source, tokenizer=tok.name, mesh=sizes, seq_len=evaluator.seq_len,
                  data=[str(d) for d in ([data] if isinstance(data, str) else data)])
    if passkey:
        result["passkey"] = passkey_eval.run_passkey(
            evaluator.answer_scores, tok, lengths, depths, trials=passkey_trials,
            n_candidates=passkey_candidates, tasks=tasks)
    if lead:
        result["plot"] = str(plot_loss_by_position(result, out_path.with_suffix(".png")))
        if passkey:
            png = out_path.with_name(out_path.stem + "_passkey.png")
            result["passkey"]["plot"] = str(passkey_eval.plot_passkey(result["passkey"], png))
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
