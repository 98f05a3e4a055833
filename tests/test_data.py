import pytest
import torch

from lightning_neurons import NeuronsError
from lightning_neurons.data import DigitsDataModule, Flatten, Normalize, TorchvisionDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN


def test_digits_batches_split_and_determinism():
    dm = DigitsDataModule(batch_size=16, image_size=24, seed=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 24, 24) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 360
    val_counts = torch.bincount(dm.val_set.tensors[1], minlength=10)
    assert int(val_counts.min()) >= 35  # stratified: every digit about 36 times
    again = DigitsDataModule(batch_size=16, image_size=24, seed=3)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[0], dm.val_set.tensors[0])
    x2, _ = next(iter(again.train_dataloader()))
    assert torch.equal(x, x2)


def test_digits_argument_errors():
    with pytest.raises(NeuronsError, match="`val_fraction` must lie strictly between 0 and 1"):
        DigitsDataModule(val_fraction=1.5)


def test_missing_torchvision_data_says_where_and_how(tmp_path):
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(NeuronsError, match=r"CIFAR10 was not found under .*nowhere.*download=True"):
        dm.setup("fit")
    with pytest.raises(NeuronsError, match="unknown data set 'svhn'"):
        TorchvisionDataModule("svhn")


def test_image_folder(tmp_path):
    from PIL import Image

    for c, name in enumerate(["cat", "dog"]):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20, 20), (100 * c, 10 * i, 50)).save(folder / f"{i}.png")
    dm = TorchvisionDataModule(
        "imagefolder",
        root=str(tmp_path),
        image_size=16,
        batch_size=4,
        num_workers=0,
        normalize=True,
        val_fraction=0.2,
    )
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    assert isinstance(dm.input_transform, Normalize)
    with pytest.raises(NeuronsError, match="no image folder found"):
        TorchvisionDataModule("imagefolder", root=str(tmp_path / "empty")).setup("fit")


def test_models_forward_and_layer_names():
    net = SmallCNN(in_channels=3, num_classes=7, widths=(4, 8))
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 7)
    names = [n for n, _ in net.named_modules()]
    assert {
        "features.conv1",
        "features.bn1",
        "features.relu1",
        "features.conv2",
        "classifier",
    } <= set(names)
    clf = ImageClassifier(net, num_classes=7)
    assert clf(torch.rand(1, 3, 16, 16)).shape == (1, 7)
    assert clf.hparams.num_classes == 7


def test_digits_augmentation_moves_training_images_only():
    plain = DigitsDataModule(batch_size=32, seed=0)
    augmented = DigitsDataModule(batch_size=32, seed=0, augment=True)
    torch.manual_seed(0)
    x, y = next(iter(plain.train_dataloader()))
    xa, ya = next(iter(augmented.train_dataloader()))
    assert torch.equal(y, ya)  # the same shuffle: the augmentation draws from another stream
    assert xa.shape == x.shape and float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    moved = (xa - x).abs().flatten(1).amax(dim=1) > 0.1
    assert moved.float().mean() > 0.5  # most digits shifted, rotated or scaled
    # the ink is kept: an affine map of at most 10 degrees, 1.1x and 2 px keeps the digit inside
    torch.testing.assert_close(xa.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.3, atol=0)
    for a, b in zip(plain.val_dataloader(), augmented.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0])  # validation images are never augmented


def test_flatten_maps_images_to_vectors_and_back():
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = torch.rand(5, 3, 4, 6)
    flat = Flatten((3, 4, 6), norm)
    x = flat(images)
    assert x.shape == (5, 72)
    # the normalised image's values in the order `flatten` reads them (C, then H, then W)
    torch.testing.assert_close(x, norm(images).reshape(5, -1), rtol=0, atol=0)
    # (d - m) / s * s + m in float32: a few ulps of values <= 1
    torch.testing.assert_close(flat.inverse(x), images, atol=1e-6, rtol=0)
    assert torch.equal(Flatten((3, 4, 6)).inverse(images.flatten(1)), images)
    with pytest.raises(NeuronsError, match=r"`image_shape` must be \[C, H, W\]"):
        Flatten((28, 28))
