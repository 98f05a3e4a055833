"""Data modules: the embedded digits data (no download) and torchvision data sets by name.

Every data module here yields ``(x, y)`` batches with ``x`` float ``[B, C, H, W]`` model inputs
and ``y`` int64, and exposes ``num_classes``, ``class_names``, ``image_shape``,
``input_transform`` and ``display_channels``, which the analyses use for their defaults. What
the loaders yield is what the model gets; ``input_transform`` maps a display image (values in
[0, 1]) to a model input (``None`` when they are the same), see :mod:`lightning_neurons.batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_neurons.errors import NeuronsError


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 < value < 1.0:
        raise NeuronsError(f"`{name}` must lie strictly between 0 and 1, got {value!r}")
    return value


class _Augmented(Dataset):
    """A data set of in-memory ``(image, label)`` pairs whose images pass through ``transform``
    each time they are read (a new random draw per epoch)."""

    def __init__(self, data: TensorDataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.data[index]
        return self.transform(image), label


def small_affine(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The demo's training augmentation: a random shift of up to 1/16 of the side, rotation of up
    to 10 degrees and scaling by 0.9-1.1 (torchvision's ``RandomAffine``; the background is 0).

    Digits stay digits under it, and a CNN trained with it generalises more reliably.
    """
    from torchvision.transforms import v2

    shift = 1.0 / 16.0 if image_size >= 16 else 0.0
    return v2.RandomAffine(degrees=10.0, translate=(shift, shift), scale=(0.9, 1.1))


class InMemoryDataModule(pl.LightningDataModule):
    """A data module over images held in memory, split stratified and deterministically.

    Subclasses implement :meth:`load`, returning all images ``[N, C, H, W]`` in [0, 1] and their
    int64 labels ``[N]``; this class splits them into train and validation sets (the test
    loader gives the validation set) and builds the loaders.

    Args:
        batch_size: Batch size of every loader.
        val_fraction: Share of the images held out for validation (and test).
        seed: Seed of the split and of the training shuffle.
        num_workers: DataLoader workers.
        augment: Pass training images through :func:`small_affine` (validation and test images
            are never augmented; the augmentation draws from torch's global RNG, as a
            torchvision transform in a DataLoader does).

    A subclass may set, as class or instance attributes, ``input_transform`` (display image ->
    model input) and ``display_channels`` (which channels of multispectral images the figures
    draw: 3 as RGB or 1 as grey, see :mod:`lightning_neurons.bands`); both default to ``None``.
    """

    input_transform = None
    display_channels: list[int] | None = None

    def __init__(
        self,
        batch_size: int,
        val_fraction: float,
        seed: int,
        num_workers: int,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise NeuronsError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.augment = augment
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels of the data set."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def prepare_data(self) -> None:
        """Nothing to download: the data is embedded or generated."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = self.load()
        train_idx, val_idx = train_test_split(
            range(len(labels)),
            test_size=self.val_fraction,
            stratify=labels.numpy(),
            random_state=self.seed,
        )
        train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def _loader(self, shuffle: bool) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        data: Dataset = self.train_set if shuffle else self.val_set
        if shuffle and self.augment:
            data = _Augmented(data, small_affine(int(self.train_set.tensors[0].shape[-1])))
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes), shipped with
    scikit-learn: no download.

    Images are scaled to [0, 1] and resized to ``image_size`` (bilinear). The train/validation
    split is stratified and deterministic for a ``seed``.

    Args:
        batch_size: Batch size of every loader.
        image_size: Side of the square images fed to the model.
        val_fraction: Share of the images held out for validation (and test).
        seed: Seed of the split and of the training shuffle.
        num_workers: DataLoader workers.
        augment: Randomly shift, rotate and scale the training images a little
            (:func:`small_affine`); the demo config turns it on.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.dtype
        (torch.Size([32, 1, 32, 32]), torch.int64)
    """

    num_classes = 10
    class_names = [str(d) for d in range(10)]

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size, val_fraction, seed, num_workers, augment)
        if image_size < 8:
            raise NeuronsError(f"`image_size` must be >= 8, got {image_size}")
        self.image_size = image_size
        self.image_shape = (1, image_size, image_size)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != 8:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images.clamp(0.0, 1.0), torch.as_tensor(digits.target, dtype=torch.int64)


TorchvisionName = Literal["mnist", "fashionmnist", "cifar10", "cifar100", "imagefolder"]

_SPECS: dict[str, dict] = {
    "mnist": {"cls": "MNIST", "channels": 1, "size": 28, "classes": 10},
    "fashionmnist": {"cls": "FashionMNIST", "channels": 1, "size": 28, "classes": 10},
    "cifar10": {"cls": "CIFAR10", "channels": 3, "size": 32, "classes": 10},
    "cifar100": {"cls": "CIFAR100", "channels": 3, "size": 32, "classes": 100},
}


#: The normalisations people use: ``(mean, std)`` per channel (one value: every channel).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "[-1, 1]": ((0.5,), (0.5,)),
    "0-255": ((0.0,), (1 / 255,)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "CLIP": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "CIFAR-10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR-10 (std 0.2023)": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "CIFAR-100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "MNIST": ((0.1307,), (0.3081,)),
    "Fashion-MNIST": ((0.2860,), (0.3530,)),
}


def known_normalization(images: torch.Tensor) -> tuple[str, Normalize] | None:
    """Which of :data:`NORMALIZATIONS` made the ``[B, C, H, W]`` ``images`` from display images,
    judged by their range: the narrowest whose image of [0, 1] holds every channel's values (to
    0.1% of its width) and of which they span 95% or more; ``None`` when none does.

    Example:
        >>> images = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
        >>> known_normalization((images - 0.5) / 0.5)
        ('[-1, 1]', Normalize(mean=[0.5], std=[0.5]))
    """
    channels = images.shape[1]
    low, high = images.amin(dim=(0, 2, 3)).float().cpu(), images.amax(dim=(0, 2, 3)).float().cpu()
    found: list[tuple[float, str]] = []
    for name, (mean, std) in NORMALIZATIONS.items():
        if len(mean) not in (1, channels):
            continue
        m, s = torch.tensor(mean).expand(channels), torch.tensor(std).expand(channels)
        bottom, top = -m / s, (1 - m) / s
        slack = 1e-3 * (top - bottom)
        inside = (low >= bottom - slack) & (high <= top + slack)
        if bool((inside & (high - low >= 0.95 * (top - bottom))).all()):
            found.append((float((top - bottom).sum()), name))
    if not found:
        return None
    name = min(found)[1]
    return name, Normalize(*NORMALIZATIONS[name])


class Normalize:
    """``(x - mean) / std`` per channel on ``[B, C, H, W]`` tensors (display -> model input).

    Example:
        >>> norm = Normalize((0.5,), (0.25,))
        >>> norm.inverse(norm(torch.ones(1, 1, 2, 2))).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> display image: ``x * std + mean``."""
        return x * self.std.to(x) + self.mean.to(x)

    def __repr__(self) -> str:
        mean, std = ([round(v, 6) for v in t.flatten().tolist()] for t in (self.mean, self.std))
        return f"Normalize(mean={mean}, std={std})"  # float32 noise rounded off


class ByteImages:
    """Display images in [0, 1] -> the 0-255 values of a model fed ``uint8`` images that scales
    them itself (``x.float() / 255`` in its ``forward``); :meth:`inverse` maps inputs back.

    FeatureVisualizer takes it on its own when the validation inputs are ``uint8`` and the model
    reads float inputs as 0-255 values; pass it as ``input_transform`` to say so.

    Example:
        >>> ByteImages()(torch.ones(1, 1, 1, 1)).item()
        255.0
        >>> round(ByteImages().inverse(torch.full((1,), 51, dtype=torch.uint8)).item(), 6)
        0.2
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images * 255

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (``uint8``, or float 0-255) -> display image: ``x / 255``."""
        return x.float() / 255

    def __repr__(self) -> str:
        return "ByteImages()"


class ChannelsLast:
    """Display images ``[B, C, H, W]`` -> the ``[B, H, W, C]`` inputs of a model fed channels-last
    images (it permutes them itself), through ``inner`` first (a :class:`Normalize`, say);
    :meth:`inverse` gives the images back. FeatureVisualizer takes it on its own for inputs with
    1, 3 or 4 channels last and more than 4 rows.

    Example:
        >>> ChannelsLast()(torch.zeros(2, 3, 8, 6)).shape
        torch.Size([2, 8, 6, 3])
    """

    def __init__(self, inner: Normalize | ByteImages | None = None) -> None:
        self.inner = inner

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images if self.inner is None else self.inner(images)).permute(0, 2, 3, 1)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Model input ``[B, H, W, C]`` -> display images ``[B, C, H, W]``."""
        images = x.permute(0, 3, 1, 2)
        return images if self.inner is None else self.inner.inverse(images)

    def __repr__(self) -> str:
        return f"ChannelsLast(inner={self.inner!r})"


class Flatten:
    """Display images ``[B, C, H, W]`` -> the ``[B, C*H*W]`` vectors of a model on flattened
    images (an MLP on MNIST), normalised first with ``normalize``; :meth:`inverse` gives the images
    back, so every analysis shows and renders images for such a model.

    Pass it as FeatureVisualizer's ``input_transform`` (or as the data module's
    ``input_transform`` attribute); the image shape is then read from it.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        normalize: Applied to the images before flattening (for example
            ``Normalize((0.1307,), (0.3081,))``, the MNIST tutorial's).

    Example:
        >>> flat = Flatten((1, 2, 2), Normalize((0.5,), (0.5,)))
        >>> flat(torch.ones(1, 1, 2, 2)).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
        >>> flat.inverse(torch.ones(1, 4)).shape
        torch.Size([1, 1, 2, 2])
    """

    def __init__(self, image_shape: Sequence[int], normalize: Normalize | None = None) -> None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise NeuronsError(f"`image_shape` must be [C, H, W], each >= 1; got {image_shape!r}")
        self.image_shape = shape
        self.normalize = normalize

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images if self.normalize is None else self.normalize(images)).flatten(1)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> display images ``[B, C, H, W]``."""
        images = x.reshape(x.shape[0], *self.image_shape)
        return images if self.normalize is None else self.normalize.inverse(images)

    def __repr__(self) -> str:
        return f"Flatten(image_shape={list(self.image_shape)}, normalize={self.normalize!r})"


class TorchvisionDataModule(pl.LightningDataModule):
    """MNIST, FashionMNIST, CIFAR-10, CIFAR-100 or an ImageFolder, by name.

    The loaders yield what the model gets: floats in [0, 1], or with ``normalize=True`` images
    standardised by the data set's channel means and stds. ``input_transform`` is then that
    :class:`Normalize` (display image -> model input): rendering applies it to its display
    images, and saliency probes taken from the loaders are shown through its ``inverse``; it
    is never applied twice.

    The official training split is split again into train/validation (``val_fraction``); the
    official test split is the test set. An ImageFolder ``root`` holds ``train/`` (and optionally
    ``test/``) with one sub-folder per class.

    Args:
        name: ``"mnist"``, ``"fashionmnist"``, ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.
        root: Folder the data lives in (or is downloaded to).
        download: Download when missing (needs network access).
        batch_size: Batch size.
        image_size: Resize to this square size (default: the data set's own; 64 for ImageFolder).
        val_fraction: Share of the training split used for validation.
        seed: Seed of the split and the shuffle.
        num_workers: DataLoader workers.
        augment: Random crop (padding 4) and, for RGB, horizontal flip of training images.
        normalize: Standardise inputs with the data set's channel means and stds.

    Raises:
        NeuronsError: When the data is not under ``root`` and ``download`` is false.
    """

    display_channels: list[int] | None = None  # 1 or 3 channels: the default colours

    _STATS = {
        "mnist": NORMALIZATIONS["MNIST"],
        "fashionmnist": NORMALIZATIONS["Fashion-MNIST"],
        "cifar10": NORMALIZATIONS["CIFAR-10"],
        "cifar100": NORMALIZATIONS["CIFAR-100"],
        "imagefolder": NORMALIZATIONS["ImageNet"],
    }

    def __init__(
        self,
        name: TorchvisionName = "cifar10",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        image_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 2,
        augment: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        name = name.lower().replace("-", "").replace("_", "")  # type: ignore[assignment]
        if name not in (*_SPECS, "imagefolder"):
            raise NeuronsError(
                f"unknown data set {name!r}; choose one of {', '.join([*_SPECS, 'imagefolder'])}"
            )
        self.name = name
        self.root = Path(root).expanduser()
        self.download = download
        self.batch_size = batch_size
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.augment = augment
        self.normalize = normalize
        spec = _SPECS.get(name, {"channels": 3, "size": 64, "classes": None})
        self.image_size = image_size or spec["size"]
        self.image_shape = (spec["channels"], self.image_size, self.image_size)
        self.num_classes = spec["classes"]
        self.class_names: list[str] | None = None
        mean, std = self._STATS[name]
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = (
            Normalize(mean, std) if normalize else None
        )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        steps = []
        native = _SPECS.get(self.name, {}).get("size")
        if self.image_size != native:
            steps += [T.Resize(self.image_size), T.CenterCrop(self.image_size)]
        if train and self.augment:
            steps.append(T.RandomCrop(self.image_size, padding=4))
            if self.image_shape[0] == 3:
                steps.append(T.RandomHorizontalFlip())
        steps.append(T.ToTensor())
        if self.normalize:
            mean, std = self._STATS[self.name]
            steps.append(T.Normalize(mean, std))
        return T.Compose(steps)

    def _missing(self, err: Exception) -> NeuronsError:
        where = self.root.resolve()
        if self.name == "imagefolder":
            return NeuronsError(
                f"no image folder found at {where / 'train'} ({err}). An ImageFolder root must hold "
                "train/<class name>/*.png (and optionally test/<class name>/...). Set `root:` to "
                "that folder."
            )
        return NeuronsError(
            f"{_SPECS[self.name]['cls']} was not found under {where} ({err}). Pass `download=True` "
            f"(in YAML: `data.init_args.download: true`) to fetch it there, or set `root` to the "
            "folder that holds it. For a run without any download use DigitsDataModule."
        )

    def _make(self, train: bool, transform) -> Dataset:
        import torchvision

        if self.name == "imagefolder":
            folder = self.root / ("train" if train else "test")
            if not train and not folder.exists():
                folder = self.root / "train"
            try:
                return torchvision.datasets.ImageFolder(str(folder), transform=transform)
            except (FileNotFoundError, RuntimeError) as err:
                raise self._missing(err) from err
        cls = getattr(torchvision.datasets, _SPECS[self.name]["cls"])
        try:
            return cls(str(self.root), train=train, download=self.download, transform=transform)
        except RuntimeError as err:
            raise self._missing(err) from err

    def prepare_data(self) -> None:
        if self.download and self.name != "imagefolder":
            self._make(True, None)
            self._make(False, None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full_train = self._make(True, self._transforms(train=True))
        full_eval = self._make(True, self._transforms(train=False))
        self.test_set = self._make(False, self._transforms(train=False))
        classes = getattr(full_train, "classes", None)
        if classes:
            self.class_names = [str(c) for c in classes]
            self.num_classes = len(classes)
        n = len(full_train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, int(round(n * self.val_fraction)))
        self.val_set = Subset(full_eval, order[:n_val])
        self.train_set = Subset(full_train, order[n_val:])

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)
