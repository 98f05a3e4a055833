"""``torch.compile``d models and backbones with every callback attached: the statistics are
the eager model's, nothing recompiles until TorchDynamo gives up, ``fullgraph=True`` works (the
hooks traced into the graph hand their outputs over at the batch's end: see
:mod:`lightning_neurons.deferred`), and the analyses run a compiled model's code as written."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, fast_trainer
from test_model_zoo import (
    CLASSES,
    IMAGES,
    SIZE,
    _callbacks,
    _check_results,
    _loader,
    _timm,
    _validate,
)
from torch import nn
from torch._dynamo.utils import counters

from lightning_neurons import ActivationTracker
from lightning_neurons.errors import NeuronsError
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import saliency


@contextlib.contextmanager
def _dynamo_log() -> Iterator[list[str]]:
    """TorchDynamo's log messages inside the block."""
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)


def test_a_compiled_image_classifier_trains_without_recompiling_its_logging(tmp_path):
    """``trainer.fit(torch.compile(module))``, which Lightning supports: ImageClassifier's
    logging runs as written (before: each stage's names and the accuracy's counters recompiled
    Lightning's ``log`` until TorchDynamo gave up on it, saying so)."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(TinyNet(3, CLASSES), CLASSES)
    trainer = fast_trainer(tmp_path, logger=False, max_epochs=2)
    with _dynamo_log() as said, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(torch.compile(module, backend="eager"), _loader(False), _loader(False))
    assert not [m for m in said if "recompile_limit" in m]
    assert trainer.callback_metrics["val/acc"] >= 0 and "train/loss" in trainer.callback_metrics


@pytest.mark.slow
def test_a_compiled_model_gives_the_eager_statistics(tmp_path):
    """Dynamo traces the forward with our hooks and the functional capture in it, whose
    bookkeeping runs as written (the eager backend: the graph capture is what matters for hooks,
    not the code generation)."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(TinyNet(3, CLASSES), CLASSES)  # ReLU modules and a torch.relu
    eager = [ActivationTracker(enable_logging=False, on_error="raise")]
    _validate(tmp_path / "eager", module, eager, _loader(False))
    compiled = _callbacks(module)
    with _dynamo_log() as said:
        optimized = torch.compile(module, backend="eager")
        _validate(tmp_path / "compiled", optimized, compiled, _loader(False))
    # the hooks' bookkeeping is never traced (before: guards on its counters and names
    # recompiled it until TorchDynamo gave up, saying so in its log)
    assert not [m for m in said if "recompile_limit" in m]
    _check_results(module, compiled)
    assert list(compiled[0].results) == ["backbone.relu1", "backbone.relu2", "backbone.relu()"]
    for layer, stats in eager[0].results.items():
        got = compiled[0].results[layer]
        assert got.counts.tolist() == stats.counts.tolist()
        torch.testing.assert_close(got.class_means, stats.class_means, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_a_compiled_backbone_that_trained_is_analysed_as_written(tmp_path):
    """``torch.compile`` on the backbone, which then trains (its graphs compiled and cached):
    the analyses run its code as written, so the hooks they add later are called (before:
    FeatureVisualizer found that a ViT's block "did not run"), and inputs of new shapes compile
    nothing (the recompilations a frame is allowed are training's)."""
    pl.seed_everything(0, verbose=False)
    vit = _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2)
    module = ImageClassifier(torch.compile(vit, backend="eager"), CLASSES)
    callbacks = _callbacks(module)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, logger=False, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(False), _loader(False))
    _check_results(module, callbacks)
    compiled = counters["frames"]["total"]
    images = torch.rand(3, 3, SIZE, SIZE)  # 3 rows: a batch size training never had
    maps = {m: saliency(module, images, m) for m in ("gradient", "gradcam", "rollout")}
    assert all(m.shape == (3, SIZE, SIZE) and m.isfinite().all() for m in maps.values())
    assert counters["frames"]["total"] == compiled


@pytest.mark.slow
def test_a_backbone_compiled_with_fullgraph_is_analysed_as_the_eager_one(tmp_path):
    """``torch.compile(backbone, fullgraph=True)`` allows no graph break: the hooks on
    Lightning's batches keep what they need inside the graph and hand it over at the batch's end
    (before: validation stopped, "Skip inlining `torch.compiler.disable()`d function"). The
    statistics are the eager model's, its function layer ``torch.relu`` counted once a pass."""
    pl.seed_everything(0, verbose=False)
    net = TinyNet(3, CLASSES)  # ReLU modules and a torch.relu
    eager = [ActivationTracker(enable_logging=False, on_error="raise")]
    _validate(tmp_path / "eager", ImageClassifier(net, CLASSES), eager, _loader(False))
    module = ImageClassifier(torch.compile(net, backend="eager", fullgraph=True), CLASSES)
    compiled = _callbacks(module)
    with _dynamo_log() as said:
        _validate(tmp_path / "compiled", module, compiled, _loader(False))
    assert not [m for m in said if "recompile_limit" in m]
    _check_results(module, compiled)
    got = {name.replace("._orig_mod", ""): s for name, s in compiled[0].results.items()}
    assert (
        list(got)
        == list(eager[0].results)
        == ["backbone.relu1", "backbone.relu2", "backbone.relu()"]
    )
    for layer, stats in eager[0].results.items():
        assert got[layer].counts.tolist() == stats.counts.tolist()
        torch.testing.assert_close(got[layer].class_means, stats.class_means, atol=1e-6, rtol=1e-5)
        for stat in ("class_max", "class_std"):
            torch.testing.assert_close(
                getattr(got[layer], stat), getattr(stats, stat), atol=1e-6, rtol=1e-5
            )
        assert torch.equal(got[layer].firing_rate, stats.firing_rate)


class _OneScore(nn.Module):
    """A net with a layer (``squeeze``) whose output has no neuron axis: ``[B]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.score, self.head = (
            nn.Conv2d(3, 4, 3),
            nn.Linear(4, 1),
            nn.Linear(1, CLASSES),
        )
        self.squeeze = nn.Flatten(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.squeeze(self.score(self.conv(x).mean((2, 3)))).unsqueeze(1))


def _fit_tracking_training(
    tmp_path, net: nn.Module
) -> tuple[ActivationTracker, list[torch.Tensor]]:
    pl.seed_everything(0, verbose=False)
    tracker = ActivationTracker(stage="train", enable_logging=False, on_error="raise")
    module = ImageClassifier(net, CLASSES)
    trainer = fast_trainer(tmp_path, callbacks=[tracker], logger=False, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(False), _loader(False))
    return tracker, [p.detach().clone() for p in module.parameters()]


@pytest.mark.slow
def test_training_batches_of_a_fullgraph_compile_are_tracked_without_changing_what_it_learns(
    tmp_path,
):
    """``stage="train"`` on a backbone compiled with ``fullgraph=True`` (``aot_eager``: the
    forward and backward graphs traced, functionalised, and run with eager kernels): the weights
    after the fit and the statistics are the eager fit's (equal here; the tolerance allows for a
    decomposed operation summing in another order on another CPU)."""
    torch.manual_seed(0)
    net = TinyNet(3, CLASSES)
    twin = TinyNet(3, CLASSES)
    twin.load_state_dict(net.state_dict())
    eager, learnt = _fit_tracking_training(tmp_path / "eager", net)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    tracked, learnt_compiled = _fit_tracking_training(tmp_path / "compiled", compiled)
    close = dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(learnt_compiled, learnt, strict=True):
        torch.testing.assert_close(a, b, **close)
    got = {name.replace("._orig_mod", ""): s for name, s in tracked.results.items()}
    assert list(got) == list(eager.results) and got
    for layer, stats in eager.results.items():
        assert got[layer].counts.tolist() == stats.counts.tolist() == [IMAGES // CLASSES] * CLASSES
        torch.testing.assert_close(got[layer].class_means, stats.class_means, **close)
        torch.testing.assert_close(got[layer].class_max, stats.class_max, **close)


class _DictLayer(nn.Module):
    """A submodule that returns a dict, as some wrappers do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.conv(x)}


class _WithDictLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = _DictLayer(), nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)["features"].mean((2, 3)))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    ("net", "layer", "said"),
    [
        (_OneScore, "squeeze", r"returned a tensor of shape \(4,\); neurons are read"),
        (_WithDictLayer, "body", r"returned dict, not a tensor; choose a layer"),
    ],
)
def test_a_layer_that_cannot_be_read_is_named_in_a_fullgraph_compile_too(
    tmp_path, compiled, net, layer, said
):
    """As eager: the layer and what it returned are named. The hooks traced into a compiled
    graph keep such an output as it is, and the error is raised as written at the batch's end
    (before: TorchDynamo's "Observed exception", the message in its debug context only)."""
    model = net()
    backbone = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
    prefix = "backbone._orig_mod." if compiled else "backbone."
    tracker = ActivationTracker([prefix + layer], enable_logging=False, on_error="raise")
    with pytest.raises(NeuronsError, match=said):
        _validate(tmp_path, ImageClassifier(backbone, CLASSES), [tracker], _loader(False))
