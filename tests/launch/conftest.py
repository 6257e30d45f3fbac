"""Runs shared by the multi-process tests of this directory: each costs tens of seconds."""

import pytest
from _corpus import write_corpus
from _multiproc import SP4_TP2, SP8, Group, run_to_end


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "train.jsonl", 60, 0), write_corpus(d / "eval.jsonl", 8, 1)


@pytest.fixture(scope="session")
def runs(corpus, tmp_path_factory):
    """The smoke run on 2 processes x 4 devices (sp=4, tp=2) and, as the reference, on one
    process x 8 (sp=8): same model, and the same batches (they depend on dp*fsdp, 1 here)."""
    out = {}
    for n, mesh in ((2, SP4_TP2), (1, SP8)):
        base = tmp_path_factory.mktemp(f"procs{n}")
        g = Group(base / "logs")
        try:
            run_to_end(g, n, base / "run", corpus, *mesh)
        finally:
            g.kill_all()
        out[n] = base / "run"
    return out


@pytest.fixture
def group(tmp_path):
    g = Group(tmp_path / "logs")
    yield g
    g.kill_all()
