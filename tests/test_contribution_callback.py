"""NeuronContribution: results equal the library functions, logging and files, other callbacks'
results used when present, no side effects on training, hooks removed, errors."""

from __future__ import annotations

import gc
import warnings
import weakref

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from ddp import run_ranks
from torch import nn

from lightning_neurons import ActivationTracker, NeuronsError, RenderOptions, load_run
from lightning_neurons.ablation import ablation_effects
from lightning_neurons.callbacks._contribution_ablation import cluster_sets
from lightning_neurons.callbacks.contribution import NeuronContribution
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.class_contribution import class_contributions
from lightning_neurons.contribution import neuron_contributions
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.loggers import ARTIFACT_DIRNAME, load_index
from lightning_neurons.models import ImageClassifier
from lightning_neurons.results import NeuronClusteringResult, Rendering

LAYERS = ["backbone.conv1", "backbone.conv2", "backbone.fc"]


def _module(seed: int = 0, net: type[nn.Module] = TinyNet) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(net(), num_classes=3, lr=1e-2)


def _val_batches(data: TinyData, n: int) -> list:
    return [b for _, b in zip(range(n), data.val_dataloader(), strict=False)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs of TinyNet with a tracker and NeuronContribution on every tracked layer."""
    tmp_path = tmp_path_factory.mktemp("fitted")
    model, data = _module(), TinyData()
    contribution = NeuronContribution(
        max_batches=2, ablation_layers=["backbone.conv2", "backbone.fc"], on_error="raise"
    )
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=LAYERS), contribution])
    trainer.fit(model, datamodule=data)
    return model, data, contribution, tmp_path


def test_probes_explain_only_the_highest_logits_beyond_probe_logits(tmp_path, monkeypatch):
    import lightning_neurons.callbacks.contribution as module

    monkeypatch.setattr(module, "PROBE_LOGITS", 2)  # as 1,000 classes with the default 10
    model, data = _module(), TinyData()
    contribution = NeuronContribution(max_batches=2, ablation_layers=[], on_error="raise")
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=LAYERS), contribution])
    trainer.fit(model, datamodule=data)
    res = contribution.results["backbone.fc"]
    probes = res.probes
    with torch.no_grad():
        logits = model.eval()(probes.images)
    assert torch.equal(probes.classes, logits.topk(2, dim=1).indices)
    assert probes.contribution.shape == (3, 2, res.stats.class_contribution.shape[1])
    everything = neuron_contributions(model, ["backbone.fc"], probes.images)["backbone.fc"]
    expected = everything[torch.arange(3).unsqueeze(1), probes.classes]
    # the same float32 passes, batched differently
    torch.testing.assert_close(probes.contribution, expected, atol=1e-5, rtol=1e-4)
    top = probes.top_contribution[:, 0]
    assert torch.equal(top, probes.contribution[:, 0].max(dim=1).values)  # predicted first


def test_probes_go_through_the_model_no_more_rows_at_once_than_a_validation_batch(tmp_path):
    """3 probes x 3 logits are 9 image-logit pairs; with batches of 4 no pass holds more than 4
    rows (the memory of explaining a kept batch), and the probes' contributions are those of
    one pass."""
    model, data = _module(), TinyData(batch_size=4)
    contribution = NeuronContribution(max_batches=2, ablation_layers=[], on_error="raise")
    rows: list[int] = []
    model.backbone.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=LAYERS), contribution])
    trainer.fit(model, datamodule=data)
    probes = contribution.results["backbone.fc"].probes
    assert probes.contribution.shape[:2] == (3, 3)
    assert max(rows) == 4
    whole = neuron_contributions(model, ["backbone.fc"], probes.images, chunk_size=9)
    # the same float32 rows, batched differently
    torch.testing.assert_close(probes.contribution, whole["backbone.fc"], atol=1e-5, rtol=1e-4)


def test_results_equal_the_library_functions_on_the_kept_batches(fitted):
    model, data, contribution, _ = fitted
    assert contribution.layers == LAYERS  # the tracker's layers
    assert contribution.ablation_layers == ["backbone.conv2", "backbone.fc"]
    kept = _val_batches(data, 2)  # max_batches=2 of the 8-image validation batches
    expected = class_contributions(model, LAYERS, kept, top_k=5)
    for layer in LAYERS:
        res = contribution.results[layer]
        assert res.epoch == 1
        assert res.counts.sum() == 16
        torch.testing.assert_close(
            res.class_contribution, expected[layer].class_contribution, atol=1e-5, rtol=1e-4
        )
        assert torch.equal(res.dominant, expected[layer].dominant)
        k = res.class_contribution.shape[1]
        assert res.probes.contribution.shape == (3, 3, k)  # one probe per class, every logit
        assert res.probes.top_neurons.shape == (3, min(5, k))
        assert res.probes.labels.tolist() == [0, 1, 2]
        assert res.top_example_index.shape == (k,) and int(res.top_example_index.max()) < 16
        assert all(s == ["top example"] * min(5, k) for s in res.probes.preferred_source)
    assert contribution.results["backbone.conv1"].ablation is None
    fc = contribution.results["backbone.fc"]
    sets = {
        name: neurons for name, neurons in zip(fc.ablation.sets, fc.ablation.neurons, strict=True)
    }
    again = ablation_effects(model, "backbone.fc", sets, kept)
    for i, name in enumerate(fc.ablation.sets):
        torch.testing.assert_close(fc.ablation.accuracy_drop[i], again[name].accuracy_drop)
    assert fc.ablation.sets == ["class 0 top5", "class 1 top5", "class 2 top5"]
    assert fc.ablation.classes == [0, 1, 2]
    assert fc.ablation.accuracy_drop.shape == (3, 3)
    assert set(fc.ablation.selectivity) == {"own_drop", "other_drop", "difference", "ratio"}


def test_logs_figures_scalars_text_and_files(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, tmp_path = fitted
    log_dir = tmp_path / "tb" / "version_0"
    events = EventAccumulator(
        str(log_dir), size_guidance={"images": 0, "tensors": 0, "histograms": 0}
    ).Reload()
    tags = events.Tags()
    for layer in LAYERS:
        assert f"contribution/{layer}/class_contribution" in tags["images"]
        assert f"contribution/{layer}/probes" in tags["images"]
        assert f"neurons/contribution/{layer}/mean_domination" in tags["scalars"]
    assert "contribution/backbone.fc/ablation" in tags["images"]
    assert "neurons/contribution/backbone.fc/ablation_selectivity/difference" in tags["scalars"]
    assert "contribution/backbone.fc/ablation_own_drop_per_class" in tags["histograms"]
    for layer in LAYERS:
        assert f"contribution/{layer}/domination_per_class" in tags["histograms"]
    # a few headline charts, not one per class: mean domination per layer, ablation selectivity
    contribution_scalars = [t for t in tags["scalars"] if t.startswith("neurons/contribution/")]
    assert len(contribution_scalars) == len(LAYERS) + 3 * 2, contribution_scalars  # 2 ablated
    assert any(
        t.startswith("contribution/backbone.fc/probes") for t in tags["tensors"]
    )  # the text table
    index = load_index(log_dir)
    records = [r for r in index if r["kind"] == "contribution"]
    assert {r["name"] for r in records} == set(LAYERS)
    assert {r["epoch"] for r in records} == {0, 1}
    fc = next(r for r in records if r["name"] == "backbone.fc" and r["epoch"] == 1)
    assert fc["meta"]["ablation_sets"] == ["class 0 top5", "class 1 top5", "class 2 top5"]
    with np.load(log_dir / ARTIFACT_DIRNAME / fc["file"]) as arrays:
        assert arrays["accuracy_drop"].shape == (3, 3)
        assert arrays["class_contribution"].shape == (3, 8)
        assert arrays["probe_contribution"].shape == (3, 3, 8)


def _final_weights(tmp_path, callbacks, net: type[nn.Module] = TinyNet):
    model = _module(0, net)
    fast_trainer(tmp_path, callbacks=callbacks, max_epochs=2).fit(model, datamodule=TinyData())
    return {k: v.clone() for k, v in model.state_dict().items()}, model


def test_no_side_effects_on_training(tmp_path):
    plain, _ = _final_weights(tmp_path / "a", [])
    contribution = NeuronContribution(ablation_layers=LAYERS, on_error="raise")
    analysed, model = _final_weights(tmp_path / "b", [ActivationTracker(), contribution])
    assert contribution.results["backbone.conv1"].ablation.accuracy_drop.shape == (
        3,
        3,
    )  # it did run
    assert plain.keys() == analysed.keys()
    for key in plain:
        assert torch.equal(plain[key], analysed[key]), key
    assert count_forward_hooks(model) == 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


class Exploder(nn.Module):
    """Passes its input through, but fails on batches larger than the validation batch (8), as the
    ablation's repeated batches are: an error in the middle of a hooked forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 8 and not torch.is_grad_enabled():
            raise RuntimeError("exploded mid-forward")
        return x


class ExplodingNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.boom = Exploder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = self.boom(x)
        return self.head(torch.relu(self.fc(self.pool(x).flatten(1))))


def test_a_failing_analysis_warns_leaves_no_hook_and_does_not_change_training(tmp_path):
    plain, _ = _final_weights(tmp_path / "a", [], ExplodingNet)
    contribution = NeuronContribution(ablation_layers=["backbone.conv1"], share_prefix=False)
    with pytest.warns(
        UserWarning, match="neuron contribution analysis failed.*exploded mid-forward"
    ):
        analysed, model = _final_weights(
            tmp_path / "b", [ActivationTracker(), contribution], ExplodingNet
        )
    assert len(contribution.failures) == 2  # both epochs
    assert count_forward_hooks(model) == 0
    for key in plain:
        assert torch.equal(plain[key], analysed[key]), key


def test_a_failing_analysis_raises_with_on_error_raise_and_removes_hooks(tmp_path):
    model = _module(0, ExplodingNet)
    contribution = NeuronContribution(
        ablation_layers=["backbone.conv1"], share_prefix=False, on_error="raise"
    )
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=LAYERS), contribution])
    with pytest.raises(RuntimeError, match="exploded mid-forward"):
        trainer.fit(model, datamodule=TinyData())
    assert count_forward_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())


class FixedClusters(NeuronClustering):
    """A real NeuronClustering whose analysis publishes the given labels for ``backbone.fc``."""

    def __init__(self, labels) -> None:
        super().__init__(enable_logging=False)
        self.fixed = labels

    def _analyse(self, trainer, stats) -> None:
        k = len(self.fixed)
        self.results = {
            "backbone.fc": NeuronClusteringResult(
                layer="backbone.fc",
                epoch=trainer.current_epoch,
                classes=torch.arange(3),
                labels=torch.tensor(self.fixed),
                n_clusters=0,
                cluster_sizes=torch.zeros(0, dtype=torch.int64),
                noise_fraction=0.0,
                cluster_profiles=torch.zeros(0, 3),
                silhouette=float("nan"),
                preferred_class=torch.zeros(k, dtype=torch.int64),
                selectivity=torch.zeros(k),
                features=torch.zeros(k, 3),
            )
        }


class FixedRenders(FeatureVisualizer):
    """A real FeatureVisualizer that publishes renderings of channels 0-7 of ``backbone.fc``
    without rendering."""

    def __init__(self) -> None:
        super().__init__(layers=["backbone.fc"], saliency=(), enable_logging=False)

    def _visualize(self, trainer, pl_module, stats, reduction) -> None:
        images = torch.rand(8, 1, 8, 8)
        self.results = {
            "backbone.fc": Rendering(torch.arange(8), images, torch.zeros(8), trainer.current_epoch)
        }


def test_uses_neuron_clusters_and_rendered_images_when_attached(tmp_path):
    model, data = _module(), TinyData()
    labels = np.array([0, 0, 1, 1, -1, 2, 2, -1])  # two noise neurons
    contribution = NeuronContribution(layers=["backbone.fc"], on_error="raise")
    callbacks = [ActivationTracker(), FixedClusters(labels), FixedRenders(), contribution]
    fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(model, datamodule=data)
    res = contribution.results["backbone.fc"]
    assert res.ablation.sets[3:] == ["cluster 0", "cluster 1", "cluster 2"]
    assert res.ablation.classes == [0, 1, 2, -1, -1, -1]
    assert [n.tolist() for n in res.ablation.neurons[3:]] == [[0, 1], [2, 3], [5, 6]]
    assert res.ablation.accuracy_drop.shape == (6, 3)
    assert all(s == ["rendered"] * 5 for s in res.probes.preferred_source)
    assert res.probes.preferred[0][0].shape == (1, 8, 8)


def _older_cluster_notes(record) -> list[str]:
    return [str(w.message) for w in record if "are NeuronClustering's of epoch" in str(w.message)]


def test_clusters_of_an_earlier_epoch_are_said_and_recorded(tmp_path):
    # clustering every 2 epochs (epoch 1), contributions every epoch: epoch 2 ablates epoch 1's
    clustering = FixedClusters([0, 0, 1, 1, -1, 2, 2, -1])
    clustering.every_n_epochs = 2
    contribution = NeuronContribution(layers=["backbone.fc"], max_batches=1, on_error="raise")
    callbacks = [ActivationTracker(enable_logging=False), clustering, contribution]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=3)
        trainer.fit(_module(), datamodule=TinyData())
    (note,) = _older_cluster_notes(record)
    assert "ablated in epoch 2 are NeuronClustering's of epoch 1" in note
    assert "made at step 12 (it did not analyse this validation, at step 18)" in note
    ablation = contribution.results["backbone.fc"].ablation
    assert (ablation.clusters_epoch, ablation.clusters_step) == (1, 12)
    # the files say so too, and of epoch 1 the clusters made at that validation
    run = load_run(trainer.logger.log_dir)
    for epoch, step in ((1, 12), (2, 12)):
        read = run.results("NeuronContribution", epoch=epoch)["backbone.fc"].ablation
        assert (read.clusters_epoch, read.clusters_step) == (1, step)


def test_a_test_after_fit_ablates_the_fits_last_clusters_without_a_note(tmp_path):
    # the same model (the same global step): Lightning's epoch counter is one past the last epoch
    clustering = FixedClusters([0, 0, 1, 1, -1, 2, 2, -1])
    contribution = NeuronContribution(layers=["backbone.fc"], max_batches=1, on_error="raise")
    callbacks = [ActivationTracker(enable_logging=False), clustering, contribution]
    model, data = _module(), TinyData()
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=2, logger=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
    assert trainer.current_epoch == 2 and clustering.results_step == trainer.global_step
    res = contribution.results["backbone.fc"]
    assert res.epoch == 2 and res.ablation.clusters_epoch == 1  # the test stage's analysis
    assert res.ablation.clusters_step == trainer.global_step == 12
    assert _older_cluster_notes(record) == []


class OtherLayerClusters(FixedClusters):
    """Publishes nothing for the layer that NeuronContribution ablates."""

    def _analyse(self, trainer, stats) -> None:
        super()._analyse(trainer, stats)
        self.results = {"backbone.relu2": self.results["backbone.fc"]}


def test_other_callbacks_without_results_for_the_layer_are_skipped(tmp_path):
    for i, clustering in enumerate(
        [NeuronClustering(enable_logging=False), OtherLayerClusters([0])]
    ):
        contribution = NeuronContribution(
            layers=["backbone.fc"], max_batches=1, max_probes=1, on_error="raise"
        )
        visualizer = FeatureVisualizer(
            layers=["backbone.relu2"],
            saliency=(),
            render=RenderOptions(steps=1),
            enable_logging=False,
        )
        callbacks = [ActivationTracker(enable_logging=False), clustering, visualizer, contribution]
        trainer = fast_trainer(
            tmp_path / str(i),
            callbacks=callbacks,
            max_epochs=1,
            logger=False,
            limit_train_batches=1,
        )
        trainer.fit(_module(), datamodule=TinyData())
        res = contribution.results["backbone.fc"]
        assert res.ablation.sets == ["class 0 top5", "class 1 top5", "class 2 top5"]
        assert res.probes.preferred_source == [["top example"] * 5]


def test_cluster_labels_of_the_wrong_length_warn(tmp_path):
    contribution = NeuronContribution(
        layers=["backbone.fc"], max_batches=1, max_probes=0, enable_logging=False
    )
    callbacks = [
        ActivationTracker(enable_logging=False),
        FixedClusters(np.zeros(3, dtype=np.int64)),
        contribution,
    ]
    with pytest.warns(UserWarning, match="are 3 values.*8 neurons"):
        fast_trainer(
            tmp_path, callbacks=callbacks, max_epochs=1, logger=False, limit_train_batches=1
        ).fit(_module(), datamodule=TinyData())
    assert len(contribution.results["backbone.fc"].ablation.sets) == 3
    assert contribution.results["backbone.fc"].probes is None


def test_cluster_sets():
    sets = cluster_sets(torch.tensor([1, -1, 1, 0]))
    assert list(sets) == ["cluster 0", "cluster 1"]
    assert sets["cluster 1"].tolist() == [0, 2]


def test_every_n_epochs_max_batches_validate_and_test(tmp_path):
    model, data = _module(), TinyData()
    contribution = NeuronContribution(every_n_epochs=2, max_batches=1, enable_logging=False)
    seen = []

    class Spy(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            res = contribution.results.get("backbone.relu2")
            seen.append(None if res is None else res.epoch)

    trainer = fast_trainer(
        tmp_path,
        callbacks=[ActivationTracker(enable_logging=False), contribution, Spy()],
        max_epochs=3,
    )
    trainer.fit(model, datamodule=data)
    assert seen == [None, 1, 1]
    assert contribution.results["backbone.relu2"].counts.sum() == 8  # one batch
    contribution.results = {}
    trainer.validate(model, datamodule=data, verbose=False)
    assert contribution.results["backbone.relu2"].counts.sum() == 8
    contribution.results = {}
    trainer.test(model, datamodule=data, verbose=False)
    assert contribution.results["backbone.relu2"].counts.sum() == 8
    assert count_forward_hooks(model) == 0


def test_no_tracker_is_a_clear_error(tmp_path):
    with pytest.raises(NeuronsError, match="ActivationTracker"):
        fast_trainer(tmp_path, callbacks=[NeuronContribution()]).fit(
            _module(), datamodule=TinyData()
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["backbone.nope"]}, "not found"),
        ({"ablation_layers": ["backbone.nope"]}, "not found"),
    ],
)
def test_unknown_layers_fail_at_setup(tmp_path, kwargs, message):
    with pytest.raises(NeuronsError, match=message):
        fast_trainer(tmp_path, callbacks=[ActivationTracker(), NeuronContribution(**kwargs)]).fit(
            _module(), datamodule=TinyData()
        )


def test_no_ablation_when_ablation_layers_is_empty(tmp_path):
    contribution = NeuronContribution(ablation_layers=[], max_batches=1, enable_logging=False)
    fast_trainer(
        tmp_path,
        callbacks=[ActivationTracker(enable_logging=False), contribution],
        max_epochs=1,
        logger=False,
    ).fit(_module(), datamodule=TinyData())
    assert all(res.ablation is None for res in contribution.results.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batches": 0}, "max_batches"),
        ({"top_k": 0}, "top_k"),
        ({"max_ablation_classes": 0}, "max_ablation_classes"),
        ({"share_prefix": "sometimes"}, "share_prefix"),
        ({"max_probes": -1}, "max_probes"),
        ({"probe_top": 0}, "probe_top"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(NeuronsError, match=message):
        NeuronContribution(**kwargs)


def test_without_tensorboard_it_still_writes_files(tmp_path):
    contribution = NeuronContribution(max_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_trainer(
            tmp_path,
            callbacks=[ActivationTracker(enable_logging=False), contribution],
            max_epochs=1,
            logger=False,
        ).fit(_module(), datamodule=TinyData())
    index = load_index(tmp_path / "neurons" / "run_0")  # no logger: a folder of its own
    # the tracker's default layers: TinyNet's ReLU modules and its torch.relu call
    assert {r["name"] for r in index if r["kind"] == "contribution"} == {
        "backbone.relu1",
        "backbone.relu2",
        "backbone.relu()",
    }


def _fit_digits(rank: int, world_size: int, out) -> dict:
    """A short fit on digits with NeuronContribution; the layers and the accuracy drops' shape."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_neurons.data import DigitsDataModule
    from lightning_neurons.models import SmallCNN

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(widths=(4, 8)), num_classes=10)
    contribution = NeuronContribution(max_batches=2, on_error="raise")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=2,
        logger=TensorBoardLogger(str(out), name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[ActivationTracker(), contribution],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    res = contribution.results.get("backbone.features.relu2")
    drop = None if res is None or res.ablation is None else res.ablation.accuracy_drop
    return {
        "layers": sorted(contribution.results),
        "drop": None if drop is None else list(drop.shape),
    }


@pytest.mark.slow
def test_two_process_ddp_fit_gives_every_rank_the_results_and_rank_zero_writes(tmp_path):
    rank0, rank1 = run_ranks(_fit_digits, 2, tmp_path)
    assert rank0 == {
        "layers": ["backbone.features.relu1", "backbone.features.relu2"],
        "drop": [10, 10],
    }
    assert rank1 == rank0  # each rank analysed its share; the sums were added on every rank
    records = [r for r in load_index(tmp_path / "tb" / "version_0") if r["kind"] == "contribution"]
    assert len(records) == 2  # two layers, written once (by rank zero)


def test_probes_cover_every_class_and_the_table_has_short_columns(tmp_path):
    """Ten classes: one probe per class (the former cap of 8 never showed classes 8 and 9), and a
    table whose headers are short words and whose top neurons have a column each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(num_classes=10), num_classes=10, lr=1e-2)
    contribution = NeuronContribution(
        layers=["backbone.fc"], max_batches=8, ablation_layers=[], on_error="raise"
    )
    trainer = fast_trainer(
        tmp_path, max_epochs=1, callbacks=[ActivationTracker(layers=LAYERS), contribution]
    )
    trainer.fit(model, datamodule=TinyData(n=160, num_classes=10))
    res = contribution.results["backbone.fc"]
    assert res.probes.labels.tolist() == list(range(10))
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"tensors": 0}).Reload()
    tag = next(
        t for t in events.Tags()["tensors"] if t.startswith("contribution/backbone.fc/probes")
    )
    table = events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| # | true | pred | top 1 | top 2 | top 3 | top 4 | top 5 |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert [r[1] for r in rows] == [str(c) for c in range(10)]
    assert all(len(r) == 8 for r in rows)
    assert rows[0][3].startswith(f"n{int(res.probes.top_neurons[0, 0])} ")


def test_the_last_epochs_results_are_released_before_the_next_analysis(tmp_path, monkeypatch):
    """Three [C, K] float32 tables a layer stay on the host for the whole fit: the last epoch's
    are let go when the next analysis starts, so that two epochs' never coexist."""
    model, data = _module(), TinyData()
    contribution = NeuronContribution(max_batches=1, enable_logging=False, on_error="raise")
    earlier: list[weakref.ref] = []
    alive_at_start: list[bool] = []
    contributions = NeuronContribution._contributions

    def spied(self, *args, **kwargs):
        gc.collect()
        alive_at_start.append(any(ref() is not None for ref in earlier))
        shared = contributions(self, *args, **kwargs)
        if shared is not None:
            earlier.extend(weakref.ref(s.class_contribution) for s in shared[0].values())
        return shared

    monkeypatch.setattr(NeuronContribution, "_contributions", spied)
    trainer = fast_trainer(
        tmp_path, callbacks=[ActivationTracker(enable_logging=False), contribution], max_epochs=3
    )
    trainer.fit(model, datamodule=data)
    assert alive_at_start == [False, False, False]
    assert len(earlier) == 3 * len(contribution.results) > 0
    last = contribution.results[list(contribution.results)[-1]]
    assert earlier[-1]() is last.stats.class_contribution


def test_each_neurons_top_example_is_the_kept_image_it_is_largest_on(fitted):
    """``top_example_index``: per neuron, the first kept image with its largest activation."""
    from lightning_neurons.contribution import contribution_batch

    model, data, contribution, _ = fitted
    kept = _val_batches(data, 2)
    training = model.training
    model.eval()  # as the analysis runs it
    acts = [contribution_batch(model, LAYERS, x, y).activations for x, y in kept]
    model.train(training)
    for layer in LAYERS:
        every = torch.cat([a[layer].detach().float() for a in acts])  # [16 images, K]
        expected = every.argmax(dim=0)
        got = contribution.results[layer].top_example_index
        # the same neuron's value at both indices (a tie may be broken either way)
        assert torch.equal(every.gather(0, got.unsqueeze(0)), every.gather(0, expected[None]))


def test_probe_images_are_shown_as_the_data_shows_them():
    """The probes and their top examples are model inputs: the grid shows them through the data's
    input transform (normalised inputs through Normalize's inverse); rendered images are shown as
    they are."""
    from lightning_neurons.callbacks._contribution_log import _display
    from lightning_neurons.data import Normalize
    from lightning_neurons.results import Probes

    norm = Normalize((0.5,), (0.25,))
    display = torch.rand(2, 1, 4, 4)
    rendered = torch.rand(1, 4, 4)
    zeros = torch.zeros(2, 1)
    probes = Probes(
        index=torch.arange(2),
        images=norm(display),
        labels=torch.tensor([0, 1]),
        predictions=torch.tensor([0, 1]),
        contribution=zeros,
        classes=zeros,
        top_neurons=torch.zeros(2, 1, dtype=torch.long),
        top_contribution=zeros,
        preferred=[[rendered], [norm(display)[0]]],
        preferred_source=[["rendered"], ["top example"]],
    )
    shown, preferred = _display(probes, norm)
    # (d - m) / s * s + m in float32: a few ulps of values <= 1
    torch.testing.assert_close(shown, display, atol=1e-6, rtol=0)
    assert preferred[0][0] is rendered
    torch.testing.assert_close(preferred[1][0], display[0], atol=1e-6, rtol=0)
    shown, _ = _display(probes, None)  # no transform: the inputs are display images
    assert torch.equal(shown, probes.images)
