"""CategoryClustering and NeuronClustering: results on the parts data set, logging, errors,
no side effects on training, and hook hygiene."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from ddp import run_ranks
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.metrics import adjusted_rand_score

from lightning_neurons import ActivationTracker, CategoryClustering, NeuronClustering, NeuronsError
from lightning_neurons.callbacks.category_clustering import COMBINED, distance_confusion_agreement
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.loggers import load_index
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.parts import CLASS_GROUPS, CLASS_NAMES, PartsDataModule
from lightning_neurons.plots.clustering import cut_threshold
from lightning_neurons.projector import short_names

PARTS_LAYERS = ["backbone.features.conv2", "backbone.features.conv3"]
PARTS_EPOCHS = 8


def _tiny(seed: int = 0, num_classes: int = 3) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(TinyNet(num_classes=num_classes), num_classes=num_classes, lr=1e-2)


def _scalar_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]) | set(tags["images"]) | set(tags["tensors"])


# ---- a small CNN trained on the parts data set (shared by several tests) ----------------------


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory):
    """SmallCNN (16-32-64) trained 8 epochs on 100 parts images per class, with both callbacks
    analysing every 4th epoch."""
    tmp = tmp_path_factory.mktemp("parts")
    pl.seed_everything(0, verbose=False)
    # one-cycle: a constant lr ended at 50-93% validation accuracy depending on the CPU kernels
    model = ImageClassifier(
        SmallCNN(num_classes=12, widths=(16, 32, 64)), num_classes=12, lr=1e-2, schedule="onecycle"
    )
    data = PartsDataModule(batch_size=32, n_per_class=100, seed=0)
    # Analysed after epochs 4 and 8 (twice, so that stability across analyses is measured).
    category = CategoryClustering(every_n_epochs=4, views="all", on_error="raise")
    neurons = NeuronClustering(every_n_epochs=4, on_error="raise")
    trainer = fast_trainer(
        tmp,
        max_epochs=PARTS_EPOCHS,
        callbacks=[ActivationTracker(layers=PARTS_LAYERS), category, neurons],
    )
    hooks_before = count_forward_hooks(model)
    trainer.fit(model, datamodule=data)
    return {
        "trainer": trainer,
        "model": model,
        "data": data,
        "category": category,
        "neurons": neurons,
        "hooks_before": hooks_before,
        "accuracy": float(trainer.callback_metrics["val/acc"]),
    }


def _null_ari_quantile(q: float, draws: int = 2000) -> float:
    """ARI of random assignments of the 12 classes to 4 groups of 3 (the chance level)."""
    rng = np.random.default_rng(0)
    truth = np.array(CLASS_GROUPS)
    scores = [adjusted_rand_score(truth, rng.permutation(truth)) for _ in range(draws)]
    return float(np.quantile(scores, q))


def test_category_clustering_groups_classes_that_share_parts(parts_run):
    """Classes sharing their two large parts cluster together far above chance.

    Chance: a random grouping of the 12 classes into 4 groups of 3 has ARI 0 on average and
    0.59 at its 99.9th percentile (one group right, the others shuffled). We require ARI >= 0.9
    for the combined view and >= 0.75 for each layer (one class misplaced gives 0.75-0.89). The
    measured figure for this seed is ARI 1.0 (the exact grouping) for conv2, conv3 and their
    combination, at 98.8-99.6% validation accuracy with one thread and the default, AVX2 and
    AVX-512 kernels (benchmarks/representation_study.py: 1.0 in
    3 of 3 seeds for conv2, conv3 and their combination with mean-reduced activations).
    """
    results = parts_run["category"].results
    assert set(results) == {*PARTS_LAYERS, COMBINED}
    chance = _null_ari_quantile(0.999)
    assert chance < 0.75
    aris = {view: adjusted_rand_score(CLASS_GROUPS, res.labels) for view, res in results.items()}
    assert aris[COMBINED] >= 0.9, aris
    assert min(aris.values()) >= 0.75, aris
    assert parts_run["accuracy"] > 0.9  # a trained model (measured 0.988-0.996)
    combined = results[COMBINED]
    assert combined.n_clusters == 4 and combined.silhouette > 0.2
    assert combined.class_names == CLASS_NAMES and combined.epoch == PARTS_EPOCHS - 1
    # the confusion matrix covers every validation image once
    assert combined.confusion.sum() == len(parts_run["data"].val_set)
    print(f"parts: ARI {aris}, chance 99.9% {chance:.2f}, accuracy {parts_run['accuracy']:.3f}")


def test_confusion_matrix_matches_the_models_predictions(parts_run):
    model, data = parts_run["model"], parts_run["data"]
    category = CategoryClustering(layers=PARTS_LAYERS[-1:], combine_layers=False)
    trainer = fast_trainer(
        parts_run["trainer"].default_root_dir,
        logger=False,
        callbacks=[ActivationTracker(layers=PARTS_LAYERS[-1:]), category],
    )
    trainer.validate(model, datamodule=data, verbose=False)
    expected = np.zeros((12, 12))
    model.eval()
    with torch.no_grad():
        for x, y in data.val_dataloader():
            np.add.at(expected, (y.numpy(), model(x).argmax(1).numpy()), 1)
    assert np.array_equal(category.results[PARTS_LAYERS[-1]].confusion.numpy(), expected)
    assert count_forward_hooks(model) == parts_run["hooks_before"]


def test_neuron_clustering_results(parts_run):
    results = parts_run["neurons"].results
    assert set(results) == set(PARTS_LAYERS)
    conv3 = results["backbone.features.conv3"]
    assert conv3.labels.shape == (64,) and conv3.labels.min() >= -1
    assert conv3.n_clusters >= 2
    assert conv3.cluster_sizes.sum() + (conv3.labels < 0).sum() == 64
    assert conv3.cluster_profiles.shape == (conv3.n_clusters, 12)
    assert 0.0 <= conv3.noise_fraction < 1.0
    assert np.isfinite(conv3.stability) and -1.0 <= conv3.stability <= 1.0
    # neurons in one cluster share a tuning: their cluster's profile is its members' average
    for c in range(conv3.n_clusters):
        members = conv3.features[conv3.labels == c]
        torch.testing.assert_close(members.mean(dim=0), conv3.cluster_profiles[c])


def test_results_hold_cpu_tensors_as_results_py_documents(parts_run):
    """Every array field of both result types is a CPU tensor (results.py's contract)."""
    from dataclasses import fields

    entries = [*parts_run["category"].results.values(), *parts_run["neurons"].results.values()]
    for res in entries:
        for f in fields(res):
            value = getattr(res, f.name)
            assert not isinstance(value, np.ndarray), (type(res).__name__, f.name)
            if isinstance(value, torch.Tensor):
                assert value.device.type == "cpu", f.name
        arrays = res.as_arrays()  # the numbers as tensors; class names are strings
        assert all(isinstance(v, torch.Tensor) for k, v in arrays.items() if k != "class_names")


def test_everything_is_logged_and_written(parts_run):
    trainer = parts_run["trainer"]
    log_dir = trainer.logger.log_dir
    tags = _scalar_tags(log_dir)
    for view in (*PARTS_LAYERS, COMBINED):
        assert f"category_clustering/{view}/dendrogram" in tags
        assert f"category_clustering/{view}/distance_vs_confusion" in tags
        assert f"neurons/category_clustering/{view}/silhouette" in tags
        assert f"neurons/category_clustering/{view}/stability" in tags
    for layer in PARTS_LAYERS:
        assert f"neuron_clustering/{layer}/cluster_profiles" in tags
        assert f"neurons/neuron_clustering/{layer}/n_clusters" in tags
        assert f"neurons/neuron_clustering/{layer}/stability" in tags
    assert any(t.startswith("category_clustering/combined/assignments") for t in tags)
    root = trainer.logger.log_dir + "/neurons"
    index = load_index(root)
    kinds = {(r["kind"], r["name"], r["epoch"]) for r in index}
    last = PARTS_EPOCHS - 1
    assert ("category_clustering", COMBINED, last) in kinds
    assert ("neuron_clustering", "backbone.features.conv3", last) in kinds
    saved = np.load(f"{root}/fit/category_clustering/epoch={last:03d}/{COMBINED}.npz")
    assert np.array_equal(saved["labels"], parts_run["category"].results[COMBINED].labels)
    assignments = json.loads(
        Path(f"{root}/fit/category_clustering/epoch={last:03d}/assignments.json").read_text()
    )
    assert set(assignments[COMBINED]) == set(CLASS_NAMES)
    # the embedding projector: one embedding per layer, its latest epoch, labelled layer/neuron
    # with layer-qualified clusters, every point with an image
    from lightning_neurons.projector import HEADER, read_config

    config = read_config(Path(log_dir))
    shorts = short_names(PARTS_LAYERS)
    expected = [f"{shorts[layer]}, epoch {last}" for layer in PARTS_LAYERS]
    assert [e.tensor_name for e in config.embeddings] == expected
    assert (Path(log_dir) / "projector/neuron_clustering/epoch=003").is_dir()  # the first analysis
    for entry, layer in zip(config.embeddings, PARTS_LAYERS, strict=True):
        lines = (Path(log_dir) / entry.metadata_path).read_text().strip().split("\n")
        assert lines[0].split("\t") == list(HEADER)
        rows = [line.split("\t") for line in lines[1:]]
        res = parts_run["neurons"].results[layer]
        assert len(rows) == res.labels.shape[0]
        assert [r[0] for r in rows] == [f"{shorts[layer]}/{k}" for k in range(len(rows))]
        assert {r[1] for r in rows} == {
            f"{shorts[layer]} c{c}" if c >= 0 else f"{shorts[layer]} unclustered"
            for c in res.labels.tolist()
        }
        tensors = np.loadtxt(Path(log_dir) / entry.tensor_path, delimiter="\t", ndmin=2)
        assert tensors.shape == (len(rows), len(res.classes))
        assert (Path(log_dir) / entry.sprite.image_path).is_file()


def test_hooks_are_gone_after_fit(parts_run):
    assert count_forward_hooks(parts_run["model"]) == parts_run["hooks_before"]


# ---- no side effects, hooks, errors (tiny model) ----------------------------------------------


def _final_weights(tmp_path, callbacks) -> dict[str, torch.Tensor]:
    model = _tiny(num_classes=6)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(model, TinyData(n=96, num_classes=6))
    assert count_forward_hooks(model) == 0
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_no_side_effects_on_training(tmp_path):
    plain = _final_weights(tmp_path / "a", [])
    analysed = _final_weights(
        tmp_path / "b",
        [
            ActivationTracker(),
            CategoryClustering(on_error="raise"),
            NeuronClustering(on_error="raise", min_cluster_size=2),
            NeuronClustering(source="reservoir", method="kmeans", n_clusters=2, on_error="raise"),
        ],
    )
    assert plain.keys() == analysed.keys()
    for key in plain:
        assert torch.equal(plain[key], analysed[key]), key


class _Boom(pl.Callback):
    """Fails in the middle of the second validation batch of the first epoch."""

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if batch_idx == 1:
            raise RuntimeError("boom")


def test_hooks_are_removed_when_training_fails(tmp_path):
    model = _tiny()
    callbacks = [
        ActivationTracker(),
        CategoryClustering(),
        NeuronClustering(source="reservoir", method="kmeans", n_clusters=2),
        _Boom(),
    ]
    with pytest.raises(RuntimeError, match="boom"):
        fast_trainer(tmp_path, callbacks=callbacks).fit(model, TinyData())
    assert count_forward_hooks(model) == 0


def test_validate_and_test_analyse_and_remove_hooks(tmp_path):
    model, data = _tiny(num_classes=6), TinyData(n=96, num_classes=6)
    category = CategoryClustering(n_clusters=2, on_error="raise")
    neurons = NeuronClustering(method="kmeans", n_clusters=2, source="reservoir", on_error="raise")
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), category, neurons])
    trainer.validate(model, data, verbose=False)
    assert count_forward_hooks(model) == 0
    assert category.results[COMBINED].n_clusters == 2
    assert category.results[COMBINED].confusion.sum() == 48
    # the default layers: TinyNet's ReLU modules and its torch.relu call
    assert set(neurons.results) == {"backbone.relu1", "backbone.relu2", "backbone.relu()"}
    category.results = {}
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(stage="test"), category])
    trainer.test(model, data, verbose=False)
    assert count_forward_hooks(model) == 0 and category.results


def test_train_stage_tracker_is_followed(tmp_path):
    model = _tiny(num_classes=6)
    category = CategoryClustering(layers=["backbone.relu2"], n_clusters=2, on_error="raise")
    trainer = fast_trainer(
        tmp_path, max_epochs=1, logger=False, callbacks=[ActivationTracker(stage="train"), category]
    )
    trainer.fit(model, TinyData(n=96, num_classes=6))
    res = category.results["backbone.relu2"]
    assert res.confusion.sum() == 96  # the training images
    assert set(category.results) == {"backbone.relu2"}  # one layer: no combined view


def test_every_n_epochs_and_no_tensorboard(tmp_path):
    model = _tiny(num_classes=6)
    category = CategoryClustering(every_n_epochs=2, n_clusters=3, on_error="raise")
    trainer = fast_trainer(
        tmp_path, max_epochs=3, logger=False, callbacks=[ActivationTracker(), category]
    )
    trainer.fit(model, TinyData(n=96, num_classes=6))
    assert {r.epoch for r in category.results.values()} == {1}
    assert not np.isfinite(category.results[COMBINED].stability)  # analysed once only


def test_a_failing_analysis_warns_and_training_goes_on(tmp_path):
    # Images of two of the three classes cannot be grouped: the analysis fails, training goes on.
    model = _tiny(num_classes=3)
    category = CategoryClustering()
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[ActivationTracker(), category])
    with pytest.warns(UserWarning, match="category clustering of view .* failed"):
        trainer.fit(model, TinyData(num_classes=2))
    assert trainer.current_epoch == 1 and category.failures
    assert "only 2 of 3 classes have statistics" in category.failures[0]
    strict = CategoryClustering(on_error="raise")
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[ActivationTracker(), strict])
    with pytest.raises(NeuronsError, match="at least 3 classes"):
        trainer.fit(_tiny(num_classes=3), TinyData(num_classes=2))


def test_a_model_of_two_classes_is_told_at_set_up_that_categories_need_three(tmp_path):
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), CategoryClustering()])
    with pytest.raises(NeuronsError, match="needs 3 classes or more, and the model predicts 2"):
        trainer.fit(_tiny(num_classes=2), TinyData(num_classes=2))
    assert trainer.global_step == 0


@pytest.mark.parametrize("callback_cls", [CategoryClustering, NeuronClustering])
def test_missing_tracker_is_a_clear_error(tmp_path, callback_cls):
    trainer = fast_trainer(tmp_path, callbacks=[callback_cls()])
    with pytest.raises(NeuronsError, match="none is attached"):
        trainer.fit(_tiny(), TinyData())


def test_untracked_layer_and_unknown_classifier_are_clear_errors(tmp_path):
    tracker = ActivationTracker(layers=["backbone.conv1"])
    trainer = fast_trainer(
        tmp_path, callbacks=[tracker, NeuronClustering(layers=["backbone.conv2"])]
    )
    with pytest.raises(
        NeuronsError, match="not tracked by the ActivationTracker, which tracks backbone.conv1"
    ):
        trainer.fit(_tiny(), TinyData())
    trainer = fast_trainer(
        tmp_path,
        callbacks=[ActivationTracker(), CategoryClustering(classifier_layer="backbone.haed")],
    )
    with pytest.raises(NeuronsError, match="backbone.head"):
        trainer.fit(_tiny(), TinyData())


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (
            CategoryClustering,
            {"method": "dbscan"},
            "`method` must be one of 'agglomerative', 'kmeans', 'hdbscan'; got 'dbscan'",
        ),
        (CategoryClustering, {"metric": "l1"}, "`metric` must be one of 'correlation', "),
        (CategoryClustering, {"linkage": "ward2"}, "`linkage` must be one of 'average', "),
        (CategoryClustering, {"normalize": "l2"}, "`normalize` must be one of 'none', 'zscore'"),
        (CategoryClustering, {"n_clusters": 0}, "`n_clusters` must be an integer >= 1 or None"),
        (CategoryClustering, {"method": "hdbscan", "n_clusters": 3}, "not used with method='hdb"),
        (CategoryClustering, {"every_n_epochs": 0}, "`every_n_epochs` must be an integer >= 1"),
        (CategoryClustering, {"combine_layers": None}, "`combine_layers` must be a bool; got None"),
        (CategoryClustering, {"view": ""}, "`view` must be 'deepest', 'combined' or a layer name"),
        (CategoryClustering, {"classifier_layer": 3}, "`classifier_layer` must be a str or None"),
        (CategoryClustering, {"confusion": "yes"}, "`confusion` must be a bool; got 'yes'"),
        (NeuronClustering, {"method": "dbscan"}, "`method` must be one of 'hdbscan', 'kmeans', "),
        (NeuronClustering, {"normalize": "rank"}, "`normalize` must be one of 'zscore', 'l2', "),
        (NeuronClustering, {"source": "images"}, "`source` must be one of 'class_means', "),
        (NeuronClustering, {"reservoir_size": 0}, "`reservoir_size` must be an integer >= 1"),
        (NeuronClustering, {"min_cluster_size": 1}, "`min_cluster_size` must be an integer >= 2"),
        (NeuronClustering, {"method": "kmeans", "min_cluster_size": 5}, "are HDBSCAN settings"),
        (NeuronClustering, {"max_embedding_neurons": 0}, "`max_embedding_neurons` must be an "),
        (NeuronClustering, {"seed": -1}, "`seed` must be an integer >= 0; got -1"),
        (NeuronClustering, {"embedding": 1}, "`embedding` must be a bool; got 1"),
        (NeuronClustering, {"on_error": "ignore"}, "`on_error` must be one of 'warn', 'raise'"),
    ],
)
def test_argument_errors(cls, kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [ActivationTracker, CategoryClustering, NeuronClustering])
def test_every_argument_has_exactly_the_constraints_of_its_table(cls):
    """The constraint table names every argument of ``__init__`` and nothing else."""
    import inspect

    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(cls._parameter_constraints) == params


def test_every_projector_point_has_its_own_image(tmp_path):
    from google.protobuf import text_format
    from PIL import Image
    from tensorboard.plugins.projector import ProjectorConfig

    neurons = NeuronClustering(method="kmeans", n_clusters=2, on_error="raise")
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[ActivationTracker(), neurons])
    trainer.fit(_tiny(num_classes=6), TinyData(n=96, num_classes=6))
    log_dir = Path(trainer.logger.log_dir)
    config = text_format.Parse(
        (log_dir / "projector_config.pbtxt").read_text(), ProjectorConfig()
    )  # as TensorBoard's projector reads it
    assert len(config.embeddings) == len(neurons.results)  # one per layer
    for entry in config.embeddings:
        points = len((log_dir / entry.metadata_path).read_text().strip().split("\n")) - 1
        size = list(entry.sprite.single_image_dim)
        sheet = np.asarray(Image.open(log_dir / entry.sprite.image_path))
        per_row = sheet.shape[1] // size[0]
        assert per_row == int(np.ceil(np.sqrt(points)))
        for i in range(points):  # no flat placeholder: each tile shows an image or a cross
            r, c = divmod(i, per_row)
            tile = sheet[r * size[1] : (r + 1) * size[1], c * size[0] : (c + 1) * size[0]]
            assert tile.std() > 0, (entry.tensor_name, i)


def test_state_dict_round_trip(tmp_path):
    """A resumed callback compares its first labels with the checkpoint's: the same model
    validated again gives the same labels, so a stability of 1 (NaN without the checkpoint)."""
    options = dict(method="kmeans", n_clusters=2, enable_logging=False, on_error="raise")
    model, data = _tiny(), TinyData()
    neurons = NeuronClustering(**options)
    fast_trainer(tmp_path, max_epochs=1, callbacks=[ActivationTracker(), neurons]).fit(model, data)
    assert neurons.results and not any(np.isfinite(r.stability) for r in neurons.results.values())
    resumed, fresh = NeuronClustering(**options), NeuronClustering(**options)
    resumed.load_state_dict(neurons.state_dict())
    for callback in (resumed, fresh):
        trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), callback])
        trainer.validate(model, data, verbose=False)
    assert resumed.results.keys() == fresh.results.keys() == neurons.results.keys()
    for layer, res in resumed.results.items():
        assert res.stability == pytest.approx(1.0), layer
        assert not np.isfinite(fresh.results[layer].stability)
    CategoryClustering().load_state_dict({})  # tolerant of old checkpoints


def test_distance_confusion_agreement():
    distances = np.array([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    confusion = np.array([[90, 8, 2], [8, 87, 5], [1, 4, 95]])  # close pairs confused more
    assert distance_confusion_agreement(distances, confusion) == pytest.approx(1.0)
    assert distance_confusion_agreement(distances, confusion[:, ::-1].T) < 0
    assert np.isnan(distance_confusion_agreement(distances, np.diag([10, 10, 10])))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_cut_threshold_cuts_into_k_clusters(k):
    points = np.random.default_rng(0).normal(size=(8, 3))
    z = linkage(points, "average")
    labels = fcluster(z, cut_threshold(z, k), criterion="distance")
    assert len(set(labels)) == k


# ---- two CPU processes (DDP, gloo) --------------------------------------------------------------


def _validate_digits(rank: int, world_size: int, folder: Path) -> dict:
    """Both clusterings after validating a fixed model on digits, as plain lists, and the
    projector sprites written (NeuronClustering logs to TensorBoard; CategoryClustering not)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_neurons.data import DigitsDataModule

    torch.manual_seed(0)
    model = ImageClassifier(SmallCNN(widths=(8, 16)), num_classes=10)
    category = CategoryClustering(n_clusters=3, enable_logging=False, on_error="raise")
    neurons = NeuronClustering(method="kmeans", n_clusters=2, on_error="raise")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        logger=TensorBoardLogger(str(folder), name=f"world{world_size}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ActivationTracker(), category, neurons],
    )
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    confusion = category.results[COMBINED].confusion if category.results else None
    return {
        "confusion": None if confusion is None else np.asarray(confusion).tolist(),
        "labels": {k: np.asarray(v.labels).tolist() for k, v in category.results.items()},
        "neurons": {k: np.asarray(v.labels).tolist() for k, v in neurons.results.items()},
        "failures": list(neurons.failures),
        "sprites": sorted(
            p.parent.name for p in folder.glob(f"world{world_size}/*/projector/*/*/*/sprite.png")
        ),
    }


@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_results(tmp_path):
    (single,) = run_ranks(_validate_digits, 1, tmp_path)
    rank0, rank1 = run_ranks(_validate_digits, 2, tmp_path)
    assert np.sum(rank0["confusion"]) == 360  # every validation image, summed over both ranks
    assert rank0["confusion"] == single["confusion"]
    assert rank0["labels"] == single["labels"] and rank0["neurons"] == single["neurons"]
    assert rank1["confusion"] is None  # analyses run on rank zero only
    # the projector's crops are searched on rank zero's batches (no collective, no second pass)
    # and written once per layer, as by one process
    assert not single["failures"] and not rank0["failures"] and not rank1["failures"]
    layers = sorted(short_names(list(single["neurons"])).values())
    assert rank0["sprites"] == single["sprites"] == layers


def test_projector_images_are_found_in_the_batches_validation_already_runs(tmp_path, monkeypatch):
    """The projector's crops come from the analysed stage's own forward passes (the loader is not
    run a second time) and equal what a fresh pass over the same first rows finds; the search
    stops after ``MAX_IMAGES`` rows (20 here: two batches of 8 and half of the third)."""
    import lightning_neurons.callbacks.neuron_clustering as nc_module
    import lightning_neurons.projector as projector

    monkeypatch.setattr(nc_module, "MAX_IMAGES", 20)
    monkeypatch.setattr(projector, "_crops", lambda *a, **k: pytest.fail("a second pass"))
    logged: dict[int, dict[str, torch.Tensor]] = {}
    real = projector.log_neuron_projector

    def spy(trainer, *args, **kwargs):
        search = kwargs["tiles"]  # the CropSearch: it crops the neurons written only
        everyone = search.tiles()
        chosen = {layer: torch.tensor([2, 0]) for layer in everyone}
        for layer, tiles in search.tiles(neurons=chosen).items():
            assert torch.equal(tiles, everyone[layer][chosen[layer]])
        logged[trainer.current_epoch] = everyone
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(projector, "log_neuron_projector", spy)
    neurons = NeuronClustering(method="kmeans", n_clusters=2, on_error="raise")
    model, data = _tiny(num_classes=3), TinyData(n=96, num_classes=3)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[ActivationTracker(), neurons])
    trainer.fit(model, data)
    assert sorted(logged) == [0, 1] and not neurons.failures
    fresh = projector.top_activating_crops(model, neurons.layers, [data.vx[:8], data.vx[8:20]])
    assert set(logged[1]) == set(fresh) == set(neurons.layers)
    for layer, tiles in fresh.items():  # same weights, inputs and kernels: the same arithmetic
        torch.testing.assert_close(logged[1][layer], tiles)
    assert count_forward_hooks(model) == 0


def test_neuron_clustering_lets_the_last_results_go_before_clustering_again(tmp_path, monkeypatch):
    """Each layer's ``[K, C]`` features are held in the results for the whole fit: the last
    analysis's go before the next clusters, so that two analyses' never coexist."""
    earlier: list[weakref.ref] = []
    alive_at_start: list[bool] = []
    cluster = NeuronClustering._cluster

    def spied(self, name, stats):
        gc.collect()
        alive_at_start.append(any(ref() is not None for ref in earlier))
        res = cluster(self, name, stats)
        earlier.append(weakref.ref(res.features))
        return res

    monkeypatch.setattr(NeuronClustering, "_cluster", spied)
    neurons = NeuronClustering(method="kmeans", enable_logging=False, on_error="raise")
    tracker = ActivationTracker(layers=["backbone.relu2"], enable_logging=False)
    trainer = fast_trainer(tmp_path, max_epochs=3, logger=False, callbacks=[tracker, neurons])
    trainer.fit(_tiny(num_classes=6), TinyData(n=96, num_classes=6))
    assert alive_at_start == [False, False, False]
    assert earlier[-1]() is neurons.results["backbone.relu2"].features
