"""A tokenizing worker that dies mid-build ends the build with a DataError, not a hang."""

import json
import os

import pytest

from ringformer.data import cache, cache_build, sources
from ringformer.data.tokenizer import ByteTokenizer, load_tokenizer
from ringformer.errors import DataError


class _DyingTokenizer(ByteTokenizer):
    """Exits abruptly in any process but the one that made it: a worker killed mid-unit."""

    def __init__(self):
        super().__init__()
        self.parent = os.getpid()

    def encode_arrays(self, texts):
        if os.getpid() != self.parent:
            os._exit(9)
        return super().encode_arrays(texts)


def test_dead_worker_fails_the_build_and_leaves_no_entry(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                            for i in range(200)))
    monkeypatch.setattr(cache_build, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 2048)  # several units in flight
    root = tmp_path / "cc"
    with pytest.raises(DataError, match="worker process died") as e:
        cache.open_source(str(path), _DyingTokenizer(), cache_dir=str(root), workers=2)
    assert "run again" in e.value.fix
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    # The next run builds the entry from scratch.
    entry = cache.open_source(str(path), load_tokenizer("byte"), cache_dir=str(root))
    assert entry.manifest["n_docs"] == 200 and cache.verify_entry(entry.path) is None
