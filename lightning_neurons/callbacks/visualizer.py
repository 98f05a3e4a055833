"""FeatureVisualizer: what each channel and class prefers, and where the model looks, every epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_neurons.callbacks._base import (
    AnalysisCallback,
    OnError,
    check_choice,
    check_positive_int,
)
from lightning_neurons.callbacks.tracker import ActivationTracker, extract_labels, infer_num_classes
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import (
    get_module,
    hooked,
    reduce_activation,
    resolve_layers,
    selects,
    split_call,
)
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.stats import LayerStats
from lightning_neurons.visualize.objectives import LOGITS, Channel, ClassLogit
from lightning_neurons.visualize.render import analysis_mode, check_objectives, model_device, render
from lightning_neurons.visualize.saliency import METHODS, Method, saliency

InputTransform = Callable[[torch.Tensor], torch.Tensor]
IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")


def batch_images(batch: Any) -> torch.Tensor | None:
    """The ``[B, C, H, W]`` images of a batch (``batch[0]`` or an image key of a mapping), or None."""
    if isinstance(batch, Mapping):
        images = next((batch[k] for k in IMAGE_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
    else:
        images = batch
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        return images
    return None


def find_optional_tracker(trainer: Trainer) -> ActivationTracker | None:
    """The trainer's first :class:`ActivationTracker`, or ``None``."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, ActivationTracker)), None)


def _check_number(name: str, value: object, low: float = 0.0, strict: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (value <= low if strict else value < low)
    ):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise NeuronsError(f"`{name}` must be a number {bound}, got {value!r}")
    return float(value)


def _strength_label(channel: int, strength: float, activation: float, reference: float) -> str:
    """``"12: 3.1x"``; where the validation maximum is not positive (no ratio): ``"12: > max"``."""
    if math.isfinite(strength):
        return f"{channel}: {strength:.1f}x"
    return f"{channel}: {'>' if activation > reference else '<='} max"


class FeatureVisualizer(AnalysisCallback):
    """Renders what channels and classes prefer, and saliency maps of probe images, every epoch.

    Every ``every_n_epochs`` (after validation; on rank zero) the callback

    - renders, by batched gradient ascent (:func:`~lightning_neurons.visualize.render`), one image
      for each chosen channel of each chosen layer, and one for each class (its logit);
    - computes saliency maps (``saliency`` methods) for a fixed set of probe images taken from
      the validation batches Lightning already runs (by default the first image of each class;
      at most ``max_probes`` images are kept), shown over the image with the predicted and true
      label;
    - logs labelled image grids to TensorBoard under stable tags (``preference/<layer>``,
      ``preference/classes``, ``focus/<method>``), so TensorBoard's step slider shows the images
      evolving over the epochs, and writes the images to files
      (``<log_dir>/neurons/preference/epoch=EEE/<layer>.npz``, ``classes.npz``, and
      ``focus/epoch=EEE/saliency.npz``);
    - measures how strong each rendered channel image is: the activation it reaches divided by
      the largest activation of that channel on the real validation data, as recorded by an
      attached :class:`ActivationTracker` (same layer, same ``reduction``). Without a tracker,
      or for a layer it does not track, ``strength`` is ``None`` (only the raw activation is
      kept): a maximum over a few probe images would overstate it. The scalars
      ``preference/<layer>/strength_median`` and ``preference/<layer>/above_max_fraction`` (share of
      images driving their channel above every validation image) are logged.

    The model is left exactly as found (training mode, gradients, ``requires_grad``, hooks, RNG
    states), so a seeded run gives the same weights with or without this callback.

    After each round the results are in :attr:`results` (other analyses, e.g. neuron
    clustering's projector sprites, read them):

    ``results[layer]`` (one entry per layer, and ``results["classes"]`` for the class images):
    ``{"channels": LongTensor[N]`` (channel or class indices), ``"images": Tensor[N, C, H, W]``
    (display images in [0, 1], CPU), ``"activation": Tensor[N]`` (the value each image reaches:
    the channel's activation with the tracker's reduction, or the class logit),
    ``"reference": Tensor[N] | None`` (the channel's largest activation on the validation data,
    from the tracker), ``"strength": Tensor[N] | None`` (activation / reference; NaN where the
    reference is not positive, e.g. a conv layer before its BatchNorm), ``"epoch": int}``; ``results["classes"]`` also has
    ``"probability"`` (softmax probability of the class for its image) and ``"predicted"``.

    :attr:`saliency_results`: ``{"images": [P, C, H, W], "labels": [P], "predicted": [P],
    "maps": {method: [P, H, W]}, "epoch": int}``.

    Args:
        layers: Layers whose channels are rendered (names or glob patterns). Default: the
            attached tracker's layers, else the default layers (activations and block outputs).
        channels: Per layer, the channel indices to render (``{"features.conv2": [0, 5, 9]}``);
            layers not listed get their first ``max_channels`` channels.
        max_channels: Render the first ``max_channels`` channels of each layer (``None``: all).
        classes: Classes to render (default: all; ``[]``: none).
        saliency: Saliency methods for the probe images, from ``"gradient"``, ``"smoothgrad"``
            and ``"gradcam"`` (``[]``: none).
        gradcam_layer: Grad-CAM's layer; default: the model's last Conv2d.
        probes_per_class: Probe images kept per class (the first ones seen in validation).
        max_probes: At most this many probe images in all.
        image_shape: ``(C, H, W)`` of the rendered images; default: the data module's
            ``image_shape``, else the probe images' shape.
        input_transform: Display image -> model input; default: the data module's
            ``input_transform`` attribute, else none.
        steps: Gradient-ascent steps per image.
        lr: Adam's learning rate.
        param: ``"fft"`` or ``"pixel"`` parametrization.
        transforms: ``"standard"`` random jitter, scale and rotation, or ``"none"``.
        l2: Weight of an L2 penalty on the rendered images.
        tv: Weight of a total-variation penalty on the rendered images.
        seed: Seed of the rendering (same seed: same starting images every epoch).
        batch_size: Render at most this many images at once (default: a layer at once).
        smoothgrad_samples: Noisy copies per probe image for SmoothGrad.
        every_n_epochs: Visualize after every n-th epoch.
        enable_logging: Log figures and scalars and write files (``False``: only fill
            :attr:`results`).
        on_error: ``"warn"``: a failing round is reported and training goes on; ``"raise"``.

    Raises:
        NeuronsError: For bad arguments; at setup for unknown layers; at the first round for
            channel or class indices outside the layers' real widths.

    Example:
        >>> trainer = Trainer(callbacks=[ActivationTracker(), FeatureVisualizer(max_channels=16)])  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        channels: dict[str, list[int]] | None = None,
        max_channels: int | None = 16,
        classes: list[int] | None = None,
        saliency: Sequence[Method] = ("gradient", "smoothgrad", "gradcam"),
        gradcam_layer: str | None = None,
        probes_per_class: int = 1,
        max_probes: int = 16,
        image_shape: list[int] | None = None,
        input_transform: InputTransform | None = None,
        steps: int = 64,
        lr: float = 0.1,
        param: Literal["fft", "pixel"] = "fft",
        transforms: Literal["standard", "none"] = "standard",
        l2: float = 0.0,
        tv: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        smoothgrad_samples: int = 16,
        every_n_epochs: int = 1,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, on_error=on_error)
        if isinstance(layers, str):
            layers = [layers]
        self.layer_patterns = None if layers is None else list(layers)
        self.channels = self._check_channels(channels)
        self.max_channels = (
            None if max_channels is None else check_positive_int("max_channels", max_channels)
        )
        self.classes = None if classes is None else self._check_indices("classes", classes)
        if isinstance(saliency, str):
            saliency = [saliency]  # type: ignore[list-item]
        self.saliency_methods = [check_choice("saliency", m, METHODS) for m in saliency]
        self.gradcam_layer = gradcam_layer
        self.probes_per_class = check_positive_int("probes_per_class", probes_per_class)
        self.max_probes = check_positive_int("max_probes", max_probes)
        self.image_shape = None if image_shape is None else self._check_shape(image_shape)
        self.input_transform = input_transform
        self.steps = check_positive_int("steps", steps)
        self.lr = _check_number("lr", lr, strict=True)
        self.param = check_choice("param", param, ("fft", "pixel"))
        self.transforms = check_choice("transforms", transforms, ("standard", "none"))
        self.l2 = _check_number("l2", l2)
        self.tv = _check_number("tv", tv)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise NeuronsError(f"`seed` must be an integer, got {seed!r}")
        self.seed = seed
        self.batch_size = (
            None if batch_size is None else check_positive_int("batch_size", batch_size)
        )
        self.smoothgrad_samples = check_positive_int("smoothgrad_samples", smoothgrad_samples)
        self.enable_logging = enable_logging
        self.layers: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.saliency_results: dict[str, Any] = {}
        #: Seconds the last round took (rendering, saliency and logging).
        self.last_seconds: float | None = None
        self._probe_images: list[torch.Tensor] = []
        self._probe_labels: list[int] = []
        self._probes_full = False
        self._seen_shape: tuple[int, ...] | None = None
        self._no_labels_warned = False
        self._plan: dict[str, Any] | None = None
        self._num_classes: int | None = None

    # ---- argument checks -----------------------------------------------------------------------

    @staticmethod
    def _check_indices(name: str, values: Sequence[int]) -> list[int]:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise NeuronsError(f"`{name}` must be a list of non-negative integers, got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise NeuronsError(
                    f"`{name}` must hold non-negative integers, got {v!r} in {list(values)!r}"
                )
        return list(dict.fromkeys(values))

    def _check_channels(self, channels: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
        if channels is None:
            return {}
        if not isinstance(channels, Mapping):
            raise NeuronsError(
                f"`channels` must map layer names to channel lists, e.g. {{'features.conv2': [0, 5]}}; "
                f"got {channels!r}"
            )
        return {str(k): self._check_indices(f"channels[{k!r}]", v) for k, v in channels.items()}

    @staticmethod
    def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
        if len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
        ):
            raise NeuronsError(f"`image_shape` must be [channels, height, width], got {shape!r}")
        return tuple(shape)  # type: ignore[return-value]

    # ---- Lightning hooks -----------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        tracker = find_optional_tracker(trainer)
        patterns = self.layer_patterns
        if patterns is None and tracker is not None:
            patterns = tracker.layer_patterns
        self.layers = resolve_layers(pl_module, patterns)
        unknown = [name for name in self.channels if not selects(self.layers, name)]
        if unknown:
            raise NeuronsError(
                f"FeatureVisualizer: `channels` names layers {unknown} that are not visualized; "
                f"the visualized layers are {self.layers} (set `layers=` to include them)"
            )
        if "gradcam" in self.saliency_methods and self.gradcam_layer is not None:
            get_module(pl_module, self.gradcam_layer)
        self._plan = None

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._seen_shape is None:
            images = batch_images(batch)
            self._seen_shape = None if images is None else tuple(images.shape[1:])
        if self._probes_full or dataloader_idx != 0 or not self.saliency_methods:
            return
        self._collect_probes(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._due(trainer):
            return
        tracker = find_optional_tracker(trainer)
        stats = tracker.finalize(trainer) if tracker is not None else {}  # every rank (DDP sync)
        reduction = tracker.reduction if tracker is not None else "mean"
        self._prepare(trainer, pl_module)  # configuration errors raise, on every rank
        if not trainer.is_global_zero:
            return
        self._run_safely(
            "feature visualization", lambda: self._visualize(trainer, pl_module, stats, reduction)
        )

    # ---- probes --------------------------------------------------------------------------------

    def _collect_probes(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        images = batch_images(batch)
        try:
            labels = extract_labels(batch)
        except NeuronsError as err:
            labels = None
            if not self._no_labels_warned:
                self._no_labels_warned = True
                rank_zero_warn(
                    f"FeatureVisualizer: no labels in the validation batches ({err}); saliency probes are skipped."
                )
        if images is None or labels is None:
            self._probes_full = True
            return
        counts: dict[int, int] = {}
        for label in self._probe_labels:
            counts[label] = counts.get(label, 0) + 1
        for i, label in enumerate(labels.tolist()):
            if len(self._probe_labels) >= self.max_probes:
                break
            if counts.get(label, 0) < self.probes_per_class:
                counts[label] = counts.get(label, 0) + 1
                with torch.inference_mode(False):
                    self._probe_images.append(images[i].detach().to("cpu", torch.float32).clone())
                self._probe_labels.append(int(label))
        num_classes = self._classes_count(trainer, pl_module)
        enough = (
            num_classes is not None
            and len(self._probe_labels) >= num_classes * self.probes_per_class
        )
        self._probes_full = len(self._probe_labels) >= self.max_probes or enough

    def _classes_count(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        if self._num_classes is None:
            dm = getattr(trainer, "datamodule", None)
            count = getattr(dm, "num_classes", None)
            self._num_classes = (
                count if isinstance(count, int) and count > 0 else infer_num_classes(pl_module)
            )
        return self._num_classes

    # ---- planning (first round) ----------------------------------------------------------------

    def _data_attr(self, trainer: Trainer, name: str) -> Any:
        return getattr(getattr(trainer, "datamodule", None), name, None)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve image shape, input transform, channels and classes; check them with one probe."""
        if self._plan is not None:
            return
        shape = self.image_shape or self._data_attr(trainer, "image_shape")
        if shape is None:
            shape = self._seen_shape
        if shape is None:
            raise NeuronsError(
                "FeatureVisualizer cannot tell the image size: the data module has no `image_shape` "
                "and no validation images were seen. Pass `image_shape=[C, H, W]`."
            )
        shape = self._check_shape(list(shape))
        transform = self.input_transform or self._data_attr(trainer, "input_transform")
        probe = [ClassLogit(c) for c in (self.classes or [])]
        probe += [Channel(layer, i) for layer in self.layers for i in self.channels.get(layer, [])]
        probe += [Channel(split_call(layer)[0], 0) for layer in self.layers]
        shapes = check_objectives(pl_module, probe, shape, input_transform=transform)
        # The layer list becomes the call sites it selects (one per call of a shared module).
        self.layers = [n for n in shapes if n != LOGITS and selects(self.layers, n)]
        channels = {
            layer: self.channels.get(layer)
            or list(range(min(shapes[layer][0], self.max_channels or shapes[layer][0])))
            for layer in self.layers
        }
        classes = self.classes if self.classes is not None else list(range(shapes[LOGITS][0]))
        names = self._data_attr(trainer, "class_names")
        self._plan = {
            "shape": shape,
            "transform": transform,
            "channels": channels,
            "classes": classes,
            "class_names": list(names) if names else None,
            "gradcam_layer": self.gradcam_layer,
        }

    # ---- one round -----------------------------------------------------------------------------

    def _render(self, model: nn.Module, objectives: list) -> torch.Tensor:
        plan = self._plan
        assert plan is not None
        return render(
            model,
            objectives,
            image_shape=plan["shape"],
            steps=self.steps,
            lr=self.lr,
            param=self.param,  # type: ignore[arg-type]
            transforms=self.transforms,  # type: ignore[arg-type]
            input_transform=plan["transform"],
            seed=self.seed,
            batch_size=self.batch_size,
            l2=self.l2,
            tv=self.tv,
        ).cpu()

    def _layer_activation(
        self,
        model: nn.Module,
        layer: str,
        images: torch.Tensor,
        channels: list[int],
        reduction: str,
    ) -> torch.Tensor:
        """Each image's activation of its channel, reduced like the tracker's statistics."""
        assert self._plan is not None
        found: dict[str, torch.Tensor] = {}

        def keep(name: str, output: torch.Tensor) -> None:
            found.setdefault(
                name, reduce_activation(output.detach(), reduction, name).float().cpu()
            )

        transform = self._plan["transform"]
        with analysis_mode(model), torch.no_grad(), hooked(model, [layer], keep):
            x = images.to(model_device(model))
            model(transform(x) if transform is not None else x)
        values = found[layer]
        return values[torch.arange(len(channels)), torch.tensor(channels)]

    def _visualize(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stats: Mapping[str, LayerStats],
        reduction: str,
    ) -> None:
        start = time.perf_counter()
        plan = self._plan
        assert plan is not None
        epoch = trainer.current_epoch
        results: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            channels = plan["channels"][layer]
            images = self._render(pl_module, [Channel(layer, i) for i in channels])
            activation = self._layer_activation(pl_module, layer, images, channels, reduction)
            strength = reference = None
            if layer in stats and stats[layer].num_neurons > max(channels):
                reference = stats[layer].max_activation[channels].float()
                nan = torch.full_like(activation, math.nan)
                strength = torch.where(reference > 0, activation / reference, nan)
            results[layer] = {
                "channels": torch.tensor(channels),
                "images": images,
                "activation": activation,
                "reference": reference,
                "strength": strength,
                "epoch": epoch,
            }
        if plan["classes"]:
            results["classes"] = self._classes(pl_module, plan["classes"], epoch)
        self.results = results
        if self.saliency_methods and self._probe_images:
            self.saliency_results = self._saliency(pl_module, epoch)
        if self.enable_logging:
            self._log(trainer)
        self.last_seconds = time.perf_counter() - start

    def _classes(self, model: nn.Module, classes: list[int], epoch: int) -> dict[str, Any]:
        plan = self._plan
        assert plan is not None
        images = self._render(model, [ClassLogit(c) for c in classes])
        with analysis_mode(model), torch.no_grad():
            x = images.to(model_device(model))
            transform = plan["transform"]
            logits = model(transform(x) if transform is not None else x).float().cpu()
        index = torch.tensor(classes)
        rows = torch.arange(len(classes))
        return {
            "channels": index,
            "images": images,
            "activation": logits[rows, index],
            "reference": None,
            "strength": None,
            "probability": logits.softmax(dim=1)[rows, index],
            "predicted": logits.argmax(dim=1),
            "epoch": epoch,
        }

    def _saliency(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        plan = self._plan
        assert plan is not None
        images = torch.stack(self._probe_images)
        labels = torch.tensor(self._probe_labels)
        transform = plan["transform"]
        with analysis_mode(model), torch.no_grad():
            x = images.to(model_device(model))
            predicted = model(transform(x) if transform is not None else x).argmax(dim=1).cpu()
        maps = {
            method: saliency(
                model,
                images,
                method,  # type: ignore[arg-type]
                target=predicted,
                layer=plan["gradcam_layer"],
                input_transform=transform,
                samples=self.smoothgrad_samples,
                seed=self.seed,
            )
            for method in self.saliency_methods
        }
        return {
            "images": images,
            "labels": labels,
            "predicted": predicted,
            "maps": maps,
            "epoch": epoch,
        }

    # ---- logging -------------------------------------------------------------------------------

    def _log(self, trainer: Trainer) -> None:
        out = AnalysisLogger(trainer, "preference", owner=self)
        if not out.is_writer:
            return
        self._log_preference(out)
        if self.saliency_results:
            self._log_focus(AnalysisLogger(trainer, "focus", owner=self))

    def _grid_labels(self, key: str, res: dict[str, Any]) -> tuple[list[str], str]:
        """Per-image labels and a title for one entry of :attr:`results`."""
        assert self._plan is not None
        names = self._plan["class_names"]
        channels = res["channels"].tolist()
        epoch = res["epoch"]
        if key == "classes":
            probability = res["probability"].tolist()
            labels = [
                f"{names[c] if names and c < len(names) else c}: p={p:.2f}"
                for c, p in zip(channels, probability, strict=True)
            ]
            return labels, f"classes, epoch {epoch}: class: softmax probability of the image"
        if res["strength"] is None:
            return [f"ch {c}" for c in channels], f"{key}, epoch {epoch}: preferred images"
        values = zip(
            channels,
            res["strength"].tolist(),
            res["activation"].tolist(),
            res["reference"].tolist(),
            strict=True,
        )
        labels = [_strength_label(*v) for v in values]
        return labels, f"{key}, epoch {epoch}: channel: activation / its max on the validation data"

    def _log_preference(self, out: AnalysisLogger) -> None:
        from lightning_neurons.plots.images import image_grid

        scalars: dict[str, float] = {}
        for key, res in self.results.items():
            labels, title = self._grid_labels(key, res)
            out.figure(out.tag(key), image_grid(res["images"], labels, title=title))
            if res["strength"] is not None:
                above = (res["activation"] > res["reference"]).double().mean()
                scalars[out.tag(key, "above_max_fraction")] = float(above)
                finite = res["strength"][torch.isfinite(res["strength"])]
                if finite.numel():
                    scalars[out.tag(key, "strength_median")] = float(finite.median())
                    out.histogram(out.tag(key, "strength"), finite)
            arrays = {k: v for k, v in res.items() if isinstance(v, torch.Tensor)}
            meta = {"layer": key, "epoch": res["epoch"], "steps": self.steps}
            out.save_arrays(key, arrays, meta=meta)
        out.scalars(scalars)

    def _log_focus(self, out: AnalysisLogger) -> None:
        from lightning_neurons.plots.images import saliency_grid

        assert self._plan is not None
        res = self.saliency_results
        for method, maps in res["maps"].items():
            fig = saliency_grid(
                res["images"],
                maps,
                res["predicted"],
                res["labels"],
                class_names=self._plan["class_names"],
                title=f"{method} saliency, epoch {res['epoch']}",
            )
            out.figure(out.tag(method), fig)
        arrays = {k: res[k] for k in ("images", "labels", "predicted")}
        arrays.update({f"map_{m}": v for m, v in res["maps"].items()})
        meta = {"methods": list(res["maps"]), "epoch": res["epoch"]}
        out.save_arrays("saliency", arrays, meta=meta)
