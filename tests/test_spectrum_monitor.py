"""NTKSpectrumMonitor: spectra logged on schedule, from rank zero, never touching the weights."""

from pathlib import Path

import pytest
import torch
from conftest import poisson_batch, quiet_trainer, repeat_loader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_callback import Recording

from lightning_ntk import LossTimeAverage, NTKSpectrumMonitor, NTKWeightingCallback, block_spectra


def test_spectra_residual_average_and_layout_are_logged(tmp_path):
    model = Recording()
    ntk = NTKSpectrumMonitor(every_n_steps=2, k=3)
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[NTKWeightingCallback(1), ntk, LossTimeAverage()])
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 4))
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("bc", "pde"):
        assert [e.step for e in events.Scalars(f"ntk/eig/{name}/1")] == [0, 2]
        assert {f"ntk/cond/{name}", f"ntk/effective_rank/{name}", f"ntk/top_k_fraction/{name}"} <= scalars
        assert f"ntk/eig_hist/{name}" in events.Tags()["histograms"]
    assert "ntk/eig/bc/3" not in scalars  # bc has 2 rows: k is capped at the block size
    eig = [events.Scalars(f"ntk/eig/pde/{j}")[-1].value for j in (1, 2, 3)]
    assert eig == sorted(eig, reverse=True)
    spec = ntk.last_spectra["pde"]
    assert float(spec.effective_rank) >= 1.0 and 0 < float(spec.top_k_fraction) <= 1.0 + 1e-6
    avg = events.Scalars("loss/time_average")
    assert len(avg) == 4 and all(e.value > 0 for e in avg)
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # the layout, written once at fit start


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"k": 0}, "`k`"),
        ({"method": "svd"}, "method"),
        ({"seed": None}, "seed"),
    ],
)
def test_bad_spectrum_monitor_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        NTKSpectrumMonitor(**kwargs)


def test_non_tensorboard_logger_gets_scalars_and_one_warning(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = Recording()
    callbacks = [NTKWeightingCallback(1), NTKSpectrumMonitor(every_n_steps=1, k=2)]
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=callbacks, logger=CSVLogger(tmp_path, name="csv"))
    with pytest.warns(UserWarning, match="histograms need a TensorBoardLogger") as record:
        trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 3))
    assert sum("histograms need a TensorBoardLogger" in str(w.message) for w in record) == 1
    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "ntk/eig/pde/1" in header and "ntk/weight/bc" in header


def test_monitor_alone_leaves_weights_at_one_and_matches_block_spectra(tmp_path):
    model = Recording(lr=0.0)
    batch = poisson_batch(dtype=torch.float32)
    monitor = NTKSpectrumMonitor(every_n_steps=2, k=2, method="exact")
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[monitor], logger=False)
    trainer.fit(model, repeat_loader(batch, 3))
    assert all(u == {"bc": 1.0, "pde": 1.0} for u in model.used)
    want = block_spectra(model, batch, k=2, method="exact")
    for name in ("bc", "pde"):
        torch.testing.assert_close(monitor.last_spectra[name].eigenvalues, want[name].eigenvalues)
    assert monitor.state_dict()["last_step"] == 2
    fresh = NTKSpectrumMonitor(every_n_steps=2, k=2)
    fresh.load_state_dict(monitor.state_dict())
    fresh.on_fit_start(trainer, model)
    assert torch.equal(fresh.rng.generator.get_state(), monitor.rng.generator.get_state())
