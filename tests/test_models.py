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
