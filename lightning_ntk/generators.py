"""``CallbackGenerator``: a callback's random generator, made on the module's device and kept in checkpoints."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CallbackGenerator"]


class CallbackGenerator:
    """The random generator of a callback that draws probes or start vectors.

    It can only be made once the module's device is known (at fit start), while a checkpoint's state
    may arrive before that: a state loaded early waits and is applied when the generator is made.

    Args:
        seed: The seed; ``None`` draws one from torch's global RNG when the generator is made.
        per_rank: Offset the seed by the global rank, so ranks draw independent numbers.

    Example:
        >>> rng = CallbackGenerator(seed=3)
        >>> g = rng.start(torch.device("cpu"), rank=1)  # seeded 3 + 1
        >>> bool(torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(4))))
        True
    """

    def __init__(self, seed: int | None, per_rank: bool = True) -> None:
        self.seed = seed
        self.per_rank = per_rank
        self.generator: torch.Generator | None = None
        self._pending: Tensor | None = None

    def start(self, device: torch.device, rank: int = 0) -> torch.Generator:
        """Make the generator on ``device``, seeded, or in the state a checkpoint gave."""
        self.generator = torch.Generator(device=device)
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator.manual_seed(seed + (rank if self.per_rank else 0))
        if self._pending is not None:
            self.generator.set_state(self._pending)
            self._pending = None
        return self.generator

    def state_dict(self) -> Tensor | None:
        """The generator's state (``None`` before :meth:`start`)."""
        return None if self.generator is None else self.generator.get_state()

    def load_state_dict(self, state: Tensor | None) -> None:
        """Restore a state now, or when :meth:`start` makes the generator."""
        self._pending = state
        if self.generator is not None and state is not None:
            self.generator.set_state(state)
            self._pending = None
