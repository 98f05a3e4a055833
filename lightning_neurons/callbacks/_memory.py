"""FeatureVisualizer's continuation memory: the parameters of the last round's images, so the
next round continues them instead of starting from noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: A cluster continues the image of the last round's cluster it shares at least this share of
#: neurons with (Jaccard index); else its image starts from noise.
CLUSTER_MATCH = 0.5

#: What a rendering's parameters were made for: parameterization, image shape, objectives,
#: images per objective, seed. Parameters are continued only for the same signature.
Signature = tuple[Any, ...]


@dataclass(frozen=True)
class SavedImages:
    """The parameters of one rendering's kept images (one row per image).

    Attributes:
        signature: What they were rendered for.
        params: ``[N, ...]`` parameters, on the CPU or the model's device.
        members: For cluster images: each cluster's channels (``None`` otherwise).
    """

    signature: Signature
    params: torch.Tensor
    members: list[list[int]] | None = None


class ContinuationMemory:
    """Per rendering (a layer, ``"classes"``, ``"clusters/<layer>"``), the parameters of its
    latest images; kept in the callback's ``state_dict`` so a resumed run continues them.

    Args:
        enabled: ``False``: nothing is kept and every rendering starts from noise.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._saved: dict[str, SavedImages] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._saved

    def start(self, key: str, signature: Signature) -> torch.Tensor | None:
        """The parameters to continue ``key``'s images from: the saved ones when they were
        rendered for ``signature``, else ``None`` (start from noise)."""
        saved = self._saved.get(key)
        if not self.enabled or saved is None or tuple(saved.signature) != signature:
            return None
        return saved.params

    def keep(
        self,
        key: str,
        signature: Signature,
        params: torch.Tensor,
        members: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Remember ``key``'s latest parameters (nothing when disabled)."""
        if self.enabled:
            kept = None if members is None else [list(m) for m in members]
            self._saved[key] = SavedImages(signature, params, kept)

    def match_clusters(
        self, key: str, signature: Signature, members: Sequence[Sequence[int]], n_images: int
    ) -> list[torch.Tensor | None]:
        """For each cluster (its channels), the parameters of the last round's cluster it shares
        most neurons with (Jaccard index >= :data:`CLUSTER_MATCH`), ``n_images`` rows; ``None``:
        no such cluster (start from noise)."""
        saved = self._saved.get(key)
        found: list[torch.Tensor | None] = [None] * len(members)
        if self.start(key, signature) is None or saved is None or not saved.members:
            return found
        before = [set(m) for m in saved.members]
        for i, m in enumerate(members):
            overlap = [len(set(m) & b) / len(set(m) | b) for b in before]
            best = max(range(len(before)), key=overlap.__getitem__)
            if overlap[best] >= CLUSTER_MATCH:
                found[i] = saved.params[best * n_images : (best + 1) * n_images]
        return found

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{key: {"signature", "params", ["members"]}}``, the parameters cloned."""
        state = {}
        for key, saved in self._saved.items():
            entry: dict[str, Any] = {"signature": saved.signature, "params": saved.params.clone()}
            if saved.members is not None:
                entry["members"] = [list(m) for m in saved.members]
            state[key] = entry
        return state

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Take the parameters of :meth:`state_dict` (from a checkpoint)."""
        self._saved = {
            key: SavedImages(tuple(entry["signature"]), entry["params"], entry.get("members"))
            for key, entry in state.items()
        }
