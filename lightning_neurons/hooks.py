"""Finding named layers and hooking them, always removing the hooks again.

Every analysis in this package reaches into the user's model through this module: layer names
are resolved once (with glob patterns and a helpful error), and forward hooks live only inside a
context manager that removes them in ``finally``.

**A layer is a call site.** A module that runs more than once in one forward pass (torchvision's
``BasicBlock`` calls its ``relu`` twice; a model may share one activation module) is several
layers, never one mixed profile. The first call of a module is named by the module's name
(``layer1.0.relu``), its second call ``layer1.0.relu#1``, its third ``layer1.0.relu#2`` and so
on (:func:`call_site`). A module that runs once is simply its name.

In a *list* of layers (``layers=`` of every callback, :func:`resolve_layers`,
:class:`HookSet`) a module name selects **every** call of that module, each as its own layer;
``name#i`` selects the call ``i`` only (``name#0``: the first call only), and ``name#<glob>``
(``"layer*.relu#1"``, ``"relu#*"``) selects the matching calls of the matching modules. Calls are
counted from the start of each forward pass of the hooked model (and from
:meth:`HookSet.new_pass`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_neurons.errors import NeuronsError

#: A function called with ``(layer_name, output_tensor)`` from inside a forward hook. When it
#: returns a tensor, that tensor replaces the module's output (its first element, for tuples).
ActivationFn = Callable[[str, torch.Tensor], "torch.Tensor | None"]

#: Separates a module's name from the index of its call: ``"layer1.0.relu#1"``.
CALL_SEPARATOR = "#"

#: Activation modules whose outputs are responses (the nonlinearities of CNNs). Gates such as
#: ``Sigmoid`` / ``Hardsigmoid`` and ``Tanh`` are left out: inside blocks they scale other
#: responses rather than being one.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_GLOB = "*?["


def _describe(model: nn.Module) -> str:
    return type(model).__name__


# ---- call sites ------------------------------------------------------------------------------


def call_site(module_name: str, index: int) -> str:
    """The layer name of call ``index`` (0-based) of a module in one forward pass.

    Example:
        >>> call_site("layer1.0.relu", 0), call_site("layer1.0.relu", 1)
        ('layer1.0.relu', 'layer1.0.relu#1')
    """
    return module_name if index == 0 else f"{module_name}{CALL_SEPARATOR}{index}"


def split_call(name: str) -> tuple[str, str | None]:
    """``"m#1" -> ("m", "1")``, ``"m" -> ("m", None)`` (the call part may be a glob)."""
    module, sep, call = name.partition(CALL_SEPARATOR)
    return module, (call if sep else None)


def parse_call_site(name: str) -> tuple[str, int]:
    """The module name and call index of a layer name: ``"m#1" -> ("m", 1)``, ``"m" -> ("m", 0)``.

    Raises:
        NeuronsError: If the part after ``#`` is not a non-negative integer.
    """
    module, call = split_call(name)
    if call is None:
        return module, 0
    if not call.isdigit():
        raise NeuronsError(
            f"layer {name!r}: after {CALL_SEPARATOR!r} comes the index of the module's call in one "
            f"forward pass (0, 1, ...), e.g. '{module}{CALL_SEPARATOR}1' for its second call"
        )
    return module, int(call)


def selects(layers: Sequence[str], name: str) -> bool:
    """Whether the layer list ``layers`` (as returned by :func:`resolve_layers`) selects the call
    site ``name``: a module name selects all its calls, ``m#i`` / ``m#<glob>`` the matching ones.

    Example:
        >>> selects(["layer1.0.relu"], "layer1.0.relu#1"), selects(["layer1.0.relu#0"], "layer1.0.relu#1")
        (True, False)
    """
    module, index = parse_call_site(name)
    for spec in layers:
        spec_module, call = split_call(spec)
        if spec_module == module and (call is None or fnmatch.fnmatchcase(str(index), call)):
            return True
    return False


def _call_matcher(calls: list[str | None]) -> Callable[[int], bool]:
    if any(c is None for c in calls):
        return lambda index: True
    patterns = [c for c in calls if c is not None]
    return lambda index: any(fnmatch.fnmatchcase(str(index), p) for p in patterns)


# ---- names ----------------------------------------------------------------------------------


def _layer_names(model: nn.Module) -> list[str]:
    """Module names that could be layers (torchmetrics metrics and their children left out)."""
    from torchmetrics import Metric

    names: list[str] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(module, Metric):
            skipped.append(name)
        else:
            names.append(name)
    return names


def _available(model: nn.Module, limit: int = 40) -> str:
    names = _layer_names(model)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    shown = shown or "(the model has no sub-modules)"
    return shown + f" (a module run twice per forward pass: 'name' and 'name{CALL_SEPARATOR}1')"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (as in ``model.named_modules()``).

    A call-site name (``"layer1.0.relu#1"``) returns the module that makes that call.

    Args:
        model: The model to search.
        name: A dotted module name such as ``"features.conv2"`` or ``"layer4.1.conv2"``,
            optionally with ``#<call>``.

    Returns:
        The module.

    Raises:
        NeuronsError: If no module has that name; the message lists the available names.

    Example:
        >>> conv = get_module(model, "features.conv1")  # doctest: +SKIP
    """
    module_name, call = split_call(name)
    if call is not None and not call.isdigit():
        parse_call_site(name)  # raises with the explanation
    modules = dict(model.named_modules())
    if module_name in modules and module_name:
        return modules[module_name]
    suffix = "" if call is None else f"{CALL_SEPARATOR}{call}"
    candidates = _layer_names(model)
    close = [
        n for n in candidates if module_name and (module_name in n or n.endswith("." + module_name))
    ]
    close += [
        n
        for n in difflib.get_close_matches(module_name, candidates, n=3, cutoff=0.75)
        if n not in close
    ]
    hint = f" Did you mean: {', '.join(n + suffix for n in close[:5])}?" if close else ""
    raise NeuronsError(
        f"layer {name!r} not found in {_describe(model)}.{hint} Available: {_available(model)}"
    )


# ---- the default layers ----------------------------------------------------------------------


def _is_container(module: nn.Module) -> bool:
    """A Sequential / ModuleList / ModuleDict that runs its children as they are (its class does
    not define its own ``forward``)."""
    if not isinstance(module, _CONTAINERS):
        return False
    return not any(
        "forward" in vars(cls)
        for cls in type(module).__mro__
        if cls not in _CONTAINERS and issubclass(cls, nn.Module) and cls is not nn.Module
    )


def _has_activation(module: nn.Module) -> bool:
    return any(isinstance(m, ACTIVATIONS) for m in module.modules())


def default_layers(model: nn.Module) -> list[str]:
    """The layers whose outputs are *responses*: the outputs of nonlinearities and of blocks.

    The rule, on any ``nn.Module``, walking the module tree from the model down:

    1. an activation module (:data:`ACTIVATIONS`: ReLU, GELU, SiLU, Hardswish, ...) is a layer,
       with every one of its calls (a shared activation module gives one layer per call);
    2. a *block* is a layer and is not walked into: a module that is a direct child of a
       *container* (``nn.Sequential`` / ``ModuleList`` / ``ModuleDict`` running its children as
       they are), has its own ``forward``, contains an activation module and does not contain the
       final classifier (the model's last ``Linear``). Its output is the block's response: the
       post-ReLU output of a ResNet ``BasicBlock`` / ``Bottleneck``, an ``InvertedResidual`` /
       ``MBConv`` / ``CNBlock`` output, a DenseNet dense block's output;
    3. everything else is walked into (the model, a backbone attribute, containers, blocks that
       are not children of a container); ``Conv2d``, ``BatchNorm``, ``Linear`` and other leaves
       are never default layers, so the final classifier's logits are not either.

    So a ResNet gives its stem ReLU and every residual block's output, a VGG its ReLUs (in
    ``features`` and ``classifier``), MobileNet / EfficientNet the stem and head activations and
    every block in between, ConvNeXt its ``CNBlock`` outputs, DenseNet ``relu0``, each dense block
    and each transition's ReLU, :class:`~lightning_neurons.models.SmallCNN` its ReLUs.

    Args:
        model: The model.

    Returns:
        Module names in definition order (each selects all its calls, see the module docstring).
        Empty when the model has no activation module (functional ``F.relu`` only).
    """
    from torchmetrics import Metric

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else None
    found: list[str] = []

    def walk(module: nn.Module, prefix: str, in_container: bool) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, Metric):
                continue
            if isinstance(child, ACTIVATIONS):
                found.append(full)
            elif _is_container(child):
                walk(child, full, in_container=True)
            elif (
                in_container
                and any(True for _ in child.children())
                and _has_activation(child)
                and not any(m is classifier for m in child.modules())
            ):
                found.append(full)
            else:
                walk(child, full, in_container=False)

    if isinstance(model, ACTIVATIONS):
        return []
    walk(model, "", in_container=_is_container(model))
    return found


#: Layers whose outputs are signed values (no nonlinearity after the affine map).
SIGNED: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


def signed_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """The entries of ``layers`` whose module is a convolution, ``Linear`` or normalisation layer:
    their outputs are signed (pre-activation) values, not responses.

    Example:
        >>> signed_layers(model, ["features.conv1", "features.relu1"])  # doctest: +SKIP
        ['features.conv1']
    """
    modules = dict(model.named_modules())
    return [n for n in layers if isinstance(modules.get(split_call(n)[0]), SIGNED)]


# ---- resolving names and patterns -----------------------------------------------------------


def _order_key(order: dict[str, int], spec: str) -> tuple[int, int, str]:
    module, call = split_call(spec)
    rank = -1 if call is None else (int(call) if call.isdigit() else 10**9)
    return order[module], rank, call or ""


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Resolve layer names and glob patterns to a list of layers, in the model's order.

    Args:
        model: The model whose layers are meant.
        layers: Names as in ``model.named_modules()`` or glob patterns (``"features.*"``,
            ``"layer?.0.conv1"``), each optionally with a call part (``"layer1.0.relu#1"``,
            ``"layer*.relu#*"``; see the module docstring); ``None`` means :func:`default_layers`.

    Returns:
        Module names (each selecting every call of the module) and ``module#call`` entries,
        without duplicates, in the model's order. Use :func:`selects` to test a call site.

    Raises:
        NeuronsError: If a name or pattern matches nothing, a call part is malformed, or nothing
            is left to track.
    """
    if layers is None:
        names = default_layers(model)
        if not names:
            raise NeuronsError(
                f"{_describe(model)} has no activation module (ReLU, GELU, ...) and no block "
                "containing one, so there is no default layer: its nonlinearities are functional "
                "(F.relu). Name the layers to analyse with `layers=[...]`. Available: "
                f"{_available(model)}"
            )
        return names
    if isinstance(layers, str):
        layers = [layers]
    all_names = [n for n, _ in model.named_modules() if n]
    order = {n: i for i, n in enumerate(all_names)}
    chosen: list[str] = []
    for pattern in layers:
        module_pattern, call = split_call(pattern)
        if call is not None and not (call.isdigit() or any(ch in call for ch in _GLOB)):
            parse_call_site(pattern)  # raises with the explanation
        if call is not None and call.isdigit():
            call = str(int(call))
        if any(ch in module_pattern for ch in _GLOB):
            hits = fnmatch.filter(all_names, module_pattern)
            if not hits:
                raise NeuronsError(
                    f"layer pattern {pattern!r} matches no module of {_describe(model)}. "
                    f"Available: {_available(model)}"
                )
        else:
            get_module(model, pattern)
            hits = [module_pattern]
        chosen += [h if call is None else f"{h}{CALL_SEPARATOR}{call}" for h in hits]
    if not chosen:
        raise NeuronsError("`layers` is empty; give at least one layer name, or None for defaults")
    # A module name selects all its calls: its `#i` entries are then redundant.
    whole = {c for c in chosen if split_call(c)[1] is None}
    kept = [c for c in dict.fromkeys(chosen) if c in whole or split_call(c)[0] not in whole]
    return sorted(kept, key=lambda spec: _order_key(order, spec))


def reduce_activation(output: torch.Tensor, reduction: str, layer: str = "") -> torch.Tensor:
    """Reduce a layer output to one value per neuron: ``[B, K, H, W] -> [B, K]``.

    Args:
        output: ``[B, K]`` (linear units) or ``[B, K, H, W]`` (conv channels).
        reduction: ``"mean"`` or ``"max"`` over the spatial positions.
        layer: The layer's name, for the error message.

    Returns:
        A ``[B, K]`` tensor.

    Raises:
        NeuronsError: For any other shape.
    """
    if output.dim() == 2:
        return output
    if output.dim() == 4:
        if reduction == "mean":
            return output.mean(dim=(2, 3))
        return output.amax(dim=(2, 3))
    raise NeuronsError(
        f"layer {layer!r} returned a tensor of shape {tuple(output.shape)}; neurons are read from "
        "outputs shaped [B, K] (linear units) or [B, K, H, W] (conv channels). Choose a Conv2d, "
        "Linear or activation layer instead."
    )


def first_tensor(output: object, layer: str = "") -> torch.Tensor:
    """The tensor a module returned (the first one, for modules that return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise NeuronsError(
        f"layer {layer!r} returned {type(output).__name__}, not a tensor; choose a layer whose "
        "output is a tensor shaped [B, K] or [B, K, H, W]"
    )


# ---- hooks -----------------------------------------------------------------------------------


@contextmanager
def hooked(model: nn.Module, layers: Sequence[str], fn: ActivationFn) -> Iterator[HookSet]:
    """Call ``fn(layer_name, output)`` on every forward of the selected layers, inside the block.

    ``layer_name`` is the call site (``"layer1.0.relu"`` or ``"layer1.0.relu#1"``). The hooks
    are removed when the block exits, also when it raises.

    Args:
        model: The model to hook; calls are counted from the start of each of its forward passes.
        layers: A layer list (see :func:`resolve_layers`).
        fn: Called from inside each forward hook with the module's output tensor. It must not
            keep per-batch tensors alive: reduce or detach inside. A tensor it returns replaces
            the output.

    Example:
        >>> seen = {}
        >>> with hooked(model, ["features.conv1"], lambda n, t: seen.update({n: t.shape})):
        ...     model(x)  # doctest: +SKIP
    """
    handles = HookSet()
    try:
        handles.add(model, layers, fn)
        yield handles
    finally:
        handles.remove()


class HookSet:
    """Forward-hook handles kept together so they can always be removed.

    Used by callbacks whose hooks live across several Lightning hook calls (registered at
    epoch start, removed at epoch end, and again in ``teardown`` / ``on_exception``). It counts
    each hooked module's calls per forward pass (reset by a pre-hook on the model and by
    :meth:`new_pass`), so that every call site is its own layer, and remembers the most calls
    seen per pass (:attr:`calls`).
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._count: dict[str, int] = {}
        #: ``{module name: most calls seen in one forward pass}`` of the hooked modules.
        self.calls: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def new_pass(self) -> None:
        """Start counting calls afresh (a forward pass of the hooked model does it too)."""
        self._count.clear()

    def add(self, model: nn.Module, layers: Sequence[str], fn: ActivationFn) -> None:
        """Register ``fn`` as a forward hook on the modules of the layer list ``layers``."""
        wanted: dict[str, list[str | None]] = {}
        for spec in layers:
            get_module(model, spec)
            module_name, call = split_call(spec)
            wanted.setdefault(module_name, []).append(call)
        if not wanted:
            return
        self._handles.append(model.register_forward_pre_hook(lambda *_: self.new_pass()))
        for module_name, calls in wanted.items():
            module = get_module(model, module_name)
            matcher = _call_matcher(calls)

            def hook(
                _module: nn.Module,
                _inputs: object,
                output: object,
                _name: str = module_name,
                _matcher: Callable[[int], bool] = matcher,
            ) -> object:
                index = self._count.get(_name, 0)
                self._count[_name] = index + 1
                self.calls[_name] = max(self.calls.get(_name, 0), index + 1)
                if not _matcher(index):
                    return None
                name = call_site(_name, index)
                replaced = fn(name, first_tensor(output, name))
                if replaced is None:
                    return None
                if isinstance(output, torch.Tensor):
                    return replaced
                return type(output)([replaced, *output[1:]])

            self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook; safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()
        self._count.clear()


def run_layers(model: nn.Module, layers: Sequence[str], forward: Callable[[], object]) -> list[str]:
    """The call sites that the layer list ``layers`` selects in one run of ``forward()``, in the
    order they ran (e.g. to turn module names into the layers ``#1``, ``#2`` of shared modules).

    Raises:
        NeuronsError: If an entry of ``layers`` selects no call that ran (the message lists how
            often its module ran).
    """
    seen: list[str] = []
    with hooked(
        model, layers, lambda name, _t: seen.append(name) if name not in seen else None
    ) as hooks:
        forward()
    for spec in layers:
        if not any(selects([spec], name) for name in seen):
            module, _ = split_call(spec)
            runs = hooks.calls.get(module, 0)
            sites = ", ".join(call_site(module, i) for i in range(runs)) or "none"
            raise NeuronsError(
                f"layer {spec!r} did not run in {_describe(model)}'s forward pass: module "
                f"{module!r} ran {runs} time(s) (its layers: {sites}); choose a layer the forward "
                "pass uses"
            )
    return seen


def count_forward_hooks(model: nn.Module) -> int:
    """Number of forward hooks registered on ``model`` and its sub-modules (for tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class OutputSizes:
    """The leaf modules' output sizes (elements) in the forward passes run while it is hooked.

    Attributes:
        largest: The largest output of any leaf module.
        total: The sum of every leaf module's outputs (roughly what a backward pass keeps).
    """

    def __init__(self) -> None:
        self.largest = 0
        self.total = 0

    def __call__(self, _layer: str, output: torch.Tensor) -> None:
        self.largest = max(self.largest, output.numel())
        self.total += output.numel()


def leaf_output_sizes(model: nn.Module, forward: Callable[[], object]) -> OutputSizes:
    """The output sizes of ``model``'s leaf modules in one run of ``forward()``.

    Every call of a leaf module counts (a module run twice counts twice); a model without
    sub-modules counts its own output.

    Example:
        >>> sizes = leaf_output_sizes(model, lambda: model(x))  # doctest: +SKIP
        >>> sizes.largest, sizes.total  # doctest: +SKIP
    """
    sizes = OutputSizes()
    leaves = [name for name, m in model.named_modules() if name and not any(m.children())]
    with hooked(model, leaves, sizes):
        output = forward()
    if not leaves and isinstance(output, torch.Tensor):
        sizes("", output)
    return sizes
