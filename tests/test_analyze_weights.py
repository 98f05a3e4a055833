"""``analyze`` on weights saved by a plain PyTorch loop: a backbone's state dict, PyTorch's
"general checkpoint" of a DataParallel model, torchvision's and timm's checkpoint dicts. Before,
each was refused ("is not a Lightning checkpoint")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_analyze import DATA, LAYERS, WIDTHS, _parts
from torch.nn import functional as F

from lightning_neurons import NeuronsError, load_run
from lightning_neurons.analyze import analyze_checkpoints
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.weights import epochs_from_names, fitted_state, read_weights


def _layout(kind: str, backbone: SmallCNN, optimizer: torch.optim.Optimizer, epoch: int):
    """What a plain loop saves after ``epoch``, as each convention keeps it."""
    state = backbone.state_dict()
    if kind == "state_dict":  # torch.save(model.state_dict(), ...)
        return state
    if kind == "general":  # PyTorch's tutorial; the model wrapped in DataParallel
        wrapped = {f"module.{k}": v for k, v in state.items()}
        return {
            "epoch": epoch,
            "model_state_dict": wrapped,
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.5,
        }
    if kind == "torchvision":  # references/classification/train.py, compiled model
        return {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": epoch}
    if kind == "timm":  # timm's train.py
        return {"state_dict": state, "epoch": epoch, "arch": "smallcnn"}
    return state  # save_pretrained's model.safetensors


def _train_plainly(folder: Path, kind: str, epochs=(1, 2)) -> dict[int, dict]:
    """A SmallCNN trained by a plain loop (3 batches an epoch), saved after each of ``epochs``
    as ``epoch_<e>.pt``; the saved state dicts by epoch."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    data = DigitsDataModule(**DATA)
    data.setup("fit")
    backbone = SmallCNN(widths=WIDTHS)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.05)
    batches = iter(data.train_dataloader())
    saved = {}
    for epoch in range(max(epochs) + 1):
        for _ in range(3):
            x, y = next(batches)
            optimizer.zero_grad()
            F.cross_entropy(backbone(x), y).backward()
            optimizer.step()
        if epoch in epochs:
            saving = _layout(kind, backbone, optimizer, epoch)
            if kind == "safetensors":
                save_file(saving, str(folder / f"epoch_{epoch}.safetensors"))
            else:
                torch.save(saving, folder / f"epoch_{epoch}.pt")
            saved[epoch] = {k: v.clone() for k, v in backbone.state_dict().items()}
    return saved


@pytest.mark.parametrize("kind", ["state_dict", "general", "torchvision", "timm", "safetensors"])
def test_weights_a_plain_loop_saved_are_analysed_at_their_epochs(tmp_path, kind):
    saved = _train_plainly(tmp_path / "weights", kind)
    trainer, model, data = _parts(tmp_path)
    infos = analyze_checkpoints(trainer, model, data, tmp_path / "weights", progress=False)
    # the epochs the files say, or (a bare state dict) the numbers in their names
    suffix = ".safetensors" if kind == "safetensors" else ".pt"
    assert [(i.path.name, i.epoch, i.global_step) for i in infos] == [
        (f"epoch_1{suffix}", 1, 1),
        (f"epoch_2{suffix}", 2, 2),
    ]
    # the last file's weights, under the LightningModule's names, exactly
    for name, value in saved[2].items():
        assert torch.equal(model.backbone.state_dict()[name], value), name
    run = load_run(trainer.logger.log_dir)
    assert run.epochs == [1, 2] and run.steps == {1: 1, 2: 2}
    first, last = (run.results("ActivationTracker", epoch=e)[LAYERS[-1]] for e in (1, 2))
    assert (first.class_means - last.class_means).abs().max() > 1e-3  # each file's own weights


def test_epochs_from_names():
    names = [Path(n) for n in ("w/epoch_10.pt", "w/epoch_2.pt", "w/epoch_9.pt")]
    assert epochs_from_names(names) == [10, 2, 9]
    assert epochs_from_names([Path("run3_step100.pt"), Path("run3_step50.pt")]) == [100, 50]
    # names that differ by more than a number: their natural order
    assert epochs_from_names([Path("b10.pt"), Path("a2.pt"), Path("b9.pt")]) == [2, 0, 1]
    assert epochs_from_names([Path("resnet18.pth")]) == [0]  # one file: not its "18"
    assert epochs_from_names([Path("e1.pt"), Path("e01.pt")]) == [0, 1]  # one number twice
    steps = [Path(f"out/checkpoint-{n}/model.safetensors") for n in (500, 1000)]
    assert epochs_from_names(steps) == [500, 1000]  # Hugging Face's Trainer's folders


def test_keys_are_fitted_to_the_model_as_saved_unwrapped_or_under_a_child():
    model = ImageClassifier(SmallCNN(widths=WIDTHS), num_classes=10)
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    fitted = fitted_state(model, {f"module._orig_mod.{k}": v for k, v in state.items()})
    assert set(fitted) == set(model.state_dict())
    assert list(fitted_state(model, model.state_dict())) == list(model.state_dict())
    nested = torch.nn.Module()  # a LightningModule holding its network deeper: model.encoder
    nested.model = torch.nn.Module()
    nested.model.encoder = SmallCNN(widths=WIDTHS)
    nested.head = torch.nn.Linear(2, 2)
    fitted = fitted_state(nested, state)
    assert set(fitted) == {f"model.encoder.{k}" for k in state}


def test_errors_say_what_a_file_holds_and_what_would_be_read(tmp_path):
    trainer, model, data = _parts(tmp_path)
    (tmp_path / "bad").mkdir()
    torch.save([torch.zeros(2)], tmp_path / "bad/list.pt")
    with pytest.raises(NeuronsError, match=r"holds no model weights .*: it holds a list\. Give"):
        analyze_checkpoints(trainer, model, data, tmp_path / "bad", progress=False)
    torch.save({"epoch": 3, "weights": {"w": torch.zeros(1)}}, tmp_path / "bad/list.pt")
    with pytest.raises(NeuronsError, match=r"keys 'epoch', 'weights'.*'model_state_dict'"):
        read_weights(torch.load(tmp_path / "bad/list.pt"), tmp_path / "bad/list.pt")
    other = SmallCNN(widths=[4, 8, 16]).state_dict()
    (tmp_path / "other").mkdir()
    torch.save(other, tmp_path / "other/epoch_0.pt")
    with pytest.raises(
        NeuronsError, match=r"not of the config's model.*conv3.weight \(16, 8, 3, 3\)"
    ):
        analyze_checkpoints(trainer, model, data, tmp_path / "other", progress=False)


def test_a_timm_training_analysed_through_the_cli(tmp_path):
    """A config whose backbone is ``timm_model`` (``timm.create_model`` by name), and the files a
    timm training writes (``checkpoint-<epoch>.pth.tar``, with ``state_dict`` and ``epoch``)."""
    import timm
    import yaml

    from lightning_neurons.cli import main

    folder = tmp_path / "output"
    folder.mkdir()
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    for epoch in (0, 1):
        torch.nn.init.normal_(net.fc.weight)  # each epoch's own head
        state = {"epoch": epoch, "arch": "resnet10t", "state_dict": net.state_dict()}
        torch.save(state, folder / f"checkpoint-{epoch}.pth.tar")
    layer = "backbone.layer4"
    config = {
        "trainer": {
            "accelerator": "cpu",
            "limit_val_batches": 1,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "timm"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_neurons.ActivationTracker",
                    "init_args": {"layers": [layer], "on_error": "raise"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_neurons.models.ImageClassifier",
            "init_args": {
                "backbone": {
                    "class_path": "lightning_neurons.models.timm_model",
                    "init_args": {"name": "resnet10t", "num_classes": 10, "in_chans": 1},
                },
                "num_classes": 10,
            },
        },
        "data": {
            "class_path": "lightning_neurons.data.DigitsDataModule",
            "init_args": {"image_size": 16, "batch_size": 32},
        },
    }
    path = tmp_path / "timm.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["analyze", "--config", str(path), "--ckpt_path", str(folder)])
    run = load_run(tmp_path / "runs/timm/version_0")
    assert run.epochs == [0, 1]
    assert run.results("ActivationTracker", epoch=1)[layer].class_means.shape == (10, 512)


def test_timm_model_names_what_timm_knows():
    from lightning_neurons.models import timm_model

    net = timm_model("resnet10t", num_classes=3, in_chans=1, options={"drop_rate": 0.1})
    assert net(torch.rand(2, 1, 16, 16)).shape == (2, 3)
    with pytest.raises(
        NeuronsError, match="timm knows no model 'resnet10x'; close names: .*resnet10t"
    ):
        timm_model("resnet10x")
