"""`bench.py data`: the tokenized cache and the data pipeline on synthetic corpora.

For each size a JSON-lines corpus of random words is written to a temporary directory (and
deleted afterwards), then:
- build: `cache.open_source` with the byte tokenizer over every core; MB of text per second;
- pipeline: a fresh process maps the cache and draws packed, shuffled batches of
  4096-token rows; packed tokens per second delivered (host
  arrays, what the trainer hands to `make_array_from_process_local_data`) and the process's
  peak RSS (VmHWM: jax imported, index and batches included).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FILE_BYTES = 256 << 20  # corpus files of this size, like shards of a real corpus


def write_corpus(out: Path, gb: float, seed: int = 0) -> list[Path]:
    """JSON lines of random lowercase words (no escaping needed), documents of 200 B-40 KB."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz     ", np.uint8)
    blob = letters[rng.integers(0, len(letters), 8 << 20)].tobytes()
    total, files = int(gb * 1e9), []
    while total > 0:
        path = out / f"part-{len(files):04d}.jsonl"
        size = min(total, FILE_BYTES)
        with open(path, "wb") as f:
            written = 0
            while written < size:
                n = int(min(rng.lognormal(8, 1.2), 40_000)) + 200
                at = int(rng.integers(0, len(blob) - n))
                line = b'{"text": "' + blob[at:at + n] + b'"}\n'
                f.write(line)
                written += len(line)
        files.append(path)
        total -= size
    return files


def pipeline_child(files: str, cache_dir: str, batches: int) -> None:
    """Runs in a fresh process: print {"tokens_per_sec", "peak_rss_gib"} as JSON."""
    import ml_collections

    from ringformer.data import pipeline
    from ringformer.data.tokenizer import load_tokenizer

    cfg = ml_collections.ConfigDict({"train_files": files, "cache_dir": cache_dir,
                                     "seq_len": 4096, "global_batch_size": 8})
    it = pipeline.TrainIterator(cfg, load_tokenizer("byte"), None, seed=0)
    it.next_host_batch()  # the first epoch's order: a one-off per epoch, not per batch
    t0, tokens = time.perf_counter(), 0
    for _ in range(batches):
        b = it.next_host_batch()
        tokens += b["tokens"].size
    dt = time.perf_counter() - t0
    print(json.dumps({"tokens_per_sec": tokens / dt, "peak_rss_gib": peak_rss_gib()}))


def peak_rss_gib(pid: str = "self") -> float:
    """VmHWM, the peak resident set of this process image. Not `ru_maxrss`: Linux carries
    that across exec from the parent's memory at the spawn (vfork), so a child started after
    a 4 GB build reported the builder's peak, not its own."""
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # KiB -> GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # not Linux


def _measure_size(gb: float, root: Path, batches: int) -> dict:
    from ringformer.data import cache
    from ringformer.data.tokenizer import load_tokenizer

    corpus = root / f"corpus-{gb:g}"
    corpus.mkdir()
    files = write_corpus(corpus, gb)
    n_bytes = sum(f.stat().st_size for f in files)
    spec = ",".join(str(f) for f in files)
    t0 = time.perf_counter()
    cache.open_source(spec, load_tokenizer("byte"), cache_dir=str(root / "cache"))
    build = time.perf_counter() - t0
    code = ("from ringformer.tools.bench_data import pipeline_child; "
            f"pipeline_child({spec!r}, {str(root / 'cache')!r}, {batches})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(corpus)
    shutil.rmtree(root / "cache")
    return {"corpus_gb": round(n_bytes / 1e9, 3), "build_mb_per_sec": round(n_bytes / 1e6 / build, 1),
            "pipeline_tokens_per_sec": round(child["tokens_per_sec"]),
            "peak_rss_gib": round(child["peak_rss_gib"], 3)}


def check_disk(gb: float, where: str) -> None:
    """The largest corpus and its token cache (uint16: two bytes a byte) must fit the free disk
    at `where`; otherwise the benchmark fills the disk minutes in and fails there."""
    from ringformer.errors import ConfigError

    need, free = 3 * gb * 1e9, shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(f"--sizes {gb:g} needs at least {need / 1e9:.1f} GB of free disk in {where}"
                          f" for the corpus and its cache, but it has {free / 1e9:.1f} GB",
                          "use smaller --sizes, or set TMPDIR to a larger disk")


def data_bench(sizes: tuple[float, ...] = (1.0, 4.0), batches: int = 150,
               tmp_dir: str | None = None) -> dict:
    """One row per corpus size (see the module doc), with the core count the build used."""
    from ringformer.data.cache_build import default_workers
    from ringformer.tools.benchmark import check_positive

    check_positive(sizes=min(sizes), batches=batches)
    check_disk(max(sizes), tmp_dir or tempfile.gettempdir())
    rows = []
    with tempfile.TemporaryDirectory(prefix="ringformer-bench-data-", dir=tmp_dir) as tmp:
        for gb in sizes:
            rows.append(_measure_size(gb, Path(tmp), batches))
    return {"bench": "data", "cores": default_workers(), "batch": [8, 4096], "rows": rows}
