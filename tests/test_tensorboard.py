"""The loggers' side of the callbacks: when a callback logs, and that every logger gets the scalars."""

from types import SimpleNamespace

from lightning_ntk.tensorboard import due, log_metrics


def trainer_at(step: int, every: int = 5, loggers=()):
    return SimpleNamespace(global_step=step, log_every_n_steps=every, loggers=list(loggers))


def test_due_logs_first_then_every_n_optimizer_steps_once():
    last, logged = -1, []
    for step in [0, 0, 1, 4, 5, 5, 6, 9, 10, 12]:  # repeated steps: micro-batches of gradient accumulation
        if due(trainer_at(step), last):
            logged.append(step)
            last = step
    assert logged == [0, 5, 10]
    assert due(trainer_at(3, every=0), 2)  # log_every_n_steps=0 counts as every step


def test_log_metrics_reaches_every_logger_at_the_optimizer_step():
    seen = []

    class Logger:
        def log_metrics(self, metrics, step):
            seen.append((dict(metrics), step))

    log_metrics(trainer_at(7, loggers=[Logger(), Logger()]), {"a": 1.0})
    assert seen == [({"a": 1.0}, 7), ({"a": 1.0}, 7)]
