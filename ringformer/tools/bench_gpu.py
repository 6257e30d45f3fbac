"""The GPU benchmark: MFU of the ~1B LLaMA on a real GPU, or its training step compiled for
a GPU target without one (does it compile, does it fit the card).
"""

from __future__ import annotations

import jax

from ringformer.config import KERNELS
from ringformer.errors import UserError
from ringformer.tools import bench_step, hlo_overlap
from ringformer.tools.bench_step import llama_1b_config
from ringformer.train import metrics

# Dense bf16 peaks per device kind (vendor datasheets), for MFU on accelerators.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
             "TPU v5p": 459e12}


def gpu_mfu(*, seq: int = 32768, repeats: int = 3, sp: int = 1) -> dict:
    """MFU of the ~1B LLaMA in configs/llama_1b_32k.py at `seq` tokens in bf16 on GPU."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        raise UserError(f"the gpu benchmark needs a GPU, this machine has {dev.platform}",
                        "run it on a machine with an NVIDIA GPU, or add --target h100 to compile only")
    c = llama_1b_config()
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), c.train.peak_flops)
    rows = []
    for kernel in KERNELS:  # the XLA tile sweeps, then the fused Pallas kernels
        c.attention.kernel = kernel
        try:
            t = bench_step.time_train_step(c, {"sp": sp}, seq, repeats=repeats)
        except Exception as e:  # a first run on a new card must still report the other row
            rows.append({"model": "llama_1b_32k", "kernel": kernel, "seq": seq,
                         "error": f"{type(e).__name__}: {str(e)[:500]}"})
            continue
        tps = seq / t
        rows.append({"model": "llama_1b_32k", "kernel": kernel, "seq": seq,
                     "seconds_per_step": round(t, 4), "tokens_per_sec": round(tps, 1),
                     "mfu": round(metrics.mfu(tps, metrics.flops_per_token(c.model, seq), sp, peak), 4)})
    return {"bench": "gpu", "device_kind": dev.device_kind, "seq": seq, "sp": sp,
            "params_matmul": metrics.matmul_params(c.model), "peak_flops": peak, "rows": rows}


def gpu_compile(*, target: str, seq: int = 32768, sp: int = 1) -> dict:
    """The `gpu` benchmark's training step compiled for `sp` GPUs of `target` without them: does
    it compile, and does it fit the card's memory? Nothing runs, so there is no MFU."""
    devices = hlo_overlap.gpu_devices(target, sp)
    card = hlo_overlap.gpu_memory_bytes(target)
    rows = []
    for kernel in KERNELS:
        c = llama_1b_config()
        c.attention.kernel = kernel
        total = bench_step.step_memory(c, {"sp": sp}, seq, devices=devices)
        rows.append({"model": "llama_1b_32k", "kernel": kernel, "seq": seq, "sp": sp,
                     "step_gib_per_device": round(total / 2**30, 2),
                     "card_gib": round(card / 2**30, 2), "fits": total <= card})
    return {"bench": "gpu", "target": target, "compile_only": True,
            "device_kind": devices[0].device_kind, "seq": seq, "sp": sp, "rows": rows}
