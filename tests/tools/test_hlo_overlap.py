"""Reading collective-permute overlap off scheduled HLO, and compiling for GPU targets."""
# ruff: noqa: E501  (HLO instructions are one line each, as XLA prints them)

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ringformer.errors import UserError
from ringformer.tools import hlo_overlap

ROOT = Path(__file__).resolve().parents[2]

# A hand-scheduled module in the shape XLA's GPU backend prints: a forward loop body whose send
# runs under the sweep, a backward body whose gradient send waits for the compute and has only a
# loop counter's increment in flight with it, and a synchronous permute in the entry.
SCHEDULED = """\
HloModule jit_loss, is_scheduled=true

%fwd_body (p: (s32[], bf16[8,512,64])) -> (s32[], bf16[8,512,64]) {
  %kv = bf16[8,512,64]{2,1,0} get-tuple-element(%p), index=1
  %cp-start.1 = ((bf16[8,512,64]{2,1,0}), (bf16[8,512,64]{2,1,0})) collective-permute-start(%kv), metadata={op_name="jit(loss)/jvp(jit(attention))/ppermute"}
  %sweep = (f32[8,512,64]{2,1,0}, f32[8,512]{1,0}) while(%t), condition=%c, body=%b
  %cp-done.1 = (bf16[8,512,64]{2,1,0}) collective-permute-done(%cp-start.1)
  ROOT %r = (s32[], bf16[8,512,64]) tuple(%i, %kv)
}

%bwd_body (p: (s32[], f32[8,64,512])) -> (s32[], f32[8,64,512]) {
  %dkv = f32[8,64,512]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%f, metadata={op_name="jit(loss)/transpose(jvp(jit(attention)))/add"}
  %cp-start.2 = ((f32[8,64,512]{2,1,0}, f32[8,64,512]{2,1,0}), (f32[8,64,512]{2,1,0}, f32[8,64,512]{2,1,0})) collective-permute-start(%dkv, %dkv), metadata={op_name="jit(loss)/transpose(jvp(jit(attention)))/ppermute"}
  %counter = s32[] fusion(%i), kind=kLoop, calls=%inc
  %cp-done.2 = (f32[8,64,512]{2,1,0}, f32[8,64,512]{2,1,0}) collective-permute-done(%cp-start.2)
  ROOT %r = (s32[], f32[8,64,512]) tuple(%counter, %dkv)
}

ENTRY %main (x: f32[4,16]) -> f32[4,16] {
  %x = f32[4,16]{1,0} parameter(0)
  ROOT %cp = f32[4,16]{1,0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}
}
"""


def test_permute_overlap_reads_a_scheduled_module():
    out = hlo_overlap.permute_overlap(SCHEDULED)
    assert (out["async_permute_pairs"], out["sync_permutes"], out["pairs_with_compute_between"]) == (2, 1, 1)
    fwd, bwd, sync = out["permutes"]
    assert fwd == {"computation": "fwd_body", "pass": "forward", "async": True,
                   "compute_between": ["sweep"], "bytes": 8 * 512 * 64 * 2}
    assert bwd["computation"] == "bwd_body" and bwd["pass"] == "backward"
    assert bwd["compute_between"] == [] and bwd["bytes"] == 2 * 8 * 64 * 512 * 4
    assert sync == {"computation": "main", "pass": "forward", "async": False,
                    "compute_between": [], "bytes": 4 * 16 * 4}


def test_cpu_permutes_are_synchronous():
    """XLA's CPU backend has no asynchronous collectives: every ring send is a plain copy."""
    out = hlo_overlap.ring_overlap(jax.devices()[:4], seq=256, heads=2, head_dim=16, chunk=32)
    assert out["async_permute_pairs"] == 0 and out["sync_permutes"] > 0
    assert out["forward"]["permutes"] > 0 and out["backward"]["permutes"] > 0


def test_unknown_gpu_target_is_a_user_error():
    assert "h100" in hlo_overlap.gpu_targets()
    with pytest.raises(UserError, match="unknown GPU target 'tpu9'"):
        hlo_overlap.gpu_devices("tpu9", 8)


def _cuda_plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


@pytest.mark.skipif(_cuda_plugin_installed(), reason="the CUDA plugin is installed here")
def test_gpu_target_without_the_cuda_plugin_says_what_to_install():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "hlo", "--target",
                           "h100", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: compiling for a GPU target needs JAX's CUDA plugin")
    assert "pip install 'jax-cuda12-plugin[with-cuda]==" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
