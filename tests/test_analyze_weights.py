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
