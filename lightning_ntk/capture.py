"""Replayable computations: a function of tensors with fixed shapes, captured once as a CUDA graph.

At PINN sizes every eager GPU call is bound by kernel launches and Python, not by arithmetic (a
3×256 network's exact traces: 12 ms eager, ~1.6 ms as a replayed graph; the table in ``docs/guides/gpu.md``).
:class:`CapturedCall` wraps a function ``fn(*tensors) -> tensor or tuple of tensors`` and keeps one
graph per *capture key* (more than a batch signature: it holds the state too): the inputs' shapes,
dtypes and devices and the identity of the tensors that ``fn`` reads besides its inputs (the
parameters and point-weight buffers, given as ``state``). A call copies its inputs into
static buffers and replays the graph; the graph reads the parameters where they live, so in-place
updates (an optimizer step, ``load_state_dict``) are seen, and a new parameter set (``.to()``, a new
module) is a new key.

Everything a graph cannot do is decided before capture: the first call per key runs ``fn``
eagerly on a side stream (warm-up: the package's per-layout caches fill, lazy buffers are made), then
captures, replays once and compares with an eager call (``rtol``). Any capture error or mismatch
turns the key eager for good with one warning that names the reason: a failed capture costs
time, never a wrong number.

On a CPU (or with ``enabled=False``) the same object keeps the same discipline eagerly — the same
static buffers and copy-in, the same key cache and invalidation — so its bookkeeping is tested
on machines without a GPU.

Example:
    >>> import torch
    >>> w = torch.ones(3)
    >>> call = CapturedCall(lambda x: (w * x).sum(), state=lambda: [w])
    >>> call(torch.arange(3.0))
    tensor(3.)
    >>> w.mul_(2)  # in place: the same key, and the new values are read
    tensor([2., 2., 2.])
    >>> call(torch.arange(3.0)), len(call.entries)
    (tensor(6.), 1)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["CaptureKey", "CapturedCall", "captured_state"]

CaptureKey = tuple  # ((shape, dtype, device) per input, (id, data_ptr, shape) per state tensor)


@dataclass
class _Entry:
    """One capture key: its static inputs, and its graph and static outputs once captured."""

    inputs: list[Tensor]
    graph: Any = None  # torch.cuda.CUDAGraph
    outputs: tuple[Tensor, ...] | None = None
    single: bool = False
    eager_reason: str | None = None  # why this key runs eagerly (None: not decided yet / captured)
    calls: int = 0
    notes: list[str] = field(default_factory=list)


class CapturedCall:
    """``fn`` replayed from one CUDA graph per capture key, eager where a graph cannot be used.

    Args:
        fn: ``fn(*inputs) -> Tensor | tuple[Tensor, ...]``. It must read every value that changes from
            call to call either from its inputs or from tensors updated in place (listed by ``state``);
            Python-side branches are frozen at capture.
        state: Returns the tensors ``fn`` reads besides its inputs (usually the trainable parameters);
            a change of their identity or storage starts a new key.
        enabled: Capture on CUDA (default); ``False`` keeps every call eager (same buffers).
        warmup: Eager calls on a side stream before capture.
        rtol: Tolerance of the check of the first replay against an eager call (float32: 1e-5).
        generators: CUDA generators ``fn`` draws from, registered with each graph so a replay draws
            fresh numbers and advances them as an eager call would.
        snapshot: For an ``fn`` with side effects (a training step): saves the state it changes and
            returns a function that puts it back in place. The warm-up calls and the checked replay
            are undone with it, so the first call per key changes the state exactly once.
        name: Named in warnings.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor | tuple[Tensor, ...]],
        *,
        state: Callable[[], Sequence[Tensor]] = list,
        enabled: bool = True,
        warmup: int = 2,
        rtol: float = 1e-5,
        generators: Callable[[], Sequence[torch.Generator]] = list,
        snapshot: Callable[[], Callable[[], None]] | None = None,
        name: str = "computation",
    ) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"`warmup` must be a positive int (eager calls before capture), got {warmup!r}.")
        self.fn, self.state, self.enabled, self.warmup, self.rtol = fn, state, enabled, warmup, rtol
        self.generators, self.snapshot, self.name = generators, snapshot, name
        self.entries: dict[CaptureKey, _Entry] = {}
        self.warned: set[str] = set()

    def key(self, inputs: Sequence[Tensor]) -> CaptureKey:
        ins = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        held = tuple((id(t), t.data_ptr(), tuple(t.shape)) for t in self.state())
        return ins, held

    def clear(self) -> None:
        """Forget every graph (e.g. after the function's Python-side behaviour changed)."""
        self.entries.clear()

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError(f"{type(self).__name__} takes tensors only, got {[type(t).__name__ for t in inputs]}.")
        key = self.key(inputs)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= 16:  # a shape that changes every call: keep memory bounded
                self.entries.pop(next(iter(self.entries)))
            entry = self.entries[key] = _Entry([torch.empty_like(t) for t in inputs])
        _copy_in(entry.inputs, inputs)
        entry.calls += 1
        cuda = bool(inputs) and all(t.device.type == "cuda" for t in inputs)
        if not (self.enabled and cuda) or entry.eager_reason is not None:
            return self.fn(*entry.inputs)
        if entry.graph is None:
            return self._capture(entry, inputs)
        entry.graph.replay()
        return self._result(entry)

    def _result(self, entry: _Entry) -> Tensor | tuple[Tensor, ...]:
        # Clones: the static outputs are overwritten by the next replay.
        outs = tuple(t.clone() for t in entry.outputs)
        return outs[0] if entry.single else outs

    def _capture(self, entry: _Entry, inputs: Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
        try:
            restore = self.snapshot() if self.snapshot is not None else None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*entry.inputs)
            torch.cuda.current_stream().wait_stream(side)
            if restore is not None:
                restore()
            graph = torch.cuda.CUDAGraph()
            for generator in self.generators():
                register = getattr(graph, "register_generator_state", None)
                if register is None:
                    raise RuntimeError("this torch cannot register a generator with a CUDA graph")
                register(generator)
            with torch.cuda.graph(graph):
                out = self.fn(*entry.inputs)
        except Exception as err:
            return self._go_eager(entry, f"capture failed ({type(err).__name__}: {err})")
        entry.single = isinstance(out, Tensor)
        entry.outputs = (out,) if entry.single else tuple(out)
        entry.graph = graph
        # The check replays and then runs eagerly from the same generator states: the same draws.
        states = [g.get_state() for g in self.generators()]
        restore = self.snapshot() if self.snapshot is not None else None
        graph.replay()
        replayed = self._result(entry)
        if restore is not None:
            restore()
        for g, state in zip(self.generators(), states, strict=True):
            g.set_state(state)
        _copy_in(entry.inputs, inputs)
        eager = self.fn(*entry.inputs)
        got = (replayed,) if entry.single else replayed
        want = (eager,) if entry.single else tuple(eager)
        for a, b in zip(got, want, strict=True):
            if not torch.allclose(a, b, rtol=self.rtol, atol=0, equal_nan=True):
                return self._go_eager(entry, f"the replay differs from an eager call ({a.tolist()} vs {b.tolist()})")
        return replayed

    def _go_eager(self, entry: _Entry, reason: str) -> Tensor | tuple[Tensor, ...]:
        entry.graph, entry.outputs, entry.eager_reason = None, None, reason
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"lightning_ntk: {self.name} runs eagerly: {reason}.", stacklevel=3)
        return self.fn(*entry.inputs)


@torch.no_grad()
def _copy_in(static: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    # No grad: a residual in the autograd style marks its input tensor requires_grad, and the static
    # buffer it got keeps that flag from call to call.
    for buffer, value in zip(static, values, strict=True):
        buffer.copy_(value)


def captured_state(module: torch.nn.Module) -> list[Tensor]:
    """What a replay of ``module``'s computations reads besides its inputs and must see in place: the
    trainable parameters and the per-term point-weight buffers (``point_weights``, written in place each
    step; a new buffer, or one more or one fewer, is a new key)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return params + list(getattr(module, "point_weights", {}).values())
