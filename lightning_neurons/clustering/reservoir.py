"""A fixed-size uniform sample of per-image activations (reservoir sampling), for neuron
clustering on individual images rather than class means, with bounded memory."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_neurons.errors import NeuronsError


class ActivationReservoir:
    """A uniform random sample of at most ``size`` per-image activation rows (reservoir sampling).

    Memory is ``size x num_neurons`` float32 however many images pass through: use it to cluster
    neurons on individual images (``NeuronClusterer().fit(reservoir.values)``) when class means
    hide structure, or to get a class profile from a sample.

    Args:
        size: Rows kept.
        seed: Seed of the reservoir's own ``torch.Generator`` (the global RNG is not touched).

    Attributes:
        seen: Rows offered so far.

    Raises:
        NeuronsError: For a non-positive ``size``, and in :meth:`update` for rows whose width
            changes or labels whose length does not match.

    Example:
        >>> res = ActivationReservoir(size=100, seed=0)
        >>> for _ in range(10):
        ...     res.update(torch.rand(32, 8), torch.randint(0, 3, (32,)))
        >>> res.values.shape, res.seen
        (torch.Size([100, 8]), 320)
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise NeuronsError(f"`size` must be a positive integer, got {size!r}")
        self.size = size
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Empty the reservoir and restart its random stream."""
        self.seen = 0
        self._generator = torch.Generator().manual_seed(int(self.seed))
        self._values: torch.Tensor | None = None
        self._labels = torch.full((self.size,), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return min(self.seen, self.size)

    @property
    def values(self) -> torch.Tensor:
        """``[min(seen, size), num_neurons]`` float32 sampled rows."""
        if self._values is None:
            return torch.zeros(0, 0)
        return self._values[: len(self)]

    @property
    def labels(self) -> torch.Tensor:
        """``[min(seen, size)]`` the class labels of the sampled rows (-1 when none were given)."""
        return self._labels[: len(self)]

    @torch.no_grad()
    def update(self, values: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Offer a batch of rows; each row seen so far is kept with probability ``size / seen``.

        Args:
            values: ``[B, K]`` activations (one row per image).
            labels: Optional ``[B]`` class labels.
        """
        if values.dim() != 2:
            raise NeuronsError(
                f"`values` must be [batch, neurons]; got shape {tuple(values.shape)}"
            )
        values = values.detach().to("cpu", torch.float32)
        batch, width = values.shape
        if labels is not None:
            labels = labels.detach().to("cpu", torch.int64).reshape(-1)
            if labels.numel() != batch:
                raise NeuronsError(f"got {labels.numel()} labels for {batch} rows of `values`")
        if self._values is None:
            self._values = torch.zeros(self.size, width, dtype=torch.float32)
        elif width != self._values.shape[1]:
            raise NeuronsError(
                f"rows have {width} values but the reservoir holds rows of {self._values.shape[1]}; "
                "use one reservoir per layer"
            )
        index = torch.arange(self.seen, self.seen + batch)
        # Algorithm R: row t goes to slot t while there is room, else to a random slot j <= t,
        # kept when j < size. Draws come from the reservoir's own generator.
        draws = (
            torch.rand(batch, generator=self._generator, dtype=torch.float64) * (index + 1)
        ).long()
        slots = torch.where(index < self.size, index, draws)
        keep = torch.nonzero(slots < self.size).flatten()
        if keep.numel():
            slots, rows = slots[keep], keep
            # A later row replaces an earlier one in the same slot, as in the sequential algorithm.
            last = {int(s): int(r) for s, r in zip(slots.tolist(), rows.tolist(), strict=True)}
            target = torch.tensor(list(last.keys()), dtype=torch.int64)
            source = torch.tensor(list(last.values()), dtype=torch.int64)
            self._values[target] = values[source]
            if labels is not None:
                self._labels[target] = labels[source]
        self.seen += batch

    def class_profile(self, num_classes: int) -> torch.Tensor:
        """``[num_classes, K]`` mean sampled row per class (NaN for classes without a row)."""
        labels, values = self.labels, self.values
        sums = torch.zeros(num_classes, values.shape[1], dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.float64)
        ok = (labels >= 0) & (labels < num_classes)
        sums.index_add_(0, labels[ok], values[ok].double())
        counts.index_add_(0, labels[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
        means = sums / counts.clamp_min(1).unsqueeze(1)
        means[counts == 0] = math.nan
        return means

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, for checkpoints."""
        return {
            "seen": self.seen,
            "values": None if self._values is None else self._values.clone(),
            "labels": self._labels.clone(),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.seen = int(state.get("seen", 0))
        values = state.get("values")
        self._values = None if values is None else values.clone()
        labels = state.get("labels")
        if labels is not None and labels.numel() == self.size:
            self._labels = labels.clone()
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
