"""FeatureVisualizer: what it renders and logs, its defaults, errors, and that training does not
notice it (bitwise-identical weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _vis_helpers import BNNet
from conftest import TinyData, fast_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_neurons import ActivationTracker, NeuronsError
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.loggers import artifact_root, load_index
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import DataPrior

FAST = dict(steps=3, smoothgrad_samples=2)


def _module(seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(BNNet(), num_classes=3, lr=1e-2)


class CountingTransform:
    """An input transform (display -> model input) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x - 0.5) / 0.25


class ShapedData(TinyData):
    """TinyData that, like the package's data modules, tells its image shape and transform."""

    def __init__(self) -> None:
        super().__init__()
        self.image_shape = (1, 8, 8)
        self.input_transform = CountingTransform()
        self.class_names = ["dark", "mid", "bright"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_channels": 0}, "`max_channels` must be a positive integer"),
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({"lr": 0}, "`lr` must be a number > 0"),
        ({"tv": -1}, "`tv` must be a number >= 0"),
        ({"param": "cppn"}, "`param` must be one of 'fft', 'pixel'"),
        ({"transforms": "heavy"}, "`transforms` must be one of"),
        ({"saliency": ["gradient", "lime"]}, "`saliency` must be one of"),
        ({"classes": [0, -1]}, "`classes` must hold non-negative integers"),
        ({"channels": [0, 1]}, "`channels` must map layer names"),
        ({"channels": {"conv1": [1, "a"]}}, r"`channels\['conv1'\]` must hold"),
        ({"image_shape": [8, 8]}, "`image_shape` must be"),
        ({"max_probes": 0}, "`max_probes` must be a positive integer"),
        ({"class_select_after": 0}, "`class_select_after` must be a positive integer"),
        ({"continue_steps": 0}, "`continue_steps` must be a positive integer"),
        ({"converge_tol": -0.01}, "`converge_tol` must be a number >= 0"),
        ({"converge_window": 0}, "`converge_window` must be a positive integer"),
        ({"every_n_epochs": 0}, "`every_n_epochs` must be a positive integer"),
        ({"on_error": "ignore"}, "`on_error` must be one of"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        FeatureVisualizer(**kwargs)


def test_renders_logs_and_writes_files(tmp_path):
    tracker = ActivationTracker(layers=["backbone.conv1", "backbone.conv2"])
    vis = FeatureVisualizer(max_channels=3, on_error="raise", **FAST)
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[vis, tracker])  # order does not matter
    trainer.fit(module, datamodule=TinyData())

    # layers default to the tracker's; the first max_channels channels of each
    assert vis.layers == ["backbone.conv1", "backbone.conv2"]
    assert set(vis.results) == {"backbone.conv1", "backbone.conv2", "classes"}
    for layer in vis.layers:
        res = vis.results[layer]
        assert res.channels.tolist() == [0, 1, 2]
        assert res.images.shape == (3, 1, 8, 8) and res.epoch == 1
        assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
        reference = tracker.results[layer].max_activation[:3].float()
        assert torch.allclose(res.reference, reference)
        positive = reference > 0
        expected = res.activation[positive] / reference[positive]
        assert torch.allclose(res.strength[positive], expected)
        assert torch.isnan(res.strength[~positive]).all()
    classes = vis.results["classes"]
    assert classes.channels.tolist() == [0, 1, 2] and classes.images.shape == (3, 1, 8, 8)
    assert classes.probability.shape == (3,) and classes.strength is None
    # the second round continued the images: continue_steps=16 at most, two windows (8) at least
    assert all(((r.steps >= 8) & (r.steps <= 16)).all() for r in vis.results.values())

    # probes: the first validation image of each class, with saliency maps of every method
    sal = vis.saliency_results
    val = TinyData()
    first = [int(torch.nonzero(val.vy == c)[0]) for c in range(3)]
    assert sal.labels.tolist() == [0, 1, 2]
    assert torch.equal(sal.images, val.vx[first])
    assert set(sal.maps) == {"gradient", "smoothgrad", "gradcam"}
    assert all(m.shape == (3, 8, 8) for m in sal.maps.values())

    # TensorBoard: stable tags, one image per epoch each (the step slider); scalars
    log_dir = Path(trainer.logger.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    expected_images = {
        "preference/backbone.conv1",
        "preference/backbone.conv2",
        "preference/classes",
        "focus/gradient",
        "focus/smoothgrad",
        "focus/gradcam",
    }
    assert expected_images <= set(tags["images"])
    for tag in expected_images:
        assert [e.step for e in events.Images(tag)] == [
            trainer.global_step // 2,
            trainer.global_step,
        ]
    assert "neurons/preference/backbone.conv2/above_max_fraction" in tags["scalars"]
    # the first round from noise: FAST's 3 steps, fewer than a window, all run
    logged = [e.value for e in events.Scalars("neurons/preference/classes/steps")]
    assert logged == [3.0, pytest.approx(float(classes.steps.double().mean()))]

    # files for other analyses
    root = artifact_root(trainer)
    assert root.parent == log_dir
    index = load_index(root)
    files = {r["file"] for r in index if r["kind"] in ("preference", "focus")}
    assert "fit/preference/epoch=001/backbone.conv2.npz" in files
    assert "fit/preference/epoch=001/classes.npz" in files
    assert "fit/focus/epoch=001/saliency.npz" in files
    with np.load(root / "fit/preference/epoch=001/backbone.conv2.npz") as data:
        assert data["images"].shape == (3, 1, 8, 8)
        assert np.array_equal(data["channels"], [0, 1, 2])
    assert count_forward_hooks(module) == 0 and not vis.failures


def test_later_rounds_continue_the_images_and_a_resumed_run_continues_too(tmp_path, monkeypatch):
    import lightning_neurons.callbacks.visualizer as visualizer

    calls, selects = [], []
    real = visualizer.render

    def spy(*args, **kwargs):
        calls.append((kwargs["steps"], kwargs["init"] is not None))
        selects.append((kwargs["restarts"], kwargs["select_after"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(visualizer, "render", spy)
    tracker = ActivationTracker(layers=["backbone.conv2"])
    vis = FeatureVisualizer(
        max_channels=2,
        saliency=[],
        steps=6,
        continue_steps=2,
        class_select_after=3,
        on_error="raise",
    )
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis], max_epochs=2)
    trainer.fit(module, datamodule=TinyData())
    # two rounds of (conv2 channels, class images): from noise with `steps`, then continued
    assert calls == [(6, False), (6, False), (2, True), (2, True)]
    # the class candidates are selected early in the first round; later the kept one goes on
    assert selects == [(1, None), (4, 3), (1, None), (1, None)]
    state = vis.state_dict()
    assert set(state["params"]) == {"backbone.conv2", "classes"}
    rows = state["params"]["classes"]["params"].shape[0]
    assert rows == 3  # the kept candidate of each class is continued alone

    # a new callback loading the state continues at its first round; another seed does not
    calls.clear()
    resumed = FeatureVisualizer(
        max_channels=2, saliency=[], steps=6, continue_steps=2, on_error="raise"
    )
    resumed.load_state_dict(state)
    other_seed = FeatureVisualizer(
        max_channels=2, saliency=[], steps=6, continue_steps=2, seed=1, on_error="raise"
    )
    other_seed.load_state_dict(state)
    for cb in (resumed, other_seed):
        t = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=["backbone.conv2"]), cb])
        t.validate(module, datamodule=TinyData(), verbose=False)
    assert calls == [(2, True), (2, True), (6, False), (6, False)]


@pytest.mark.parametrize(("tol", "first", "later"), [(1e6, 4, 4), (None, 12, 8), (0.0, 12, 8)])
def test_rounds_stop_at_convergence_and_log_the_steps_they_ran(tmp_path, tol, first, later):
    """converge_tol=1e6: every value "rises" by less than a million times itself, so every image
    stops as early as it can, at the second check in a row that found it calm, two windows
    (4 steps) in; None or 0: the full counts."""
    vis = FeatureVisualizer(
        max_channels=2,
        saliency=[],
        steps=12,
        continue_steps=8,
        converge_tol=tol,
        converge_window=2,
        on_error="raise",
    )
    tracker = ActivationTracker(layers=["backbone.conv2"])
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis], max_epochs=2)
    seen = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append({k: r.steps.tolist() for k, r in vis.results.items()})

    trainer.callbacks.append(Record())
    trainer.fit(_module(), datamodule=TinyData())
    # rounds after each of the two epochs (and none at the sanity check): from noise, continued
    assert seen[-2:] == [
        {"backbone.conv2": [first] * 2, "classes": [first] * 3},
        {"backbone.conv2": [later] * 2, "classes": [later] * 3},
    ]
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("neurons/preference/backbone.conv2/steps")]
    assert logged == [first, later]
    with np.load(artifact_root(trainer) / "fit/preference/epoch=001/classes.npz") as data:
        assert data["steps"].tolist() == [later] * 3


def test_at_many_classes_a_spread_subset_of_classes_is_rendered():
    from lightning_neurons.callbacks.visualizer import default_classes

    assert default_classes(10, 16) == list(range(10))
    assert default_classes(1000, 16) == [i * 62 + i // 2 for i in range(16)]
    assert default_classes(1000, 16)[-1] == 937 and default_classes(1000, None) == list(range(1000))
    with pytest.raises(NeuronsError, match="`max_classes` must be a positive integer"):
        FeatureVisualizer(max_classes=0)


def test_defaults_without_tracker_from_data_module(tmp_path):
    data = ShapedData()
    vis = FeatureVisualizer(
        layers=["backbone.conv*"],
        channels={"backbone.conv2": [5, 1]},
        max_channels=None,
        classes=[2],
        saliency=["gradcam"],
        gradcam_layer="backbone.conv1",
        on_error="raise",
        **FAST,
    )
    trainer = fast_trainer(tmp_path, callbacks=[vis], max_epochs=1)
    trainer.fit(_module(), datamodule=data)
    assert vis.layers == ["backbone.conv1", "backbone.conv2"]
    assert vis.results["backbone.conv1"].channels.tolist() == [0, 1, 2, 3]  # all 4
    assert vis.results["backbone.conv2"].channels.tolist() == [5, 1]
    assert vis.results["backbone.conv2"].strength is None  # no tracker: no reference
    assert vis.results["classes"].channels.tolist() == [2]
    assert list(vis.saliency_results.maps) == ["gradcam"]
    assert data.input_transform.calls > 0  # the data module's transform was used
    assert vis.last_seconds is not None and vis.last_seconds > 0


def test_probes_are_bounded_and_validate_runs_a_round(tmp_path):
    vis = FeatureVisualizer(max_channels=1, probes_per_class=5, max_probes=4, **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    trainer.validate(_module(), datamodule=TinyData())
    assert vis.saliency_results.images.shape == (4, 1, 8, 8)
    # default layers: BNNet's ReLU module and its torch.relu call
    assert set(vis.results) == {"backbone.relu1", "backbone.relu()", "classes"}


def test_image_shape_from_the_batches_without_saliency(tmp_path):
    vis = FeatureVisualizer(max_channels=1, classes=[], saliency=[], on_error="raise", **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False, max_epochs=1)
    trainer.fit(_module(), datamodule=TinyData())  # no image_shape attribute
    assert set(vis.results) == {"backbone.relu1", "backbone.relu()"}  # classes=[]: none
    assert vis.results["backbone.relu1"].images.shape == (1, 1, 8, 8)
    assert vis.saliency_results is None


def test_seeded_fit_is_bitwise_identical_with_and_without_visualizer(tmp_path):
    def fit(callbacks):
        module = _module(seed=3)
        trainer = fast_trainer(tmp_path, callbacks=callbacks, logger=False, max_epochs=2)
        trainer.fit(module, datamodule=TinyData())
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state()

    plain, plain_rng = fit([])
    vis = FeatureVisualizer(max_channels=2, on_error="raise", **FAST)
    seen, seen_rng = fit([ActivationTracker(), vis])
    assert vis.results  # it did run
    assert plain.keys() == seen.keys()
    for key in plain:
        assert torch.equal(plain[key], seen[key]), key
    assert torch.equal(plain_rng, seen_rng)


def test_configuration_errors_raise_even_with_on_error_warn(tmp_path):
    trainer = fast_trainer(
        tmp_path, callbacks=[FeatureVisualizer(layers=["backbone.conv9"])], logger=False
    )
    with pytest.raises(NeuronsError, match="layer 'backbone.conv9' not found"):
        trainer.fit(_module(), datamodule=TinyData())
    vis = FeatureVisualizer(
        layers=["backbone.conv*"], channels={"backbone.conv1": [0, 4]}, on_error="warn", **FAST
    )
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    with pytest.raises(
        NeuronsError, match="channel 4 is out of range; layer 'backbone.conv1' has 4"
    ):
        trainer.fit(module, datamodule=TinyData())
    assert count_forward_hooks(module) == 0
    trainer = fast_trainer(
        tmp_path, callbacks=[FeatureVisualizer(classes=[3], **FAST)], logger=False
    )
    with pytest.raises(NeuronsError, match="class 3 is out of range"):
        trainer.fit(_module(), datamodule=TinyData())
    vis = FeatureVisualizer(channels={"backbone.fc": [0]}, layers=["backbone.conv1"])
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    with pytest.raises(NeuronsError, match="`channels` names layers"):
        trainer.fit(_module(), datamodule=TinyData())


def test_a_failing_round_warns_and_training_goes_on(tmp_path, monkeypatch):
    import lightning_neurons.callbacks.visualizer as visualizer

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(visualizer, "render", broken)
    vis = FeatureVisualizer(**FAST)
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    with pytest.warns(UserWarning, match="feature visualization failed and was skipped"):
        trainer.fit(module, datamodule=TinyData())
    assert trainer.current_epoch == 2 and len(vis.failures) == 2
    assert count_forward_hooks(module) == 0
    vis = FeatureVisualizer(on_error="raise", **FAST)
    with pytest.raises(RuntimeError, match="out of memory"):
        fast_trainer(tmp_path, callbacks=[vis], logger=False).fit(_module(), datamodule=TinyData())


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_neurons.callbacks.tracker import ActivationTracker
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN

out = Path(sys.argv[1])
pl.seed_everything(0, verbose=False)
model = ImageClassifier(SmallCNN(widths=(4, 8)), num_classes=10)
# with a convergence test that stops some images early and not others (per image: the DDP
# split does not change an image's steps)
CONVERGE = dict(steps=8, converge_tol=0.05, converge_window=2)
vis = FeatureVisualizer(
    max_channels=2, smoothgrad_samples=2, prior_images=64, on_error="raise", **CONVERGE
)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
    limit_val_batches=3, logger=TensorBoardLogger(str(out), name="tb"), enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False,
    callbacks=[ActivationTracker(), vis],
)
trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
import torch
from lightning_neurons.visualize import Channel, ClassLogit
if trainer.global_rank == 0:
    torch.save({k: v.images for k, v in vis.results.items()}, out / "images_ddp.pt")
    torch.save({k: v.steps for k, v in vis.results.items()}, out / "steps_ddp.pt")
    torch.save(vis.state_dict(), out / "state_ddp.pt")
    # the same round in one process: a fresh callback with the same plan and prior
    solo = FeatureVisualizer(max_channels=2, smoothgrad_samples=2, on_error="raise", **CONVERGE)
    solo._plan, solo._estimated_prior = vis._plan, vis._estimated_prior
    alone = {
        layer: solo._render(model, layer, [Channel(layer, i) for i in vis._plan["channels"][layer]])
        for layer in vis.layers
    }
    classes = [ClassLogit(c) for c in vis._plan["classes"]]
    alone["classes"] = solo._render(model, "classes", classes, classes=True)
    torch.save({k: v[0] for k, v in alone.items()}, out / "images_solo.pt")
    torch.save({k: v[1] for k, v in alone.items()}, out / "steps_solo.pt")
    # the probes' maps in one process, by the public function, all probes in one call
    from lightning_neurons.visualize import saliency
    res = vis.saliency_results
    solo_maps = {
        method: saliency(
            model, res.images, method, target=res.predicted, samples=2, seed=0,
            input_transform=vis._plan["transform"],
        )
        for method in res.maps
    }
    torch.save(solo_maps, out / "saliency_solo.pt")
res = vis.saliency_results
torch.save(
    {"inputs": res.inputs, "labels": res.labels, "predicted": res.predicted, "maps": res.maps},
    out / f"saliency{trainer.global_rank}.pt",
)
summary = {
    "layers": sorted(vis.results),
    "strength": [v.strength is not None for k, v in sorted(vis.results.items()) if k != "classes"],
    "probes": 0 if vis.saliency_results is None else len(vis.saliency_results.labels),
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary))
import torch
prior = vis._estimated_prior
torch.save(
    {"magnitude": prior.magnitude, "mean": prior.mean, "std": prior.std, "count": prior.count},
    out / f"prior{trainer.global_rank}.pt",
)
# Close the gloo process group before the interpreter exits: otherwise its worker threads may
# still be joinable when the C++ statics are destroyed ("terminate called without an active
# exception", SIGABRT), about one run in three here.
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_two_process_ddp_shares_the_rendering_and_gives_the_images_of_one_process(tmp_path):
    script = tmp_path / "ddp_visualizer.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == {
        "layers": ["backbone.features.relu1", "backbone.features.relu2", "classes"],
        "strength": [True, True],  # the tracker's statistics, synced over both ranks
        "probes": 10,
    }
    assert rank1 == rank0  # every rank has the images and the saliency maps
    # the images of one process: render each rank's share alone, from its rows' own noise
    images = torch.load(tmp_path / "images_ddp.pt")
    alone = torch.load(tmp_path / "images_solo.pt")
    assert set(alone) == set(images)
    for key, solo in alone.items():
        # the same rows from the same noise and transforms, in other batches: float32 kernels
        # batched differently, at most 8 Adam steps (each about lr x sign(gradient)); images in [0, 1]
        torch.testing.assert_close(images[key], solo, atol=1e-4, rtol=0)
    # saliency: the probes are one process's (the first validation image of each class: the
    # ranks' candidates merged in the validation order), the same on both ranks
    data = DigitsDataModule(batch_size=32)
    data.setup()
    val_x, val_y = data.val_set.tensors[:2]
    first = [int(torch.nonzero(val_y == c)[0, 0]) for c in range(10)]
    order = sorted(first)
    rank_maps = [torch.load(tmp_path / f"saliency{r}.pt") for r in (0, 1)]
    for got in rank_maps:
        assert torch.equal(got["inputs"], val_x[order])
        assert got["labels"].tolist() == val_y[order].tolist()
    assert torch.equal(rank_maps[0]["predicted"], rank_maps[1]["predicted"])
    solo_maps = torch.load(tmp_path / "saliency_solo.pt")
    assert sorted(solo_maps) == ["gradcam", "gradient", "smoothgrad"]
    for method, solo in solo_maps.items():
        # each rank mapped 5 of the 10 probes, one process all 10 in one batch: every map is the
        # image's own gradient (eval mode) and SmoothGrad's noise is drawn per probe index, so
        # only the batch the float32 kernels see differs (~1e-7 relative per value, a few
        # layers deep): 1e-5 relative to the maps' scale
        scale = float(solo.abs().max())
        for got in rank_maps:
            torch.testing.assert_close(got["maps"][method], solo, rtol=1e-5, atol=1e-5 * scale)
    steps, steps_solo = (
        torch.load(tmp_path / "steps_ddp.pt"),
        torch.load(tmp_path / "steps_solo.pt"),
    )
    assert all(torch.equal(steps[key], steps_solo[key]) for key in steps)
    ran = torch.cat(list(steps.values()))
    assert ran.max() == 8 and ran.min() < 8, ran.tolist()  # both kinds of image were rendered
    state = torch.load(tmp_path / "state_ddp.pt")["params"]
    for key, entry in state.items():
        assert entry["params"].shape[0] == images[key].shape[0]  # one per kept image
    assert images["classes"].shape[0] == 10 and images["backbone.features.relu1"].shape[0] == 2
    # the data prior: each rank streamed 32 of its shard's images (3 batches of 32 seen), and the
    # shards interleave the validation set, so the sum over ranks is the prior of its first 64
    # images, as one process computes it (sums in float64: equal up to the float32 result's
    # rounding, ~1e-7 relative)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    expected = DataPrior.from_images(data.val_set.tensors[0][:64])
    for rank in (0, 1):
        prior = torch.load(tmp_path / f"prior{rank}.pt")
        assert prior["count"] == 64
        for name in ("magnitude", "mean", "std"):
            torch.testing.assert_close(prior[name], getattr(expected, name), atol=1e-6, rtol=1e-6)
    records = [
        r for r in load_index(tmp_path / "tb" / "version_0") if r["kind"] in ("preference", "focus")
    ]
    assert sorted(r["name"] for r in records) == [
        "backbone.features.relu1", "backbone.features.relu2", "classes", "saliency",
    ]  # fmt: skip


FAILING_SALIENCY_SCRIPT = """
import json, sys
from pathlib import Path
import lightning.pytorch as pl
import torch
import torch.distributed as dist
import lightning_neurons.callbacks.visualizer as visualizer
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN

_saliency = visualizer.saliency


def failing(*args, **kwargs):
    if dist.get_rank() == 1:
        raise RuntimeError("out of memory (simulated)")
    return _saliency(*args, **kwargs)


visualizer.saliency = failing
out = Path(sys.argv[1])
pl.seed_everything(0, verbose=False)
model = ImageClassifier(SmallCNN(widths=(4, 8)), num_classes=10)
vis = FeatureVisualizer(
    max_channels=1, classes=[], steps=1, saliency=["gradient"], param="fft", enable_logging=False
)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", limit_val_batches=2, logger=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[vis],
)
trainer.validate(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)
summary = {"failures": vis.failures, "saliency": vis.saliency_results is not None}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_two_process_ddp_saliency_failing_on_one_rank_is_reported_on_both(tmp_path):
    script = tmp_path / "ddp_failing_saliency.py"
    script.write_text(FAILING_SALIENCY_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(  # a rank left waiting in a collective would end at the timeout
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"rank{rank}.json").read_text())
        (failure,) = summary["failures"]
        assert "saliency failed on rank 1: RuntimeError: out of memory (simulated)" in failure
        assert summary["saliency"] is False  # the round's maps were not kept, on either rank
