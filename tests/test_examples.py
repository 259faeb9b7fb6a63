"""Smoke tests: every example runs end to end on a few steps."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The figures need the plot extra (in the dev extra, so `make test` has it).
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_poisson_1d_runs_and_reports(tmp_path, capsys):
    poisson = load("poisson_1d")
    poisson.main(["--steps", "30", "--update-every", "10", "--logdir", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert "λ_bc" in out and "NTK weights" in out and "plain" in out
    assert "it/s" not in out + captured.err  # no progress bar when the output is not a terminal
    assert (tmp_path / "poisson_1d" / "ntk").is_dir()
    for run in ("plain", "ntk"):
        assert (tmp_path / "poisson_1d" / run / "poisson_1d.png").is_file() == HAS_MATPLOTLIB
    # The demo says why its final λ_bc is far from the one at initialization, with numbers that add up.
    why = re.search(
        r"Why λ_bc moved from ([0-9.e+]+) to ([0-9.e+]+): .* Tr K_pde = ([0-9.e+]+) .* Tr K_bc = ([0-9.e+]+)", out
    )
    assert why, out
    start, end, pde, bc = (float(g) for g in why.groups())
    final = float(re.search(r"NTK weights .* bc=([0-9.e+]+)", out).group(1))
    assert end == pytest.approx((bc + pde) / bc, rel=1e-3) and end == pytest.approx(final, rel=1e-3)
    initial = float(re.search(r"λ_bc = ([0-9.e+]+)", out).group(1))
    assert start == pytest.approx(initial, rel=1e-2)


@pytest.mark.parametrize("name", ["poisson_1d", "wave_1d"])
def test_figures_are_skipped_without_matplotlib(name, tmp_path, monkeypatch):
    example = load(name)
    model = example.Poisson1D() if name == "poisson_1d" else example.Wave1D(width=8)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert example.save_figure(model, str(tmp_path)) is None
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs the plot extra")
@pytest.mark.parametrize("name", ["poisson_1d", "wave_1d"])
def test_figures_are_pngs(name, tmp_path):
    example = load(name)
    model = example.Poisson1D() if name == "poisson_1d" else example.Wave1D(width=8)
    path = Path(example.save_figure(model, str(tmp_path / "run")))
    assert path == tmp_path / "run" / f"{name}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# A fallback to a slower exact path is an error here: the example's network is the Gram path's plainest case,
# and on torch 2.15 a ZeroTensor gradient once sent it to `vmap` while every number stayed right.
@pytest.mark.filterwarnings("error:Exact NTK traces of")
def test_poisson_1d_paper_setting_gives_lambda_bc_near_100(capsys):
    # design.md §3: the paper's network at init, boundary block over x=0 and x=1, gives λ_bc ≈ 100.
    poisson = load("poisson_1d")
    args = poisson.parse_args(["--paper", "--float64", "--seed", "1"])
    model, data = poisson.build(args)
    from lightning_ntk import ntk_traces, trace_weights

    w = trace_weights(ntk_traces(model, data.batch))
    assert 30 < float(w["bc"]) < 400
    assert float(w["pde"]) == pytest.approx(1.0, abs=0.05)
    many = poisson.build(poisson.parse_args(["--paper", "--float64", "--seed", "1", "--boundary-copies", "50"]))
    w_many = trace_weights(ntk_traces(many[0], many[1].batch))
    assert 1.5 < float(w_many["bc"]) < 5  # 100 boundary rows: Tr K_bb is 50× larger


@pytest.mark.slow
def test_fd_per_step_weights_train_as_well_as_exact_weights(tmp_path):
    # Per-step weights from one finite-difference probe (averaged over steps) against exact weights
    # every 100 steps, on a short run of the Poisson example (plain training is at ~1.7 here).
    poisson = load("poisson_1d")
    common = ["--steps", "1500", "--logdir", str(tmp_path)]
    exact_model, _, _ = poisson.train(poisson.parse_args(common), use_ntk=True)
    fd_args = [*common, "--estimator", "fd", "--update-every", "1", "--trace-ema", "0.99"]
    fd_model, _, fd_cb = poisson.train(poisson.parse_args(fd_args), use_ntk=True)
    exact_err, fd_err = exact_model.relative_l2_error(), fd_model.relative_l2_error()
    assert fd_err < 3 * exact_err, (fd_err, exact_err)
    assert fd_err < 0.5
    assert fd_cb.last_weights["bc"] == pytest.approx(exact_model.term_weights["bc"], rel=0.5)


def test_fourier_features_spectrum_runs(tmp_path, capsys):
    example = load("fourier_features_spectrum")
    example.main(
        [
            "--steps",
            "20",
            "--num-residual",
            "24",
            "--k",
            "6",
            "--logdir",
            str(tmp_path),
            "--out",
            str(tmp_path / "spectrum.png"),
        ]
    )
    out = capsys.readouterr().out
    assert "tanh_mlp at init" in out and "fourier after 20 steps" in out and "λ1/λk" in out
    assert (tmp_path / "fourier_features_spectrum" / "fourier").is_dir()


CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
# LightningCLI needs jsonargparse (the `cli` and `dev` extras); with only `.[test]` these tests skip.
needs_cli = pytest.mark.skipif(
    importlib.util.find_spec("jsonargparse") is None, reason="needs jsonargparse: pip install -e '.[cli]'"
)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI also looks at sys.argv; the tests pass their arguments explicitly.
    monkeypatch.setattr(sys, "argv", ["example.py"])


def _cli(config: Path, tmp_path, *extra: str, run: bool = False):
    module = load(re.sub(r"_(ntk|plain|paper|grad_norm).*$", "", config.stem))
    args = ["--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path), *extra]
    return module.cli_main(args if not run else ["fit", *args], run=run)


@needs_cli
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_builds(config, tmp_path):
    cli = _cli(config, tmp_path)
    callbacks = [type(c).__name__ for c in cli.trainer.callbacks]
    assert ("NTKWeightingCallback" in callbacks) == ("plain" not in config.stem)
    assert cli.model.terms


@needs_cli
@pytest.mark.parametrize("config", [c for c in CONFIGS if "paper" not in c.stem], ids=lambda c: c.name)
def test_configs_train_a_few_steps(config, tmp_path, capsys):
    _cli(
        config,
        tmp_path,
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        run=True,
    )
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(list(tmp_path.rglob("*_[12]d.png"))) == HAS_MATPLOTLIB
    out = capsys.readouterr().out
    assert re.search(r"relative L2 error \d\.\d{3}e[-+]\d+ after 4 steps", out) and "final weights: " in out


@needs_cli
def test_cli_sets_callback_arguments_and_rejects_bad_ones(tmp_path, capsys):
    config = EXAMPLES / "configs" / "wave_1d_ntk.yaml"
    cli = _cli(config, tmp_path, "--trainer.callbacks.update_every_n_steps", "7")
    (ntk,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "NTKWeightingCallback"]
    assert ntk.update_every_n_steps == 7
    bad = (
        ("0", "`update_every_n_steps` must be a positive int, got 0 (1 = every"),
        ("abc", "Expected a <class 'int'>"),
    )
    for value, message in bad:
        with pytest.raises((SystemExit, ValueError)) as err:
            _cli(config, tmp_path, "--trainer.callbacks.update_every_n_steps", value)
        assert message in str(err.value) + capsys.readouterr().err


@needs_cli
def test_cli_builds_callback_parts_from_class_paths(tmp_path):
    from lightning_ntk import FiniteDifference, TraceAverager, WeightRule

    config = EXAMPLES / "configs" / "poisson_1d_ntk_fd_per_step.yaml"
    cli = _cli(config, tmp_path, "--trainer.callbacks.estimator.init_args.num_probes", "3")
    (ntk,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "NTKWeightingCallback"]
    assert ntk.estimator == FiniteDifference(num_probes=3, points_per_probe="auto")
    assert isinstance(ntk.trace_averager, TraceAverager) and ntk.trace_averager.beta == 0.99
    assert isinstance(ntk.weight_rule, WeightRule) and ntk.weight_rule.mode == "trace"
    cli = _cli(EXAMPLES / "configs" / "poisson_1d_ntk.yaml", tmp_path, "--trainer.callbacks.estimator", "hutchinson")
    (ntk,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "NTKWeightingCallback"]
    assert repr(ntk.estimator) == "Hutchinson(num_probes=16)"


@needs_cli
def test_cli_help_for_the_callback_comes_from_its_docstring(tmp_path, capsys):
    from lightning_ntk import NTKWeightingCallback

    config = EXAMPLES / "configs" / "wave_1d_ntk.yaml"
    with pytest.raises(SystemExit) as exit_:
        _cli(config, tmp_path, "--trainer.callbacks.help", "lightning_ntk.NTKWeightingCallback")
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse rewraps the text
    assert "--trainer.callbacks.update_every_n_steps" in out and "--trainer.callbacks.trace_averager" in out
    phrase = "Recompute the weights every this many optimizer steps"
    assert phrase in " ".join(NTKWeightingCallback.__doc__.split()) and phrase in out


def test_wave_1d_compare_runs(tmp_path, capsys):
    wave = load("wave_1d")
    wave.compare(["--steps", "6", "--update-every", "3", "--report-every", "3", "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "plain" in out and "NTK weights" in out and "ut=" in out
    assert "[ntk] step      3" in out
    for run in ("plain", "ntk"):
        assert (tmp_path / "wave_1d" / run / "wave_1d.png").is_file() == HAS_MATPLOTLIB


def test_poisson_paper_flag_keeps_explicit_flags():
    poisson = load("poisson_1d")
    args = poisson.parse_args(["--paper", "--steps", "5", "--loss-reduction", "sum"])
    assert (args.steps, args.width, args.depth, args.optimizer, args.lr) == (5, 100, 1, "gd", 1e-5)
    model, _ = poisson.build(args)
    r = torch.ones(4)
    assert float(model.term_loss("pde", r)) == 4.0  # a sum, not a mean


def test_poisson_authors_setup_gives_lambda_bc_near_100():
    # The authors' code: inputs standardized, W ~ N(0, 1/fan_in), 100 boundary rows (50 per end).
    poisson = load("poisson_1d")
    args = poisson.parse_args(
        ["--paper", "--parameterization", "ntk_init", "--standardize-inputs", "--boundary-copies", "50", "--float64"]
    )
    model, data = poisson.build(args)
    from lightning_ntk import ntk_traces, trace_weights

    w = trace_weights(ntk_traces(model, data.batch))
    assert 30 < float(w["bc"]) < 300
    x = torch.linspace(0, 1, 5, dtype=torch.float64).reshape(-1, 1)
    torch.testing.assert_close(model.net[0](x), (x - 0.5) * 12**0.5)


def _wave_pair(wave, points: int, seed: int, **options):
    """A TaylorMLP and an nn.Sequential wave model with the same weights, and a float64 batch."""
    torch.manual_seed(0)
    taylor = wave.Wave1D(8, 2, network="taylor", **options).double()
    sequential = wave.Wave1D(8, 2, network="sequential", **options).double()
    linears = [m for m in sequential.net if isinstance(m, torch.nn.Linear)]
    for mine, theirs in zip(taylor.net.layers, linears, strict=True):
        theirs.load_state_dict(mine.state_dict())
    batch = next(iter(wave._FreshPoints(points, seed=seed)))
    batch = {k: tuple(t.double() for t in v) if isinstance(v, tuple) else v.double() for k, v in batch.items()}
    return taylor, sequential, batch


def _assert_same_residuals_and_traces(taylor, sequential, batch):
    from lightning_ntk import ntk_traces

    r_taylor, r_sequential = taylor.residuals(batch), sequential.residuals(batch)
    t_taylor, t_sequential = ntk_traces(taylor, batch), ntk_traces(sequential, batch)
    for name in ("u", "ut", "res"):
        torch.testing.assert_close(r_taylor[name], r_sequential[name], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(t_taylor[name], t_sequential[name], rtol=1e-9, atol=0)


def test_wave_1d_taylor_and_sequential_networks_agree():
    # The two network choices are one function: same residuals, same exact traces (float64).
    wave = load("wave_1d")
    _assert_same_residuals_and_traces(*_wave_pair(wave, 10, seed=1))
    with pytest.raises(ValueError, match="network must be"):
        wave.Wave1D(8, 2, network="resnet")


def test_wave_1d_paper_flag_keeps_explicit_flags():
    wave = load("wave_1d")
    args = wave.parse_args(["--paper", "--width", "200"])
    assert (args.width, args.depth, args.steps, args.update_every) == (200, 5, 80_000, 1000)


def test_wave_1d_authors_conventions():
    # Standardized inputs: derivatives are still taken in (x, t); the sum of part means is 3 × the mean.
    wave = load("wave_1d")
    taylor, scaled, batch = _wave_pair(wave, 9, seed=2, standardize_inputs=True, u_loss="sum_of_parts")
    _assert_same_residuals_and_traces(taylor, scaled, batch)
    r_scaled = scaled.residuals(batch)
    plain = wave.Wave1D(8, 2)
    # Against finite differences in the original coordinates on one residual point.
    xt = batch["res"][:1]
    h = 1e-4

    def at(dx, dt):
        return scaled.u(xt + torch.tensor([[dx, dt]], dtype=torch.float64))

    u_tt = (at(0, h) - 2 * at(0, 0) + at(0, -h)) / h**2
    u_xx = (at(h, 0) - 2 * at(0, 0) + at(-h, 0)) / h**2
    torch.testing.assert_close(r_scaled["res"][:1], u_tt - 4 * u_xx, rtol=1e-5, atol=1e-5)
    xt_u = batch["u"][0]
    assert (xt_u[:3, 1] == 0).all() and (xt_u[3:6, 0] == 0).all() and (xt_u[6:, 0] == 1).all()
    r = torch.arange(9.0, dtype=torch.float64).reshape(9, 1)
    assert float(scaled.term_loss("u", r)) == pytest.approx(3 * float(r.square().mean()))
    assert float(plain.term_loss("u", r)) == pytest.approx(float(r.square().mean()))
    args = wave.parse_args(["--authors-code"])
    assert (args.standardize_inputs, args.u_loss, args.continuous_decay) == (True, "sum_of_parts", True)


@needs_cli
def test_the_gauss_newton_config_trains_with_ntk_gauss_newton_in_float64(tmp_path):
    from lightning_ntk import NTKGaussNewton

    config = EXAMPLES / "configs" / "burgers_1d_ntk_gauss_newton.yaml"
    cli = _cli(config, tmp_path, "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", run=True)
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, NTKGaussNewton) and optimizer.last is not None and optimizer.last.accepted
    assert next(cli.model.parameters()).dtype == torch.float64
