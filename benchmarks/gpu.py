"""The prepared GPU check: CUDA tests, eager vs captured traces and steps, Trainer rows, and JAX beside them.

One command, under 5 minutes on one GPU, one table at the end (markdown, for ``docs/results.md``):

1. ``tests/test_cuda.py`` (pytest, in a subprocess);
2. for each (W, N): a 1-W-W-W-1 tanh MLP, the Poisson problem of ``_problem.py`` with autograd-style
   ``u_xx``, N points per term, full float32 (``torch.set_float32_matmul_precision("highest")``):
   a training step eager and replayed from a CUDA graph (:class:`~lightning_ntk.capture.CapturedCall`,
   Adam ``capturable=True``), exact traces eager and captured (what ``NTKWeightingCallback(capture=True)``
   replays);
3. the two-output 2-D PINN of ``exact_cost.py`` (Q-tensor type, 4×W tanh, N pde + N/4 ic points,
   stacked per-component rows): the same four rows, where the cut component backwards are measured;
4. through a ``Trainer`` at one size: the plain module, ``capture_step=True``, and exact traces every step
   (``NTKWeightingCallback(update_every_n_steps=1)``) with each;
5. if ``jax`` imports: ``../shared/bench/gpu_step_compare.py W N`` (JAX-PI-style ``jit(vmap(grad))``
   traces and a jitted Adam step on the same weights and points) with
   ``JAX_DEFAULT_MATMUL_PRECISION=highest``, so both sides multiply in full float32.

    python benchmarks/gpu.py                           # on a GPU machine
    python benchmarks/gpu.py --out gpu_table.md        # also write the table
    python benchmarks/gpu.py --device cpu --sizes 8x32 --trainer-size 8x32 --steps 6 --no-tests --no-jax

Times are medians in ms (CUDA-synchronised around each call). On a CPU every "captured" row runs the
same buffers eagerly; the CPU mode exists so that the script is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from _problem import AutogradPoisson, make_batch, median_time, sync
from exact_cost import QTensor2d, qtensor_batch

from lightning_ntk import NTKWeightingCallback
from lightning_ntk.capture import CapturedCall
from lightning_ntk.estimators.exact import exact_traces

ROOT = Path(__file__).resolve().parents[1]
JAX_SCRIPTS = [ROOT.parent / "shared/bench/gpu_step_compare.py", ROOT / "shared/bench/gpu_step_compare.py"]


def parse_size(text: str) -> tuple[int, int]:
    w, n = text.lower().split("x")
    return int(w), int(n)


def run_cuda_tests() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    print("\n".join(lines[-15:]), flush=True)
    return lines[-1] if lines else f"pytest exited {proc.returncode} with no output"


def step_and_trace_rows(width: int, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    return model_rows(AutogradPoisson(width, 3).to(device), make_batch(n, device), f"W={width} N={n}", repeats)


def two_output_rows(width: int, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    batch = tuple(t.to(device) for t in qtensor_batch(n, max(1, n // 4)))
    return model_rows(QTensor2d(width, 4).to(device), batch, f"2-D W={width} N={n}", repeats)


def model_rows(model, batch: tuple, label: str, repeats: int) -> dict[str, float]:
    device = batch[0].device
    cuda = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=cuda)

    def step(*tensors):
        opt.zero_grad(set_to_none=False)
        loss = model.step_losses(tensors).total
        loss.backward()
        opt.step()
        return loss.detach()

    def traces(*tensors):
        est = exact_traces(model, tensors)
        return torch.stack([est.values[name] for name in model.terms])

    params = lambda: list(model.parameters())  # noqa: E731
    captured_step = CapturedCall(step, state=params, name="the benchmark step")
    captured_traces = CapturedCall(traces, state=params, name="the benchmark traces")
    ms = lambda fn: 1e3 * median_time(lambda: fn(*batch), repeats, device, warmup=3)  # noqa: E731
    rows = {
        "step, eager": ms(step),
        "step, captured": ms(captured_step),
        "exact traces, eager": ms(traces),
        "exact traces, captured": ms(captured_traces),
    }
    for name, call in (("step", captured_step), ("traces", captured_traces)):
        reasons = {e.eager_reason for e in call.entries.values() if e.eager_reason}
        if cuda and reasons:
            print(f"  {label}: captured {name} ran eagerly: {reasons}", flush=True)
    return rows


class WallClock(pl.Callback):
    """Wall time from the start of batch ``skip`` to the end of training (synchronised at both ends)."""

    def __init__(self, device: torch.device, skip: int = 10) -> None:
        self.device, self.skip = device, skip
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.skip


def trainer_ms_per_step(width: int, n: int, device: torch.device, steps: int, capture_step: bool, exact: bool) -> float:
    torch.manual_seed(0)
    model = AutogradPoisson(width, 3, capture_step=capture_step)
    batch = make_batch(n, torch.device("cpu"))
    clock = WallClock(device, skip=min(10, steps // 2))
    callbacks = [clock] + ([NTKWeightingCallback(update_every_n_steps=1)] if exact else [])
    pl.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(model, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return 1e3 * (clock.end - clock.start) / max(1, clock.steps)


def jax_rows(width: int, n: int, script: Path) -> dict[str, float]:
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(width), str(n)], capture_output=True, text=True, timeout=150, env=env
        )
    except subprocess.TimeoutExpired:
        print(f"  JAX side W={width} N={n}: timed out", flush=True)
        return {}
    out = proc.stdout
    summary = out[out.find("SUMMARY") :] if "SUMMARY" in out else ""
    rows = {}
    for label, key in (("JAX jit training step", "JAX step"), ("JAX-PI way exact traces", "JAX traces")):
        match = re.search(re.escape(label) + r".*?([0-9.]+) ms", summary)
        if match:
            rows[key] = float(match.group(1))
    if not rows:
        print(f"  JAX side W={width} N={n}: no JAX rows; its output ended:\n{(out + proc.stderr)[-1500:]}", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(256, 4096), (256, 16384), (64, 1024)])
    p.add_argument("--trainer-size", type=parse_size, default=(256, 4096))
    p.add_argument("--two-output", type=parse_size, default=(128, 1024), help="W x N of the 2-D two-output rows")
    p.add_argument("--steps", type=int, default=200, help="Trainer steps per row")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-jax", action="store_true")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")
    started = time.perf_counter()
    lines = [
        f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        "float32 with full-precision matmuls on both sides (torch `highest`, `JAX_DEFAULT_MATMUL_PRECISION=highest`)",
        "",
    ]
    if not args.no_tests:
        lines += [f"tests/test_cuda.py: {run_cuda_tests()}", ""]
    script = next((s for s in JAX_SCRIPTS if s.exists()), None)
    use_jax = not args.no_jax and script is not None and _imports("jax")
    if not args.no_jax and not use_jax:
        lines += ["JAX side skipped: " + ("jax does not import" if script else "gpu_step_compare.py not found"), ""]
    head = ["W", "N", "step eager", "step captured", "exact eager", "exact captured"]
    head += ["JAX step", "JAX traces", "captured step / JAX", "captured exact / JAX"] if use_jax else []
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for width, n in args.sizes:
        rows = step_and_trace_rows(width, n, device, args.repeats)
        cells = [str(width), f"{n:,}"] + [f"{rows[k]:.3f}" for k in rows]
        if use_jax:
            jax = jax_rows(width, n, script)
            step, traces = jax.get("JAX step"), jax.get("JAX traces")
            cells += [f"{step:.3f}" if step else "—", f"{traces:.3f}" if traces else "—"]
            cells += [f"{rows['step, captured'] / step:.2f}" if step else "—"]
            cells += [f"{rows['exact traces, captured'] / traces:.2f}" if traces else "—"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    width, n = args.two_output
    lines += ["", f"Two-output 2-D PINN, 4x{width} tanh, {n:,} pde + {max(1, n // 4):,} ic points, ms:", ""]
    lines += ["| step eager | step captured | exact eager | exact captured |", "| --- | --- | --- | --- |"]
    rows = two_output_rows(width, n, device, args.repeats)
    lines.append("| " + " | ".join(f"{v:.3f}" for v in rows.values()) + " |")
    print(lines[-1], flush=True)
    width, n = args.trainer_size
    lines += ["", f"Trainer, W={width}, N={n:,} per term, ms per step ({args.steps} steps, first 10 not timed):", ""]
    lines += ["| module | plain | exact traces every step | ratio |", "| --- | --- | --- | --- |"]
    for capture_step in (False, True):
        plain = trainer_ms_per_step(width, n, device, args.steps, capture_step, exact=False)
        exact = trainer_ms_per_step(width, n, device, args.steps, capture_step, exact=True)
        lines.append(f"| capture_step={capture_step} | {plain:.3f} | {exact:.3f} | {exact / plain:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"(all of this took {time.perf_counter() - started:.0f} s)"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


def _imports(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


if __name__ == "__main__":
    main()
