"""``python -m capkit.demo``: the fused masked linear op on a BERT feed-forward layer.

Checks the fast path against the PyTorch reference, then times it against dense ``F.linear``
and against ``F.linear(x, W * M)`` (what pruning code usually runs) at several block sparsities.
Runs on the GPU in bf16 when one is present, else on the CPU in fp32.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from capkit.ops import BlockMask, backend_status, choose_backend, masked_linear


def _time(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m capkit.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="rows of x (batch x sequence), default 2048")
    p.add_argument("--in-features", type=int, default=3072)
    p.add_argument("--out-features", type=int, default=768)
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.95])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.tokens <= 0:
        p.error(f"--tokens must be positive, got {args.tokens}")
    for s in args.sparsities:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsities must lie in [0, 1), got {s}")

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, k, m, b = args.out_features, args.in_features, args.tokens, args.block_size
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=device, dtype=dtype)
    usable = [name for name, why in backend_status(device).items() if why is None]
    print(f"capkit demo: y = x @ (W * M)^T + b, x [{m}, {k}], W [{n}, {k}], {dtype}, {device}")
    print(f"backends usable here: {', '.join(usable)}  (python -m capkit.info says why others are not)")
    print(f"{'sparsity':>8} {'backend':>8} {'max err':>9} {'dense ms':>9} {'W*M ms':>8} {'capkit ms':>9} "
          f"{'vs dense':>8} {'vs W*M':>7}")
    for sp in args.sparsities:
        grid = torch.rand(-(-n // b), -(-k // b), device=device) >= sp
        mask = BlockMask.from_block_grid(grid, b, (n, k))
        dense_mask = mask.to_dense()
        backend = choose_backend(device, dtype, "block", mask.layout.block_density, training=False)
        if backend == "torch" and "cpu" in usable and dtype == torch.float32:
            backend = "cpu"  # show the native kernel even where the measured table prefers the reference
        with torch.no_grad():
            y = masked_linear(x, w, mask, bias, backend=backend)
            ref = masked_linear(x.double(), w.double(), mask, bias.double(), backend="torch")
            err = (y.double() - ref).abs().max().item()
            t_dense = _time(lambda: F.linear(x, w, bias), device, args.reps)
            t_wm = _time(lambda: F.linear(x, w * dense_mask, bias), device, args.reps)
            t_ck = _time(lambda: masked_linear(x, w, mask, bias, backend=backend), device, args.reps)
        print(f"{sp:8.2f} {backend:>8} {err:9.2e} {t_dense * 1e3:9.2f} {t_wm * 1e3:8.2f} {t_ck * 1e3:9.2f} "
              f"{t_dense / t_ck:7.2f}x {t_wm / t_ck:6.2f}x")
    print("(best of", args.reps, "runs each; the benchmark suite in benchmarks/ records medians with versions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
