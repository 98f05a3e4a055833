"""Small host tensors used at every step on the model's device, copied there once.

A rendering step indexes each layer's output with row and channel indices, weights its terms,
mixes colours with a fixed matrix: small tensors made on the host. On a GPU, ``t.to(device)`` of
a tensor in ordinary (pageable) host memory copies and then waits for the device to finish
everything queued before the copy, so an index moved at every step and layer makes the host
wait dozens of times a step, and the device idles while the host queues the next operations.
:class:`DeviceCopies` keeps one copy per device and type, made the first time it is asked for.

On the CPU ``t.to("cpu")`` returns ``t`` itself: the copies cost nothing there, and nothing
shows the waits; ``tests/test_device_copies.py`` counts the copies on the ``meta`` device.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceCopies"]


class DeviceCopies:
    """``tensor`` on each device (and in each floating type) it is used with, copied once.

    Example:
        >>> rows = DeviceCopies(torch.tensor([0, 2]))
        >>> out = torch.rand(3, 4)
        >>> out.index_select(0, rows.on(out.device)).shape
        torch.Size([2, 4])
        >>> rows.like(out).dtype  # in out's type and on its device
        torch.float32
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        """The tensor on ``device``, in its own type."""
        return self._copy(device, self.tensor.dtype)

    def like(self, other: torch.Tensor) -> torch.Tensor:
        """The tensor on ``other``'s device and in its type (``tensor.to(other)``)."""
        return self._copy(other.device, other.dtype)

    def _copy(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.tensor.to(device, dtype)
        return copy
