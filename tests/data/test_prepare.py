"""ringformer/data/prepare.py: scripts/prepare_data.py's options are judged before anything is
written (the build itself is exercised end to end in test_corpus.py and test_longctx.py)."""

import argparse

import pytest

from ringformer.data import prepare
from ringformer.errors import ConfigError, DataError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prepare.add_options(parser)
    return parser.parse_args(list(argv))


def test_defaults_pass_and_add_the_parsed_lists():
    args = _args()
    prepare.check_options(args)
    assert args.lengths == [1024, 4096, 16384]
    assert args.depths == [0, 0.25, 0.5, 0.75, 1]
    assert args.heldout == ([1024, 2048, 4096, 8192, 16384], [0, 0.25, 0.5, 0.75, 1])
    assert not args.retrieval_examples  # no recipe data unless asked for


def test_dashed_spellings_still_work():
    args = _args("--passkey-lengths", "512,2048", "--eval-fraction", "0.1")
    prepare.check_options(args)
    assert args.lengths == [512, 2048] and args.eval_fraction == 0.1


@pytest.mark.parametrize("argv, error, what", [
    (["--passkey_lengths", "3"], ConfigError, "shorter than the bare prompt"),
    (["--passkey_lengths", "99999999"], ConfigError, "longer than"),
    (["--passkey_lengths", ","], ConfigError, "need at least one value"),
    (["--passkey_lengths", "1k"], DataError, "bad list"),
    (["--passkey_depths", "0,1.5"], DataError, "depths must lie in [0, 1]"),
    (["--eval_fraction", "1"], DataError, "--eval_fraction in (0, 1)"),
    (["--retrieval_examples", "4", "--retrieval_max_tokens", "20000"], ConfigError,
     "--retrieval_max_tokens < --retrieval_long_max_tokens"),
    (["--retrieval_examples", "4", "--heldout_lengths", "10"], ConfigError,
     "--heldout_lengths need values"),
    (["--retrieval_examples", "4", "--heldout_depths", "-0.5"], ConfigError,
     "--heldout_depths values in [0, 1]"),
    (["--retrieval_examples", "4", "--retrieval_vocab", "0", "--retrieval_rung_examples", "9"],
     ConfigError, "--retrieval_vocab 0 trains none"),
])
def test_bad_options_are_refused_with_a_fix(argv, error, what):
    with pytest.raises(error) as e:
        prepare.check_options(_args(*argv))
    assert what in str(e.value) and e.value.fix


def test_numbers_below_the_floor_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _args("--retrieval_min_tokens", "100")
    assert "must be at least 256, not 100" in capsys.readouterr().err



def test_a_bpe_without_one_token_words_is_refused_with_a_fix(tmp_path):
    """--retrieval_vocab 260 trains four merges: no whole word is one token, so no gap copy
    can be made; the error says to train a larger BPE (not the generic data fix)."""
    args = _args("--out", str(tmp_path), "--limit", "20", "--retrieval_examples", "2",
                 "--retrieval_vocab", "260", "--retrieval_gap_copy_examples", "3")
    prepare.check_options(args)
    with pytest.raises(ConfigError, match="no one-token words") as e:
        prepare.build(args)
    assert "--retrieval_vocab 2048" in e.value.fix
