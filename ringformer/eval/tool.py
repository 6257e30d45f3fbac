"""The evaluation tool behind `scripts/eval.py`: load a model, score documents, write results.

The scoring itself (windows, the evaluator, loss by position) is in perplexity.py and knows
nothing of command-line flags; this module owns the flag-facing side: the options and their
messages, the default mesh, loading a run or an HF directory, and OUT.json with its plots.
Everything that can be refused without a model is refused before one is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax

from ringformer import model
from ringformer.config import check_batch, check_tp
from ringformer.data.pipeline import document_tokens
from ringformer.data.sources import resolve_files
from ringformer.data.tokenizer import Tokenizer, load_tokenizer
from ringformer.errors import ConfigError, DataError, UserError
from ringformer.eval import options, passkey_gen, plots
from ringformer.eval import passkey as passkey_eval
from ringformer.eval.perplexity import Evaluator, evaluate_documents
from ringformer.mesh import make_mesh
from ringformer.train.state import restore_run
from ringformer.train.workdir import require_checkpoints

# A ring block shorter than this wastes the devices on communication: the default mesh puts
# fewer devices on sp rather than give each one fewer tokens.
MIN_TOKENS_PER_DEVICE = 8


def default_mesh(n_devices: int, context: int) -> dict[str, int]:
    """All devices on sp when each keeps MIN_TOKENS_PER_DEVICE tokens; the rest on fsdp."""
    sp = max(d for d in range(1, n_devices + 1)
             if n_devices % d == 0 and (d == 1 or context // d >= MIN_TOKENS_PER_DEVICE))
    return {"dp": 1, "fsdp": n_devices // sp, "sp": sp, "tp": 1}


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
        cfg, params = hf.load_llama(hf_dir, **{"dtype": "float32", **over},
                                    attention=model.AttentionConfig(layout="zigzag"))
        return cfg, params, _hf_tokenizer_spec(hf_dir), f"hf {hf_dir}"
    require_checkpoints(workdir, "point --workdir at a run that saved a checkpoint, or use --hf")
    config, state = restore_run(workdir, mesh_sizes, step=step)
    cfg = dataclasses.replace(model.ModelConfig.from_config(config), **over)
    check_context(cfg, context, allow_longer_context)
    return cfg, state.params, config.data.tokenizer, f"run {workdir} step {int(state.step)}"


@dataclasses.dataclass(frozen=True)
class PasskeyOptions:
    """The passkey part of a run; `lengths` None means `passkey.default_lengths`."""

    lengths: Sequence[int] | None = None
    depths: Sequence[float] | None = None
    trials: int = 1
    candidates: int = 8
    generate: bool = False  # real greedy generation, exact match, instead of scored candidates
    file: str | None = None  # prompts from this JSON-lines file (implies generate)


def run(*, data: Sequence[str] | str, context: int, out: str, workdir: str | None = None,
        step: int | None = None, hf_dir: str | None = None, stride: int | None = None,
        mesh_sizes: dict | None = None, tokenizer: str | None = None,
        batch_size: int | None = None, passkey: bool = False,
        passkey_lengths: Sequence[int] | None = None, passkey_depths: Sequence[float] | None = None,
        passkey_trials: int = 1, passkey_candidates: int = 8, allow_longer_context: bool = False,
        dtype: str = "auto", text_field: str = "text", progress: bool = True,
        passkey_generate: bool = False, passkey_file: str | None = None) -> dict:
    """What `scripts/eval.py` does: load, score, write OUT.json and its PNGs (process 0)."""
    pk = PasskeyOptions(passkey_lengths, passkey_depths, passkey_trials, passkey_candidates,
                        passkey_generate or bool(passkey_file), passkey_file) \
        if passkey or passkey_file else None
    _check_before_loading(data, context=context, out=out, stride=stride, batch_size=batch_size,
                          pk=pk)
    mesh, sizes = eval_mesh(mesh_sizes, context, batch_size)
    cfg, params, own_tok, source = load_model(
        mesh_sizes=sizes, context=context, workdir=workdir, step=step, hf_dir=hf_dir,
        dtype=dtype, allow_longer_context=allow_longer_context)
    check_tp(cfg.n_kv_heads, sizes["tp"], n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim)
    tok = model_tokenizer(tokenizer or own_tok, cfg, hf_dir)
    plan = _passkey_tasks(tok, context, pk) if pk else None
    docs = _read_documents(data, tok, text_field)
    out_path = _make_out_dir(out)
    lead = jax.process_index() == 0
    evaluator = Evaluator(cfg, params, context=context, mesh=mesh, batch_size=batch_size)
    result = evaluate_documents(evaluator, docs, stride=stride, progress=progress and lead)
    result.update(model=source, tokenizer=tok.name, mesh=sizes, seq_len=evaluator.seq_len,
                  data=[str(d) for d in ([data] if isinstance(data, str) else data)])
    if plan:
        result["passkey"] = _score_passkey(cfg, params, mesh, tok, pk, plan, progress and lead)
    if lead:
        _write_results(result, out_path)
    return result


def _check_before_loading(data: Sequence[str] | str, *, context: int, out: str,
                          stride: int | None, batch_size: int | None,
                          pk: PasskeyOptions | None) -> None:
    """Options and data paths: a typo costs seconds, not a model load."""
    pk_flags = {} if pk is None else dict(
        passkey=True, passkey_lengths=pk.lengths, passkey_depths=pk.depths,
        passkey_trials=pk.trials, passkey_candidates=pk.candidates)
    options.check_options(context=context, out=out, stride=stride, batch_size=batch_size,
                          **pk_flags)
    if pk is not None and pk.file:
        passkey_gen.read_prompts(pk.file)
    try:
        resolve_files(data)  # paths only; reading comes once the model is known to be good
    except DataError as e:
        raise options.eval_data_error(e) from e


def eval_mesh(mesh_sizes: dict | None, context: int,
               batch_size: int | None) -> tuple[jax.sharding.Mesh, dict[str, int]]:
    """(mesh, its axis sizes): the given sizes (-1 filled), or all devices on sp."""
    sizes = dict(mesh_sizes) if mesh_sizes else default_mesh(jax.device_count(), context)
    mesh = make_mesh(sizes)
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    if batch_size is not None:
        check_batch(batch_size, sizes["dp"] * sizes["fsdp"], label="--batch")
    return mesh, sizes


def model_tokenizer(spec: str | None, cfg: model.ModelConfig, hf_dir: str | None) -> Tokenizer:
    """The tokenizer `spec` names, checked against the model's vocabulary."""
    if spec is None:
        raise ConfigError(f"{hf_dir} holds no tokenizer", "pass --tokenizer byte or a local path")
    tok = load_tokenizer(spec)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {spec!r} has {tok.vocab_size} ids but the model only "
                          f"{cfg.vocab_size}", "pass the tokenizer the model was trained with")
    return tok


def _score_passkey(cfg: model.ModelConfig, params: dict, mesh: jax.sharding.Mesh,
                   tok: Tokenizer, pk: PasskeyOptions, plan: tuple, progress: bool) -> dict:
    from ringformer.generate.api import Generator

    lengths, depths, tasks = plan
    gen = Generator(cfg, params, mesh=mesh, allow_longer=True)
    if pk.generate:
        rows = mesh.shape["dp"] * mesh.shape["fsdp"]

        def generate(prompts: list[list[int]], new: int) -> list:
            # Padded with copies of the last prompt to a multiple of the batch devices.
            padded = prompts + [prompts[-1]] * (-len(prompts) % rows)
            out = gen.generate(padded, max_new_tokens=new, eos_id=tok.eos_id).tokens
            return out[:len(prompts)]

        return passkey_gen.run_generate(generate, tok, tasks, progress=progress)
    from ringformer.generate.score import continuation_scores

    # One prefill per prompt, its candidates' answers then teacher-forced from the cache.
    return passkey_eval.run_passkey(
        lambda rows: continuation_scores(gen, rows), tok, lengths, depths, trials=pk.trials,
        n_candidates=pk.candidates, tasks=tasks)


def _passkey_tasks(tok: Tokenizer, context: int,
                   pk: PasskeyOptions) -> tuple[list[int], list[float], list]:
    """(lengths, depths, tasks), built before the perplexity pass: a length that cannot hold a
    prompt is refused now rather than after a long evaluation. With generation the tasks are
    prompt records (passkey_gen)."""
    if pk.file:
        prompts = passkey_gen.read_prompts(pk.file)
        longest = max(int(p["length"]) for p in prompts)
        if longest > context:
            raise ConfigError(f"--passkey_file {pk.file} has prompts of {longest} tokens, past "
                              f"--context {context}", f"use --context {longest} or more")
        return sorted({p["length"] for p in prompts}), sorted({p["depth"] for p in prompts}), prompts
    lengths = list(pk.lengths or passkey_eval.default_lengths(context, tok))
    options.check_passkey_lengths(tok, lengths, context)
    depths = list(pk.depths or passkey_eval.DEPTHS)
    if pk.generate:
        return lengths, depths, passkey_gen.make_prompts(tok, lengths, depths, trials=pk.trials)
    try:
        tasks = passkey_eval.make_tasks(tok, lengths, depths, trials=pk.trials,
                                        n_candidates=pk.candidates)
    except ValueError as e:  # a subword tokenizer's key took more room than min_length's
        raise ConfigError(f"cannot build passkey prompts: {e}",
                          "use longer --passkey_lengths") from None
    return lengths, depths, tasks


def _read_documents(data: Sequence[str] | str, tok: Tokenizer, text_field: str) -> list:
    try:
        return document_tokens(data, tok, text_field=text_field)
    except DataError as e:
        raise options.eval_data_error(e) from e


def _make_out_dir(out: str) -> Path:
    """Made before the long part, but only once the model and the data are known to be good."""
    out_path = Path(out)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of --out {out}: {e}",
                        "choose another path") from None
    return out_path


def _write_results(result: dict, out_path: Path) -> None:
    """OUT.png, OUT_passkey.png with --passkey, then OUT.json naming them."""
    result["plot"] = str(plots.plot_loss_by_position(result, out_path.with_suffix(".png")))
    if "passkey" in result:
        png = out_path.with_name(out_path.stem + "_passkey.png")
        result["passkey"]["plot"] = str(plots.plot_passkey(result["passkey"], png))
    out_path.write_text(json.dumps(result, indent=2) + "\n")
