"""Finding named layers and hooking them, always removing the hooks again.

Every analysis in this package reaches into the user's model through this module: layer names
are resolved once (with glob patterns and a helpful error), and forward hooks live only inside a
context manager that removes them in ``finally``.

**A layer is a call site** (:mod:`lightning_neurons.call_sites`): a module run twice in one
forward pass is two layers, ``layer1.0.relu`` and ``layer1.0.relu#1``; in a layer list a module
name selects every call. Calls are counted from the start of each forward pass of the hooked
model (and from :meth:`HookSet.new_pass`).

A module that returns a tuple is read at its first tensor with a row per image; ``name[i]``
names the element ``i`` of its output (``"blocks.0[1]"``, ``"blocks.*[1]"``; see
:mod:`lightning_neurons.outputs`), before the call part: ``"blocks.0[1]#1"``.

Calls of activation *functions* (``F.relu(x)`` in a module's ``forward``) are layers too, named
``"<module>.relu()"`` (see :mod:`lightning_neurons.functional`), and every output is handed to the
analyses channels first, transformer tokens ``[B, N, D]`` as ``[B, D, N]`` (see
:mod:`lightning_neurons.layouts`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_neurons.activations import ActivationRule
from lightning_neurons.call_sites import CALL_SEPARATOR as CALL_SEPARATOR
from lightning_neurons.call_sites import call_matcher
from lightning_neurons.call_sites import call_site as call_site
from lightning_neurons.call_sites import exact_call_site as exact_call_site
from lightning_neurons.call_sites import parse_call_site as parse_call_site
from lightning_neurons.call_sites import selects as selects
from lightning_neurons.call_sites import split_call as split_call
from lightning_neurons.defaults import activation_rule, default_layers, layer_order
from lightning_neurons.deferred import Deferral, DeferredCalls, copied, is_compiling
from lightning_neurons.errors import NeuronsError
from lightning_neurons.functional import (
    OPS,
    FunctionCapture,
    is_function_layer,
    split_function_layer,
)
from lightning_neurons.gradients import in_backward, kept_saved_tensors
from lightning_neurons.layouts import (
    from_channels_first,
    layout_of,
    module_layouts,
    sequence_first_modules,
    to_channels_first,
)
from lightning_neurons.outputs import (
    element,
    element_name,
    first_tensor,
    has_tensor,
    image_tensor,
    leading_size,
    split_element,
    with_tensor,
)
from lightning_neurons.state import in_analysis

#: A function called with ``(layer_name, output_tensor)`` from inside a forward hook. When it
#: returns a tensor, that tensor replaces the module's output (the element it was, for tuples:
#: see :func:`~lightning_neurons.outputs.image_tensor`).
ActivationFn = Callable[[str, torch.Tensor], "torch.Tensor | None"]

_GLOB = "*?["


def _describe(model: nn.Module) -> str:
    return type(model).__name__


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
    return shown + (
        f" (a module run twice per forward pass: 'name' and 'name{CALL_SEPARATOR}1'; the second "
        "tensor of a module's tuple: 'name[1]')"
    )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (as in ``model.named_modules()``).

    A call-site name (``"layer1.0.relu#1"``) returns the module that makes that call, an
    element's (``"blocks.0[1]"``) the module that returns it.

    Args:
        model: The model to search.
        name: A dotted module name such as ``"features.conv2"`` or ``"layer4.1.conv2"``,
            optionally with ``#<call>``.

    Returns:
        The module.

    Raises:
        NeuronsError: If no module has that name; the message lists the available names.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> get_module(SmallCNN(), "features.conv1")
        Conv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        >>> get_module(SmallCNN(), "features.relu9")
        Traceback (most recent call last):
        ...
        lightning_neurons.errors.NeuronsError: layer 'features.relu9' not found in SmallCNN. Did you mean: features.relu3, ...
    """
    module_name, call = split_call(name)
    if call is not None and not call.isdigit():
        parse_call_site(name)  # raises with the explanation
    module_name, path = split_element(module_name)
    if path and is_function_layer(module_name):
        raise NeuronsError(
            f"layer {name!r}: a function layer returns one tensor; name it without the index"
        )
    if is_function_layer(module_name):
        return _caller(model, name, module_name)
    if module_name:
        try:  # the attribute path: no walk over every module (hooks are placed at every step)
            return model.get_submodule(module_name)
        except AttributeError:  # not found, or a name that is also a method ("half", "float")
            found = dict(model.named_modules()).get(module_name)
            if found is not None:
                return found
    suffix = element_name("", path) + ("" if call is None else f"{CALL_SEPARATOR}{call}")
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
    if path and not close:
        hint += (
            f" ('[{path[0]}]' at the end names an element of the output of module "
            f"{module_name!r}; for a glob's character class there, write a range: '[1-2]')"
        )
    raise NeuronsError(
        f"layer {name!r} not found in {_describe(model)}.{hint} Available: {_available(model)}"
    )


def _caller(model: nn.Module, name: str, module_name: str) -> nn.Module:
    """The module whose ``forward`` makes the calls of the function layer ``module_name``."""
    caller, op = split_function_layer(module_name)
    if op not in OPS:
        raise NeuronsError(
            f"layer {name!r}: {op!r} is not an activation function that can be a layer; "
            f"'<module>.<op>()' takes one of {', '.join(OPS)}"
        )
    return model if not caller else get_module(model, caller)


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
        >>> from lightning_neurons.models import SmallCNN
        >>> signed_layers(SmallCNN(), ["features.conv1", "features.relu1"])
        ['features.conv1']
    """
    modules = dict(model.named_modules())
    return [n for n in layers if isinstance(modules.get(split_call(n)[0]), SIGNED)]


# ---- resolving names and patterns -----------------------------------------------------------


def _order_key(order: dict[str, float], spec: str) -> tuple[float, int, str]:
    module, call = split_call(spec)
    rank = -1 if call is None else (int(call) if call.isdigit() else 10**9)
    return order.get(split_element(module)[0], float(len(order))), rank, call or ""


def _outermost(names: list[str]) -> list[str]:
    """``names`` less those inside another of them: fnmatch's ``*`` crosses dots, so
    ``"blocks.*[1]"`` matches the blocks (which return the tuple) and everything in them."""
    matched = set(names)
    return [
        n
        for n in names
        if not any(".".join(n.split(".")[:i]) in matched for i in range(1, n.count(".") + 1))
    ]


def resolve_layers(
    model: nn.Module,
    layers: Sequence[str] | None,
    activations: Sequence[str] | ActivationRule | None = None,
) -> list[str]:
    """Resolve layer names and glob patterns to a list of layers, in the model's order.

    Args:
        model: The model whose layers are meant.
        layers: Names as in ``model.named_modules()``, function layers (``"backbone.relu()"``) or
            glob patterns (``"features.*"``, ``"layer?.0.conv1"``, ``"*.relu()"``), each
            optionally with an element of the output (``"blocks.*[1]"``: the outermost modules
            the glob matches, not the modules inside them) and a call part
            (``"layer1.0.relu#1"``, ``"layer*.relu#*"``; see the module docstring); ``None``
            means :func:`default_layers`.
        activations: More activation classes and ops for :func:`default_layers`.

    Returns:
        Layer names (each selecting every call of the module or function) and ``name#call``
        entries, without duplicates, in the model's order. Use :func:`selects` to test a call
        site.

    Raises:
        NeuronsError: If a name or pattern matches nothing, a call part is malformed, or nothing
            is left to track.
    """
    rule = activation_rule(activations)
    if layers is None:
        names = default_layers(model, rule)
        if not names:
            raise NeuronsError(
                f"{_describe(model)} has no activation (a module such as ReLU or GELU, a "
                "parameter-free elementwise rectifier, or a call of F.relu, F.gelu, ... in a "
                "forward) and no block containing one, so there is no default layer. Name the "
                "layers to analyse with `layers=[...]`, or the activation classes with "
                f"`activations=[...]`. Available: {_available(model)}"
            )
        return names
    if isinstance(layers, str):
        layers = [layers]
    order = layer_order(model, rule)
    chosen: list[str] = []
    for pattern in layers:
        module_pattern, call = split_call(pattern)
        if call is not None and not (call.isdigit() or any(ch in call for ch in _GLOB)):
            parse_call_site(pattern)  # raises with the explanation
        if call is not None and call.isdigit():
            call = str(int(call))
        base = split_element(module_pattern)[0]
        if any(ch in base for ch in _GLOB):
            found = fnmatch.filter(order, base)
            if base != module_pattern:  # an element: of the modules that return the tuple
                found = _outermost(found)
            hits = [h + module_pattern[len(base) :] for h in found]
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


# ---- hooks -----------------------------------------------------------------------------------


@contextmanager
def hooked(
    model: nn.Module, layers: Sequence[str], fn: ActivationFn, *, skip_others: bool = False
) -> Iterator[HookSet]:
    """Call ``fn(layer_name, output)`` on every forward of the selected layers, inside the block.

    ``layer_name`` is the call site (``"layer1.0.relu"`` or ``"layer1.0.relu#1"``). The hooks
    are removed when the block exits, also when it raises.

    Args:
        model: The model to hook; calls are counted from the start of each of its forward passes.
        layers: A layer list (see :func:`resolve_layers`).
        fn: Called from inside each forward hook with the module's output tensor. It must not
            keep per-batch tensors alive: reduce or detach inside. A tensor it returns replaces
            the output.
        skip_others: Pass over the calls that return no tensor (a dict, ``None``) rather than
            raise: for hooks on every module of a model.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> model, seen = SmallCNN(), {}
        >>> with hooked(model, ["features.relu1"], lambda n, t: seen.update({n: t.shape})):
        ...     logits = model(torch.rand(2, 1, 16, 16))
        >>> seen
        {'features.relu1': torch.Size([2, 32, 16, 16])}
        >>> model._forward_hooks, model.features.relu1._forward_hooks  # removed
        (OrderedDict(), OrderedDict())
    """
    handles = HookSet()
    try:
        handles.add(model, layers, fn, skip_others=skip_others)
        yield handles
    finally:
        handles.remove()


class HookSet:
    """Forward-hook handles kept together so they can always be removed.

    Used by callbacks whose hooks live across several Lightning hook calls (registered at
    epoch start, removed at epoch end, and again in ``teardown`` / ``on_exception``). It counts
    each hooked module's (and function layer's) calls per forward pass (reset by a pre-hook on
    the model and by :meth:`new_pass`), so that every call site is its own layer, and remembers
    the most calls seen per pass (:attr:`calls`). Outputs reach ``fn`` channels first.

    Args:
        lightning_batches: The hooks watch Lightning's own batches: the forwards an analysis
            makes (inside :func:`~lightning_neurons.state.untouched`, e.g. a check on the
            first batch) are neither counted nor handed on. A batch whose step calls a submodule
            (``self.net(x)``) passes no pre-hook of the model, so an analysis's forward just
            before it would otherwise shift its calls to call sites ``#1``. Traced into a
            compiled forward, such hooks hand what they keep over when the owner calls
            :meth:`replay` at the batch's end (see :mod:`lightning_neurons.deferred`).
    """

    def __init__(self, lightning_batches: bool = False) -> None:
        self.lightning_batches = lightning_batches
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captures: list[FunctionCapture] = []
        self._count: dict[str, int] = {}
        #: ``{module or function layer name: most calls seen in one forward pass}``.
        self.calls: dict[str, int] = {}
        #: The images in the batch going through the model: a tuple's tensor with a row per
        #: image is read (:func:`~lightning_neurons.outputs.image_tensor`). Set from the hooked
        #: model's inputs at each forward pass; set it before a batch whose step calls a
        #: submodule (``self.net(x)``), which passes no pre-hook of the model.
        self.batch_size: int | None = None
        self._deferred = DeferredCalls()
        self._late: dict[str, tuple[Callable[[int], bool], Callable[[str, object], None]]] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def new_pass(self) -> None:
        """Start counting calls afresh (a forward pass of the hooked model does it too)."""
        self._count.clear()

    def _pass_starts(self, _model: nn.Module, args: object, kwargs: object) -> None:
        """The hooked model's pre-hook: a new pass, with the batch size of its inputs."""
        size = leading_size((args, kwargs))
        if self._defers():
            self._deferred.pass_starts(size)
            return
        if self.lightning_batches and in_analysis():
            size = None
        if self._deferred.items:  # a pass after compiled ones in this batch: theirs end here
            self._deferred.pass_starts(size)
        self.new_pass()
        if size is not None:
            self.batch_size = size

    def add(
        self,
        model: nn.Module,
        layers: Sequence[str],
        fn: ActivationFn,
        skip_others: bool = False,
        deferral: Deferral | None = None,
    ) -> None:
        """Register ``fn`` as a forward hook on the modules of the layer list ``layers`` (and
        capture the calls of its function layers); with ``skip_others``, calls that return no
        tensor are passed over (else they raise).

        Hooks on Lightning's batches (``lightning_batches``) traced into a compiled forward
        hand over what ``deferral`` keeps (default: a copy of each output, given to ``fn``)
        when :meth:`replay` is called at the batch's end (see :mod:`lightning_neurons.deferred`).
        """
        early = copied if deferral is None else deferral.early
        wanted: dict[str, list[str | None]] = {}
        for spec in layers:
            get_module(model, spec)
            module_name, call = split_call(spec)
            wanted.setdefault(module_name, []).append(call)
        if not wanted:
            return
        self._handles.append(model.register_forward_pre_hook(self._pass_starts, with_kwargs=True))
        last = module_layouts(model)
        sequence = sequence_first_modules(model)
        functions: dict[str, set[str]] = {}
        matchers = {name: call_matcher(calls) for name, calls in wanted.items()}
        late = fn if deferral is None else deferral.late
        self._late.update({name: (matcher, late) for name, matcher in matchers.items()})
        for module_name in wanted:
            if is_function_layer(module_name):
                caller, op = split_function_layer(module_name)
                functions.setdefault(caller, set()).add(op)
                continue
            module = get_module(model, module_name)
            base, element_path = split_element(module_name)

            def hook(
                _m: nn.Module,
                _inputs: object,
                output: object,
                _name: str = module_name,
                _module: str = base,
                _path: tuple[int, ...] = element_path,
            ) -> object:
                if skip_others and not has_tensor(output):
                    return None
                layouts = (last[_module], _module in sequence)
                if self._defers():
                    self._defer(_name, output, _m, _path, layouts, early)
                    return None
                if _path:
                    tensor, path = element(output, _path, _name)
                else:
                    tensor, path = image_tensor(output, self.batch_size, layouts[1], _name)
                replaced = self._seen(_name, matchers[_name], tensor, _m, layouts, fn)
                return None if replaced is None else with_tensor(output, path, replaced)

            self._handles.append(module.register_forward_hook(hook))
        if functions:

            def on_call(name: str, result: torch.Tensor) -> torch.Tensor | None:
                caller = split_function_layer(name)[0]
                layouts = (last[caller], caller in sequence)
                if self._defers():
                    self._defer(name, result, None, (), layouts, early)
                    return None
                return self._seen(name, matchers[name], result, None, layouts, fn)

            capture = FunctionCapture({c: frozenset(o) for c, o in functions.items()}, on_call)
            self._captures.append(capture)
            self._handles += capture.attach(model)

    @torch.compiler.disable  # bookkeeping: run as written, never traced into a compiled model
    def _seen(
        self,
        name: str,
        matcher: Callable[[int], bool],
        output: torch.Tensor,
        module: nn.Module | None,
        layouts: tuple[bool, bool],
        fn: ActivationFn,
    ) -> torch.Tensor | None:
        """Count a call of layer ``name``; hand a selected one to ``fn`` channels first
        (``layouts``: whether the module's 4-D outputs are channels last, and its 3-D ones
        sequence first)."""
        if self.lightning_batches and in_analysis():
            return None
        if in_backward():  # a checkpointed block's forward recomputed, not another call
            return None
        site = self._call_site(name, matcher)
        if site is None:
            return None
        layout = layout_of(output, module, *layouts)
        view = to_channels_first(output, layout)
        with kept_saved_tensors():
            replaced = fn(site, view)
        if replaced is None and view is output:
            return None
        # a moved axis: the model goes on from the view, so gradients reach what `fn` saw
        return from_channels_first(view if replaced is None else replaced, layout)

    def _call_site(self, name: str, matcher: Callable[[int], bool]) -> str | None:
        """Count a call of layer ``name`` in this pass: its call site, if the list selects it."""
        index = self._count.get(name, 0)
        self._count[name] = index + 1
        self.calls[name] = max(self.calls.get(name, 0), index + 1)
        return call_site(name, index) if matcher(index) else None

    def _defer(
        self,
        name: str,
        output: object,
        module: nn.Module | None,
        path: tuple[int, ...],
        layouts: tuple[bool, bool],
        early: Callable[[str, torch.Tensor], object],
    ) -> None:
        """A hook traced into a compiled forward: keep what ``early`` keeps of layer ``name``'s
        output, channels first, for :meth:`replay` (an output without a tensor is kept as it
        is: its error is raised at the replay, as the eager hook raises it)."""
        if not has_tensor(output):
            self._deferred.output(name, output)
            return
        if path:
            tensor, _ = element(output, path, name)
        else:
            tensor, _ = image_tensor(output, self.batch_size, layouts[1], name)
        view = to_channels_first(tensor, layout_of(tensor, module, *layouts))
        self._deferred.output(name, early(name, view))

    def _defers(self) -> bool:
        """Whether the hook running now is traced into a compiled forward of Lightning's batch."""
        return self.lightning_batches and is_compiling()

    def replay(self) -> None:
        """Hand on what the hooks of compiled forwards kept, as the eager hooks would have:
        call the callers at a Lightning batch's end (nothing to do after eager forwards)."""
        if not self._deferred.items:  # eager forwards: nothing kept
            return
        items = self._deferred.take()
        self.new_pass()
        for name, kept in items:
            if name is None:  # a pass of the hooked model started
                self.new_pass()
                if kept is not None and not in_analysis():
                    self.batch_size = int(kept)  # type: ignore[call-overload]
                continue
            matcher, late = self._late[name]
            site = self._call_site(name, matcher)
            if site is not None:
                if not has_tensor(kept):  # a traced output without a tensor (a dict, None)
                    first_tensor(kept, name)  # raises, as the eager hook does
                late(site, kept)

    def remove(self) -> None:
        """Remove every hook (what compiled forwards kept and was not replayed is dropped);
        safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()
        while self._captures:
            self._captures.pop().leave()
        self._count.clear()
        self._deferred.take()
        self._late.clear()


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
