"""Top-k eigenvalues of an NTK block: matrix-free Lanczos against forming the block exactly.

Problem: the residual block K_rr (u_xx − f) of a tanh MLP (default 3×256) on N points. Times, in
one process: Lanczos for the top k (default 10) on NTK-vector products, and forming K_rr (N VJPs)
followed by `eigvalsh`. Lanczos's eigenvalues are compared with the exact ones.

    python benchmarks/spectrum_cost.py                  # N = 4096 on the CPU: forming K takes minutes
    python benchmarks/spectrum_cost.py --n 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from _problem import FastPoisson, make_batch, sync

from lightning_ntk import ntk_eigenvalues


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FastPoisson(args.width, args.depth).to(device)
    batch = make_batch(args.n, device)

    timings, spectra = {}, {}
    for method in ("lanczos", "exact"):
        g = torch.Generator(device=device).manual_seed(0)
        sync(device)
        start = time.perf_counter()
        spectra[method] = ntk_eigenvalues(
            model, batch, k=args.k, term="pde", method=method, generator=g, max_bytes=1 << 34
        )
        sync(device)
        timings[method] = time.perf_counter() - start
    exact_ev, lanczos_ev = spectra["exact"].eigenvalues, spectra["lanczos"].eigenvalues
    # Below ~1e-4·λ_1 float32 products cannot resolve eigenvalues (neither can the formed K).
    resolvable = exact_ev >= 1e-4 * exact_ev[0]
    rel = (lanczos_ev[resolvable] / exact_ev[resolvable] - 1).abs()
    print(f"device={device} torch {torch.__version__}  N={args.n}  MLP {args.depth}x{args.width}  k={args.k}")
    print(f"{'method':<36}{'time [s]':>10}{'ratio':>8}")
    print(f"{'Lanczos on K v = J(Jᵀv)':<36}{timings['lanczos']:10.2f}{timings['lanczos'] / timings['exact']:8.3f}")
    print(f"{'form K_rr (N VJPs) + eigvalsh':<36}{timings['exact']:10.2f}{1.0:8.3f}")
    count = int(resolvable.sum())
    print(f"largest relative error of the {count} Lanczos eigenvalues above 1e-4·λ_1: {float(rel.max()):.2e}")
    print("exact:  ", [f"{v:.4g}" for v in exact_ev.tolist()])
    print("Lanczos:", [f"{v:.4g}" for v in lanczos_ev.tolist()])


if __name__ == "__main__":
    main()
