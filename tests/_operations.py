"""A record of the torch operations a block dispatches: on a GPU each is a kernel launch."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class Operations(TorchDispatchMode):
    """Records the name of every operation dispatched inside it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def counts(self) -> Counter[str]:
        """How many operations of each name ran."""
        return Counter(self.names)
