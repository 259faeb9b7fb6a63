"""NTK spectra of a plain tanh MLP and of a Fourier-feature network on a multi-scale 1-D problem.

    u_xx = f on [0, 1],  u(0) = u(1) = 0,  u = sin(2πx) + 0.1 sin(20πx)

The residual block K_rr of a plain MLP has a fast-decaying spectrum: a few large eigenvalues (smooth
directions, learned fast) and a long tail (high frequencies, learned slowly: spectral bias).
Fourier features γ(x) = [sin(2πBx), cos(2πBx)], B ~ N(0, σ²) (Tancik et al. 2020) flatten the decay.
This script computes the top eigenvalues of K_rr and K_bb at initialization and after training
(with NTK weights, exact every 100 steps), prints them with condition ratios and effective ranks,
writes TensorBoard logs (eigenvalue scalars and histograms) and, with matplotlib installed
(`pip install matplotlib`), saves `fourier_features_spectrum.png` (log–log eigenvalue decay).

    python examples/fourier_features_spectrum.py            # ~75 s on 2 CPU cores
    python examples/fourier_features_spectrum.py --steps 200 --num-residual 64   # quick look
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_ntk import NTKSpectrumMonitor, NTKWeightingCallback, PINNModule, ntk_eigenvalues
from lightning_ntk.derivatives import partial


def exact_solution(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x) + 0.1 * torch.sin(20 * math.pi * x)


def source(x: torch.Tensor) -> torch.Tensor:
    return -4 * math.pi**2 * torch.sin(2 * math.pi * x) - 0.1 * 400 * math.pi**2 * torch.sin(20 * math.pi * x)


class FourierFeatures(nn.Module):
    """γ(x) = [sin(2π x Bᵀ), cos(2π x Bᵀ)] with a fixed (non-trainable) B ~ N(0, σ²)."""

    def __init__(self, d_in: int, num_features: int, sigma: float) -> None:
        super().__init__()
        self.register_buffer("B", torch.randn(num_features, d_in) * sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * x @ self.B.T
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def make_net(fourier: bool, width: int, sigma: float) -> nn.Sequential:
    first: list[nn.Module] = [FourierFeatures(1, width // 2, sigma)] if fourier else [nn.Linear(1, width), nn.Tanh()]
    return nn.Sequential(
        *first, nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


class MultiScalePoisson(PINNModule):
    def __init__(self, fourier: bool = False, width: int = 64, sigma: float = 2.0, lr: float = 1e-3) -> None:
        super().__init__(terms=["bc", "pde"])
        self.save_hyperparameters()
        self.net = make_net(fourier, width, sigma)

    def residuals(self, batch):
        x_b, x_r = batch
        return {"bc": self.net(x_b), "pde": partial(self.net, x_r, 0, 0) - source(x_r)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def relative_l2_error(self) -> float:
        x = torch.linspace(0, 1, 1000).reshape(-1, 1)
        return float((self.net(x) - exact_solution(x)).norm() / exact_solution(x).norm())


def spectra(model: PINNModule, batch, k: int) -> dict:
    return {term: ntk_eigenvalues(model, batch, k=min(k, 2 if term == "bc" else k), term=term) for term in model.terms}


def describe(label: str, spec: dict) -> str:
    s = spec["pde"]
    top = ", ".join(f"{v:.3g}" for v in s.eigenvalues[:5].tolist())
    return (
        f"{label:<28} K_rr top-5 [{top}]  λ1/λk={float(s.condition_ratio):.3g}  "
        f"eff. rank={float(s.effective_rank):.2f}  top-k share={float(s.top_k_fraction):.3f}"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--num-residual", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--sigma", type=float, default=2.0, help="scale of the Fourier frequencies")
    p.add_argument("--k", type=int, default=40, help="eigenvalues to compute per block")
    p.add_argument("--logdir", default="lightning_logs")
    p.add_argument("--out", default="fourier_features_spectrum.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    x_b = torch.tensor([[0.0], [1.0]])
    x_r = torch.linspace(0, 1, args.num_residual).reshape(-1, 1)
    batch = (x_b, x_r)
    results = {}
    for fourier in (False, True):
        name = "fourier" if fourier else "tanh_mlp"
        pl.seed_everything(args.seed, verbose=False)
        model = MultiScalePoisson(fourier, args.width, args.sigma)
        init = spectra(model, batch, args.k)
        callbacks = [NTKWeightingCallback(update_every_n_steps=100), NTKSpectrumMonitor(every_n_steps=500, k=10)]
        trainer = pl.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            callbacks=callbacks,
            logger=TensorBoardLogger(
                args.logdir, name="fourier_features_spectrum", version=name, default_hp_metric=False
            ),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=50,
        )
        trainer.fit(model, torch.utils.data.DataLoader([batch] * args.steps, batch_size=None))
        results[name] = (init, spectra(model, batch, args.k), model.relative_l2_error())

    print()
    for name, (init, trained, err) in results.items():
        print(describe(f"{name} at init", init))
        print(describe(f"{name} after {args.steps} steps", trained))
        print(f"{'':<28} relative L2 error {err:.3e}")
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}/fourier_features_spectrum")
    plot(results, Path(args.out))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib).")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (init, trained, _) in results.items():
        for label, spec, style in (("init", init, "--"), ("trained", trained, "-")):
            ev = spec["pde"].eigenvalues.clamp_min(1e-12)
            ax.loglog(range(1, ev.numel() + 1), ev.tolist(), style, label=f"{name} ({label})")
    ax.set_xlabel("index k")
    ax.set_ylabel("eigenvalue λ_k of K_rr")
    ax.set_title("NTK residual-block spectrum")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"Saved {path}")


if __name__ == "__main__":
    main()
