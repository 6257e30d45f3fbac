"""The evaluation tool's option checks: each bad option is refused with the right fix, before
anything is loaded (the tool's end-to-end refusals are in tests/eval/test_perplexity.py)."""

import pytest

from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import ConfigError
from ringformer.eval import options as eval_options
from ringformer.eval import passkey as passkey_eval

BYTE = load_tokenizer("byte")


def _refusal(**options) -> str:
    """The one-line message `check_options` refuses `options` with (defaults: a good run)."""
    kw = {"context": 512, "out": "r.json", "passkey": True, "passkey_lengths": [300],
          "passkey_depths": [0.0, 1.0], "passkey_trials": 1, "passkey_candidates": 8, **options}
    with pytest.raises(ConfigError) as e:
        eval_options.check_options(**kw)
    return str(e.value)


def test_options_are_checked_with_the_right_fix(tmp_path):
    eval_options.check_options(context=512, out=str(tmp_path / "new" / "r.json"), passkey=True,
                               passkey_lengths=[300, 512], passkey_depths=[0.0, 1.0],
                               passkey_trials=1, passkey_candidates=2)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("kept")
    assert _refusal(out=str(tmp_path / "dir")).startswith(f"--out {tmp_path / 'dir'} is a directory")
    assert "is a file, not a directory" in _refusal(out=str(tmp_path / "file" / "r.json"))
    assert "also where its plot goes" in _refusal(out=str(tmp_path / "r.png"))
    assert _refusal(context=0) == "--context 0 must be positive (pass e.g. --context 4096)"
    assert _refusal(stride=600).startswith("--stride 600 must be in [1, context=512]")
    assert _refusal(batch_size=0).startswith("--batch 0 must be positive")
    msg = _refusal(passkey_depths=[2.0])
    assert msg.startswith("--passkey_depths 2.0 is outside [0, 1]") and "lengths" not in msg
    for trials in (0, -1):
        assert _refusal(passkey_trials=trials).startswith(f"--passkey_trials {trials} must be")
    assert _refusal(context=128, passkey_lengths=[0]).startswith(
        "--passkey_lengths 0 must be positive")
    assert _refusal(passkey_lengths=[300, 600]).startswith(
        "--passkey_lengths 600 is longer than the context 512")
    for n in (0, 1, 90_001):  # one candidate would score rank accuracy 1.0 for any model
        assert _refusal(passkey_candidates=n).startswith(f"--passkey_candidates {n} must be in [2,")
    # Without --passkey its options are not looked at.
    eval_options.check_options(context=512, out="r.json", passkey=False, passkey_trials=0)
    assert (tmp_path / "file").read_text() == "kept" and not (tmp_path / "new").exists()


def test_passkey_lengths_must_hold_a_prompt():
    need = passkey_eval.min_length(BYTE)
    passkey_eval.make_tasks(BYTE, [need], [0.0, 1.0], n_candidates=8)  # exact for bytes
    with pytest.raises(ValueError):
        passkey_eval.make_tasks(BYTE, [need - 1], [0.0], n_candidates=8)
    eval_options.check_passkey_lengths(BYTE, [need, 512], 512)
    with pytest.raises(ConfigError, match=f"--passkey_lengths 100 is too short .* at least {need} "
                       rf"tokens .* \(use lengths from {need} to the context 512\)"):
        eval_options.check_passkey_lengths(BYTE, [100], 512)
    with pytest.raises(ConfigError, match=rf"\(use --context {need} or more for passkey"):
        eval_options.check_passkey_lengths(BYTE, [100], 128)
    with pytest.raises(ConfigError, match="--context 64 is too short for a passkey prompt"):
        eval_options.check_passkey_lengths(BYTE, passkey_eval.default_lengths(64, BYTE), 64)
