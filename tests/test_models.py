"""ImageClassifier: the training recipe's options and the best-epoch metric."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, fast_trainer

from lightning_neurons import NeuronsError
from lightning_neurons.models import ImageClassifier


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "cosine"}, "`schedule` must be 'constant' or 'onecycle'"),
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"weight_decay": -1.0}, "`weight_decay` >= 0"),
    ],
)
def test_recipe_argument_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        ImageClassifier(TinyNet(), num_classes=3, **kwargs)


def test_onecycle_anneals_and_best_accuracy_is_logged(tmp_path, tiny_data):
    model = ImageClassifier(
        TinyNet(), num_classes=3, lr=0.02, weight_decay=1e-3, schedule="onecycle"
    )
    lrs = []

    from lightning.pytorch import Callback

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = fast_trainer(tmp_path, max_epochs=3, callbacks=[Record()])
    trainer.fit(model, tiny_data)
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    peak = max(lrs)
    assert lrs[0] < 0.1 * peak and lrs[-1] < 0.1 * peak  # warm-up, then annealing
    assert peak == pytest.approx(0.02, rel=0.05)
    best = float(trainer.callback_metrics["val/acc_best"])
    assert best >= float(trainer.callback_metrics["val/acc"]) - 1e-6


def test_constant_schedule_keeps_plain_adam(tmp_path, tiny_data):
    model = ImageClassifier(TinyNet(), num_classes=3, lr=0.01)
    trainer = fast_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, tiny_data)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adam and trainer.lr_scheduler_configs == []
    assert optimizer.param_groups[0]["lr"] == 0.01


class _AsMappings(torch.utils.data.Dataset):
    """A dataset of ``(image, label)`` pairs yielding Hugging Face's ``pixel_values``/``labels``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _loader(x, y, **kwargs):
    return torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8, **kwargs)


def test_mapping_batches_train_as_tuples_do(tmp_path, tiny_data):
    weights = []
    for mappings in (False, True):
        torch.manual_seed(0)
        model = ImageClassifier(TinyNet(), num_classes=3, lr=0.01)
        x, y = tiny_data.x, tiny_data.y
        data = _AsMappings(x, y) if mappings else torch.utils.data.TensorDataset(x, y)
        train = torch.utils.data.DataLoader(data, batch_size=8)  # no shuffle: the same batches
        fast_trainer(tmp_path / str(mappings), max_epochs=1).fit(model, train)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # the same batches through the same arithmetic in one process: the same weights, bit for bit
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], torch.cat([p.flatten() for p in TinyNet().parameters()]))


def test_class_probabilities_are_targets_and_their_top_class_is_scored(tmp_path, tiny_data):
    torch.manual_seed(0)
    model = ImageClassifier(TinyNet(), num_classes=3)
    x, y = tiny_data.vx, tiny_data.vy
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    mixed = 0.6 * one_hot + 0.4 * one_hot.roll(1, dims=0)  # mixup of each image with the next
    metrics = {}
    targets_of = {"indices": y, "one-hot": one_hot, "mixup": mixed, "int one-hot": one_hot.long()}
    for name, targets in targets_of.items():
        trainer = fast_trainer(tmp_path / name, logger=False)
        metrics[name] = trainer.validate(model, _loader(x, targets), verbose=False)[0]
    # one-hot probabilities are the same targets as the indices: the loss differs only by the
    # rounding of two float32 formulas of one log-softmax (~1e-7 relative), the accuracy not at all
    assert metrics["one-hot"]["val/loss"] == pytest.approx(metrics["indices"]["val/loss"], rel=1e-5)
    assert metrics["one-hot"]["val/acc"] == metrics["indices"]["val/acc"]
    assert metrics["int one-hot"] == metrics["one-hot"]  # F.one_hot's int64, read as floats
    assert metrics["mixup"]["val/acc"] == metrics["indices"]["val/acc"]  # 0.6 > 0.4: same class
    expected = -(mixed * model(x).log_softmax(dim=1)).sum(dim=1).mean().item()
    assert metrics["mixup"]["val/loss"] == pytest.approx(expected, rel=1e-5)

    before = [p.detach().clone() for p in model.parameters()]
    fast_trainer(tmp_path / "fit", max_epochs=1, logger=False).fit(model, _loader(x, mixed))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (
            {"img": torch.zeros(2, 1, 8, 8), "label": torch.tensor([0, 1])},
            r"keys \['img', 'label'\]",
        ),
        ((torch.zeros(2, 1, 8, 8),), "`\\(images, targets, ...\\)` tuples"),
        ((torch.zeros(2, 1, 8, 8), torch.rand(2, 4)), r"shape \[B, 3\].*shape \(2, 4\)"),
        (
            (torch.zeros(2, 1, 8, 8), torch.tensor([0.0, 1.0])),
            r"dtype torch.float32 and shape \(2,\)",
        ),
        ((torch.zeros(2, 1, 8, 8), torch.tensor([0, 1, 2])), "must be 2 integer class indices"),
    ],
)
def test_batches_without_images_or_targets_are_named(batch, match):
    model = ImageClassifier(TinyNet(), num_classes=3)
    with pytest.raises(NeuronsError, match=match):
        model._step(batch, "train", model.train_acc)


def test_several_validation_loaders_are_validated(tmp_path, tiny_data):
    """Lightning passes ``dataloader_idx`` to the steps when there are several loaders."""
    model = ImageClassifier(TinyNet(), num_classes=3, lr=0.01)
    loader = _loader(tiny_data.x, tiny_data.y)
    trainer = fast_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, loader, val_dataloaders=[loader, loader])
    metrics = trainer.callback_metrics
    assert {"val/acc/dataloader_idx_0", "val/acc/dataloader_idx_1"} <= set(metrics)
    assert float(metrics["val/acc/dataloader_idx_0"]) == float(metrics["val/acc/dataloader_idx_1"])
    results = trainer.test(model, [loader, loader], verbose=False)
    assert len(results) == 2 and "test/acc/dataloader_idx_1" in results[1]


def test_predict_gives_class_probabilities_with_or_without_labels(tmp_path, tiny_data):
    model = ImageClassifier(TinyNet(), num_classes=3, lr=0.01)
    trainer = fast_trainer(tmp_path, max_epochs=1)
    labelled = trainer.predict(model, _loader(tiny_data.x, tiny_data.y))
    images_only = trainer.predict(model, torch.utils.data.DataLoader(tiny_data.x, batch_size=8))
    probabilities = torch.cat(labelled)
    assert probabilities.shape == (len(tiny_data.y), 3)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(tiny_data.y)))
    model.eval()
    with torch.no_grad():
        expected = model(tiny_data.x).softmax(dim=1)
    # the same images in batches of 8 and in one batch: kernels may differ by rounding
    torch.testing.assert_close(probabilities, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(images_only), probabilities, atol=0, rtol=0)


# ---- a binary classifier: one logit, num_classes=1 ------------------------------------------------


def _binary_batch(n: int = 16):
    """Images whose brightness gives the class, and the class as 0/1."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    return torch.rand(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.5, y


@pytest.mark.parametrize(
    "layout", ["int [B]", "float [B, 1]", "float [B]", "bool [B]", "smoothed float [B, 1]"]
)
def test_one_logit_trains_with_bce_on_any_target_layout(layout):
    torch.manual_seed(0)
    model = ImageClassifier(TinyNet(num_classes=1), num_classes=1)
    x, y = _binary_batch()
    p = y.float() * 0.8 + 0.1 if layout.startswith("smoothed") else y.float()
    targets = {
        "int [B]": y,
        "float [B, 1]": p[:, None],
        "float [B]": p,
        "bool [B]": y.bool(),
        "smoothed float [B, 1]": p[:, None],
    }[layout]
    loss = model._step((x, targets), "train", model.train_acc)
    loss.backward()
    got = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], p)
    expected.backward()
    # cross-entropy over [-z/2, z/2] is BCE with logits over z: the same value and gradients up
    # to float32 rounding of two formulas (a log-softmax against a log-sigmoid, ~1e-7 relative)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, q in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, q.grad, rtol=1e-4, atol=1e-6)
    predicted = (model(x)[:, 0] > 0).long()
    assert model.train_acc.compute().item() == pytest.approx((predicted == y).float().mean().item())


def test_one_logit_fits_predicts_and_the_tracker_counts_two_classes(tmp_path):
    from lightning_neurons import ActivationTracker

    torch.manual_seed(0)
    model = ImageClassifier(TinyNet(num_classes=1), num_classes=1, lr=0.05)
    x, y = _binary_batch(64)
    tracker = ActivationTracker(on_error="raise")
    trainer = fast_trainer(tmp_path, max_epochs=8, callbacks=[tracker])
    trainer.fit(model, _loader(x, y.float()[:, None], shuffle=True), _loader(x, y))
    assert float(trainer.callback_metrics["val/acc"]) > 0.9  # brightness splits the classes
    assert all(s.counts.tolist() == [32, 32] for s in tracker.results.values())
    probabilities = torch.cat(trainer.predict(model, _loader(x, y)))
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x)[:, 0])
    assert probabilities.shape == (64, 2)
    torch.testing.assert_close(probabilities[:, 1], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(64))


@pytest.mark.parametrize(
    ("num_classes", "targets", "match"),
    [
        (0, None, "`num_classes` must be a positive integer"),
        (1, torch.tensor([0.0, 1.5]), "class 1's probability, in \\[0, 1\\]; got 1.5"),
        (1, torch.rand(2, 3), r"class probabilities of shape \[B, 2\]"),
    ],
)
def test_binary_mistakes_are_named(num_classes, targets, match):
    with pytest.raises(NeuronsError, match=match):
        model = ImageClassifier(TinyNet(num_classes=1), num_classes=num_classes)
        model._step((torch.zeros(2, 1, 8, 8), targets), "train", model.train_acc)
