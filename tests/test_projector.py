"""The projector's files: readable labels, layer-qualified clusters, crops, newest first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _operations import Operations
from torch import nn

from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.projector import (
    HEADER,
    neuron_metadata,
    read_config,
    short_names,
    sprite,
    top_activating_crops,
    write_embedding,
)
from lightning_neurons.results import NeuronClusteringResult


def _result(labels: list[int], layer: str = "net.relu3", epoch: int = 2) -> NeuronClusteringResult:
    k = len(labels)
    ids = torch.tensor(labels)
    return NeuronClusteringResult(
        layer=layer,
        epoch=epoch,
        classes=torch.arange(3),
        labels=ids,
        n_clusters=max(labels) + 1,
        cluster_sizes=torch.bincount(ids[ids >= 0]),
        noise_fraction=float((ids < 0).double().mean()),
        cluster_profiles=torch.zeros(max(labels) + 1, 3),
        silhouette=float("nan"),
        preferred_class=torch.arange(k) % 3,
        selectivity=torch.linspace(0, 1, k),
        features=torch.zeros(k, 3),
    )


def test_short_names_are_unique_suffixes():
    assert short_names(["a.features.relu1", "a.features.relu2"]) == {
        "a.features.relu1": "relu1",
        "a.features.relu2": "relu2",
    }
    assert short_names(["layer1.0.relu", "layer2.0.relu", "fc"]) == {
        "layer1.0.relu": "layer1.0.relu",
        "layer2.0.relu": "layer2.0.relu",
        "fc": "fc",
    }
    assert short_names(["relu#1", "x.relu#1"]) == {"relu#1": "relu#1", "x.relu#1": "x.relu#1"}


def test_metadata_labels_are_unique_and_clusters_qualified_by_layer():
    rows2 = neuron_metadata("relu2", _result([0, 1, -1, 1]), range(4), ["zero", "one", "two"])
    rows3 = neuron_metadata("relu3", _result([1, 0, 0, -1]), range(4), ["zero", "one", "two"])
    assert [r[0] for r in rows2 + rows3] == [f"relu{n}/{k}" for n in (2, 3) for k in range(4)]
    assert [r[1] for r in rows2] == ["relu2 c0", "relu2 c1", "relu2 unclustered", "relu2 c1"]
    assert {r[1] for r in rows2} & {r[1] for r in rows3} == set()  # cluster 1 of two layers
    assert [r[2] for r in rows2] == ["zero", "one", "two", "zero"]
    assert len(rows2[0]) == len(HEADER)


class _Spots(nn.Module):
    """Channel k fires (value 1) only where the input pixel equals k + 1; channel 3 never."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = torch.tensor([1.0, 2.0, 3.0, 99.0]).view(1, 4, 1, 1)
        return self.relu(1 - (x - levels).abs())


def test_crops_are_centred_on_the_strongest_response_and_dead_neurons_crossed():
    x = torch.zeros(3, 1, 16, 16)
    x[1, 0, 2, 13] = 1.0  # channel 0: image 1, row 2, column 13
    x[2, 0, 9, 4] = 2.0  # channel 1: image 2, row 9, column 4
    x[0, 0, 15, 0] = 3.0  # channel 2: image 0, bottom-left corner
    model = _Spots()
    crops = top_activating_crops(model, ["relu"], [x[:2], x[2:]], size=8)["relu"]
    assert crops.shape == (4, 1, 8, 8)
    assert count_forward_hooks(model) == 0
    # full-resolution layer: an 8-pixel window (half the side), clamped inside the image; the
    # inputs exceed [0, 1], so all are divided by their maximum, 3
    shown = x / 3
    expected = {
        0: shown[1, :, 0:8, 8:16],
        1: shown[2, :, 5:13, 0:8],
        2: shown[0, :, 8:16, 0:8],
    }
    for k, window in expected.items():
        torch.testing.assert_close(crops[k], window, atol=1e-6, rtol=0, msg=str(k))
    assert crops[3].std() > 0 and crops[3].min() < 0.2  # never fired: the crossed tile


def test_sprite_is_a_square_grid_row_by_row():
    tiles = torch.stack([torch.full((1, 2, 2), v / 5) for v in range(5)])
    sheet = sprite(tiles)
    assert sheet.shape == (6, 6, 3)  # 3 x 3 tiles for 5 images
    assert sheet[0, 2, 0] == round(255 / 5) and sheet[2, 0, 0] == round(3 * 255 / 5)
    assert sheet[4, 4, 0] == 0  # the unused tiles


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_sprite_draws_the_pixels_torch_drew(channels):
    # the sprite was drawn with torch operations (on a writer thread: see sprite's docstring)
    tiles = torch.rand(7, channels, 5, 5, generator=torch.Generator().manual_seed(channels))
    grid = torch.zeros(9, 3, 5, 5)
    # grey; magenta and green; RGB; the first three of more
    rgb = {1: [0, 0, 0], 2: [0, 1, 0]}.get(channels, [0, 1, 2])
    grid[:7] = torch.stack([tiles[:, c] for c in rgb], dim=1)
    grid = grid.view(3, 3, 3, 5, 5).permute(0, 3, 1, 4, 2).reshape(15, 15, 3)
    expected = (grid * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(sprite(tiles), expected)
    assert np.array_equal(sprite(tiles.numpy()), expected)


def test_the_projector_files_are_written_without_torch_operations(tmp_path):
    """They are written on a writer thread: a torch operation there starts an OpenMP team of
    that thread's own, which slows every later torch operation of the process."""
    # the arrays log_neuron_projector hands them, large enough for torch to split its loops
    tiles = torch.rand(300, 3, 8, 8).numpy()
    rows = [[f"relu3/{i}", "relu3 c0", "1", "0.5"] for i in range(300)]
    features = np.random.default_rng(0).normal(size=(300, 4))
    with Operations() as ops:
        write_embedding(tmp_path, "relu3, epoch 0", "projector/relu3", features, rows, tiles)
    assert ops.names == []
    assert (tmp_path / "projector/relu3/sprite.png").exists()


def test_the_latest_epoch_replaces_the_layer_and_other_entries_are_kept(tmp_path):
    (tmp_path / "projector_config.pbtxt").write_text(
        'embeddings {\n  tensor_name: "mine"\n  tensor_path: "mine.tsv"\n}\n'
    )
    rows = [["relu3/0", "relu3 c0", "1", "0.5"], ["relu3/1", "relu3 c0", "2", "0.1"]]
    tiles = torch.rand(2, 1, 4, 4)
    for epoch in (0, 1):
        for layer in ("relu2", "relu3"):
            write_embedding(
                tmp_path, f"{layer}, epoch {epoch}", f"p/{epoch}/{layer}", np.eye(2), rows, tiles,
                replaces=f"{layer}, epoch ",
            )  # fmt: skip
    names = [e.tensor_name for e in read_config(tmp_path).embeddings]
    assert names == ["relu3, epoch 1", "relu2, epoch 1", "mine"]
    assert (tmp_path / "p/0/relu3/tensors.tsv").is_file()  # older epochs stay on disk
    header = (tmp_path / "p/1/relu3/metadata.tsv").read_text().splitlines()[0]
    assert header.split("\t") == list(HEADER)
    with pytest.raises(ValueError, match="3 feature rows, 2 metadata rows"):
        write_embedding(tmp_path, "bad", "p/bad", np.eye(3), rows, None)


def test_the_writes_of_an_epoch_wait_for_those_of_the_epochs_before():
    """Writer threads may start the epochs' writes in any order: each waits for its turn, so
    the config ends listing the latest epoch of each layer."""
    import threading

    from lightning_neurons.projector import _InTurn

    turns, done = _InTurn(), []
    first, second = turns.ticket(), turns.ticket()
    late = threading.Thread(target=turns.run, args=(second, [lambda: done.append("second")]))
    late.start()
    late.join(timeout=0.2)
    assert late.is_alive() and done == []  # waiting for the first epoch's writes
    turns.run(first, [lambda: done.append("first")])
    late.join(timeout=10)
    assert done == ["first", "second"] and not late.is_alive()
