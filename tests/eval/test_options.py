"""The evaluation tool's option checks: each bad option is refused with the right fix, before
anything is loaded (the tool's end-to-end refusals are in tests/test_evaluate.py)."""

import pytest

from ringformer.errors import ConfigError
from ringformer.eval import options as eval_options


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
