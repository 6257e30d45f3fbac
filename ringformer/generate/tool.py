"""The generation tool behind `scripts/generate.py`: load a model, encode prompts, write text.

Models load as the evaluation tool loads them (`ringformer.eval.tool.load_model`: a run's
checkpoint or a local Hugging Face LLaMA). A prompt is encoded as the data pipeline encodes a
document's start: [BOS] + ids when the tokenizer has a BOS. Everything that can be refused
without a model is refused before one is loaded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from ringformer.errors import ConfigError, DataError
from ringformer.generate.sampling import Sampling

DEFAULT_MESH = {"dp": 1, "fsdp": 1, "sp": -1, "tp": 1}


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None,
                 text_field: str = "text") -> list[str]:
    """--prompt values, or a file's: a .jsonl file holds one prompt per line (its `text`
    field), any other file is one prompt."""
    if bool(prompts) == bool(prompt_file):
        raise ConfigError("pass --prompt TEXT (repeatable) or --prompt_file FILE, not both",
                          "name what the model should continue")
    if prompts:
        return list(prompts)
    path = Path(prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read --prompt_file {prompt_file}: {e}",
                        "pass a readable UTF-8 .txt or .jsonl file") from None
    if path.suffix != ".jsonl":
        return [text]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append(record[text_field])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{prompt_file} line {n} is not a JSON object with a {text_field!r} "
                            "string", "write one {\"text\": ...} object per line") from None
        if not isinstance(out[-1], str):
            raise DataError(f"{prompt_file} line {n}: {text_field!r} is not a string",
                            "write one {\"text\": ...} object per line")
    return out


def check_options(prompts: Sequence[str], *, max_new_tokens: int, sampling: Sampling) -> None:
    """Options that need no model (Sampling checks its own fields when built)."""
    del sampling
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {max_new_tokens} must be at least 1",
                          "pass e.g. --max_new_tokens 64")
    if not prompts:
        raise ConfigError("no prompts given", "pass --prompt TEXT or a non-empty --prompt_file")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ConfigError(f"prompt {i + 1} is empty", "give every prompt some text")


def encode_prompt(tok, text: str, chat: bool = False) -> list[int]:
    """[BOS] + ids (BOS when the tokenizer has one), as the data pipeline starts a document;
    with `chat`, the text wrapped in the tokenizer's chat template when it has one."""
    inner = getattr(tok, "_tok", None)
    if chat and getattr(inner, "chat_template", None):
        text = inner.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok.encode(text)
        if tok.bos_id is not None and ids[:1] == [tok.bos_id]:
            return ids  # the template wrote the BOS itself
    else:
        if chat:
            print(f"note: tokenizer {tok.name} has no chat template; prompts are used as given",
                  file=sys.stderr)
        ids = tok.encode(text)
    return ([] if tok.bos_id is None else [tok.bos_id]) + ids


def _trim(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class _Watcher:
    """The decode loop's host callback: streams one prompt's text, or advances a progress
    bar for a batch, and stops a row at a stop string."""

    def __init__(self, tok, n_rows: int, stop: Sequence[str], stream: TextIO | None, bar):
        self.tok, self.stop, self.stream, self.bar = tok, list(stop), stream, bar
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.shown = 0

    def __call__(self, step: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        stop = np.zeros(len(tokens), bool)
        for r, t in enumerate(tokens):
            if t < 0:
                continue
            self.ids[r].append(int(t))
            if self.stop:
                stop[r] = _trim(self.tok.decode(self.ids[r]), self.stop)[1]
        if self.stream is not None:
            text = _trim(self.tok.decode(self.ids[0]), self.stop)[0]
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.stream.write(text[self.shown:])
                self.stream.flush()
                self.shown = len(text)
        if self.bar is not None:
            if int(step) == 0:
                self.bar.reset()  # the clock starts with decoding, not with compiling
            self.bar.update(1)
        return stop


def _load(*, sizes: dict, workdir, step, hf_dir, tokenizer, dtype):
    """(model config, params, tokenizer, description), loaded as the evaluation tool does."""
    from ringformer.eval.tool import load_model, model_tokenizer

    cfg, params, own_tok, source = load_model(mesh_sizes=sizes, context=1, workdir=workdir,
                                              step=step, hf_dir=hf_dir, dtype=dtype)
    return cfg, params, model_tokenizer(tokenizer or own_tok, cfg, hf_dir), source


def run(*, prompts: Sequence[str], max_new_tokens: int = 64, sampling: Sampling | None = None,
        workdir: str | None = None, step: int | None = None, hf_dir: str | None = None,
        mesh_sizes: dict | None = None, tokenizer: str | None = None, chat: bool = False,
        stop: Sequence[str] = (), json_lines: bool = False, allow_longer_context: bool = False,
        dtype: str = "auto", out: TextIO | None = None, progress: bool = True) -> list[dict]:
    """What `scripts/generate.py` does: one result dict per prompt (prompt, text, tokens,
    prefill_tokens_per_sec, decode_tokens_per_sec), written to `out` by process 0."""
    import jax

    from ringformer.generate.api import Generator
    from ringformer.mesh import make_mesh

    sampling = sampling or Sampling()
    check_options(prompts, max_new_tokens=max_new_tokens, sampling=sampling)
    mesh = make_mesh(dict(mesh_sizes or DEFAULT_MESH))
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    cfg, params, tok, _ = _load(sizes=sizes, workdir=workdir, step=step, hf_dir=hf_dir,
                                tokenizer=tokenizer, dtype=dtype)
    ids = [encode_prompt(tok, p, chat) for p in prompts]
    gen = Generator(cfg, params, mesh=mesh, allow_longer=allow_longer_context)
    gen.check(ids, max_new_tokens)
    lead = jax.process_index() == 0
    out = out or sys.stdout
    # Decided alike on every process: the host callback is part of the compiled program, and
    # processes running different programs deadlock (or crash gloo) in the first collective.
    streamed, bar_on = len(prompts) == 1 and not json_lines, progress and len(prompts) > 1
    hook_on = streamed or bar_on or bool(stop)
    result = _generate(gen, ids, tok, max_new_tokens, sampling, stop,
                       out if lead and streamed else None, bar_on and lead, hook_on)
    stream = out if lead and streamed else None
    rows = []
    for p, toks in zip(prompts, result.tokens, strict=True):
        text, _ = _trim(tok.decode(toks), stop)
        rows.append({"prompt": p, "text": text, "tokens": [int(t) for t in toks],
                     "prefill_tokens_per_sec": result.prefill_tokens / result.prefill_seconds,
                     "decode_tokens_per_sec": result.decode_tokens / max(result.decode_seconds,
                                                                         1e-9)})
    if lead:
        _write(rows, out, json_lines, streamed=stream is not None)
    return rows


def _generate(gen, ids, tok, max_new_tokens, sampling, stop, stream, bar_on: bool,
              hook_on: bool):
    from tqdm.auto import tqdm

    with tqdm(total=max_new_tokens, unit="step", desc="generate", disable=not bar_on,
              dynamic_ncols=True, file=sys.stderr) as bar:
        watch = _Watcher(tok, len(ids), stop, stream, bar if bar_on else None)
        if stream is not None:
            stream.write(tok.decode(ids[0]))
            stream.flush()
        # The host callback costs a device-to-host copy per step: only when something uses it
        # (on any process: `hook_on` is the same everywhere, `stream`/`bar_on` only on process 0).
        hook = watch if hook_on else None
        return gen.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                            eos_id=tok.eos_id, on_tokens=hook)


def _write(rows: list[dict], out: TextIO, json_lines: bool, streamed: bool) -> None:
    if json_lines:
        for r in rows:
            out.write(json.dumps(r) + "\n")
        return
    if streamed:
        r = rows[0]
        out.write(f"\n[{len(r['tokens'])} tokens; prefill {r['prefill_tokens_per_sec']:.0f} "
                  f"tokens/s, decode {r['decode_tokens_per_sec']:.1f} tokens/s]\n")
        return
    for i, r in enumerate(rows):
        out.write(f"--- prompt {i + 1}\n{r['prompt']}{r['text']}\n")
    out.write(f"[prefill {rows[0]['prefill_tokens_per_sec']:.0f} tokens/s, decode "
              f"{rows[0]['decode_tokens_per_sec']:.1f} tokens/s]\n")
