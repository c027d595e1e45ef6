"""The decode step's dense linears under torch's two BLAS back ends, cuBLAS and cuBLASLt
(`torch.backends.cuda.preferred_blas_library`), at the Llama-2-7B and Llama-3.1-8B linear shapes
and M 8-128, in bf16: each call captured in a CUDA graph and its replays timed with L2 flushed
(kernel_bench._bench), against the weight-read floor at the copy bandwidth of the same run.

    PYTHONPATH=. python3 benchmarks/blas_backend_ab.py $OUT/blas_backend_ab.json

Prints per shape and M the two times and their ratio; writes every row. Also prints what
TORCH_BLAS_PREFER_CUBLASLT in the environment made the default.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernel_bench import _bench, _copy_tbps

SHAPES = {  # (name, d_in, d_out): the step's linears (QKV fused, gate/up fused)
    "llama-2-7b": [("qkv", 4096, 12288), ("out", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096),
                   ("lm_head", 4096, 32000)],
    "llama-3.1-8b": [("qkv", 4096, 6144), ("out", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                     ("lm_head", 4096, 128256)],
}
MS = (8, 16, 32, 64, 128)
BACKENDS = ("cublas", "cublaslt")


def main(out_path: str) -> None:
    default = torch.backends.cuda.preferred_blas_library()  # an enum value, restored as it is
    print(f"default BLAS back end in this process: {default}", flush=True)
    bw = _copy_tbps()
    rows = []
    for model, linears in SHAPES.items():
        for name, d_in, d_out in linears:
            w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in**0.5
            floor_ms = w.numel() * 2 / (bw * 1e12) * 1e3
            for m in MS:
                x = torch.randn(m, d_in, device="cuda", dtype=torch.bfloat16)
                times, outs = {}, {}
                for backend in BACKENDS:
                    torch.backends.cuda.preferred_blas_library(backend)
                    outs[backend] = F.linear(x, w)
                    times[backend] = _bench(lambda: F.linear(x, w))
                err = (outs["cublas"].float() - outs["cublaslt"].float()).abs().max().item()
                rows.append({"model": model, "linear": name, "d_in": d_in, "d_out": d_out, "M": m,
                             "floor_ms": floor_ms, "ms": times, "max_abs_diff": err})
                print(f"{model:13s} {name:8s} M {m:4d} floor {floor_ms * 1e3:6.1f} us | cublas "
                      f"{times['cublas'] * 1e3:6.1f} cublaslt {times['cublaslt'] * 1e3:6.1f} "
                      f"(lt/cublas {times['cublaslt'] / times['cublas']:.3f})", flush=True)
            del w
    torch.backends.cuda.preferred_blas_library(default)
    ratios = [r["ms"]["cublaslt"] / r["ms"]["cublas"] for r in rows]
    print(f"cublaslt / cublas: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}", flush=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_TBps": bw,
                                          "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
                                          "default_backend": str(default), "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
