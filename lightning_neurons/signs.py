"""Which layers never output a negative value: a neuron's mean there is positive when its peak is.

:class:`~lightning_neurons.ActivationTracker` counts a neuron as firing on an image when its largest
value over the positions (its peak) is positive. Reading the peak takes a second reduction of
every tracked output, besides the mean: on a GPU, a kernel launch per layer and batch, which the
host pays for at every step. Where an output is never negative, the mean is positive exactly
when the peak is (a floating-point sum of non-negative terms is at least its largest term), so
the mean says whether the neuron fired and the second reduction is left out. A layer is known
never negative when its module is one of :data:`NON_NEGATIVE` (``nn.ReLU``, ``nn.ReLU6``,
``nn.Sigmoid``, ...) or it is a function layer of one of :data:`NON_NEGATIVE_OPS`
(``"backbone.relu()"``, the ``F.relu`` calls of a tutorial model).

A module that contains such modules is known never negative when, in one forward pass of two
images of the first tracked batch (once per fit, without gradients, the model left as it was:
:func:`~lightning_neurons.state.untouched`), every call of it returned the very tensor that such
a module inside it returned last, unchanged since (its version counter): the last
``self.relu(out)`` of a ResNet block, a stage of such blocks. A block that changes that tensor in
place before returning it, or returns anything else, keeps its peaks; so does every layer when
that forward pass fails. Float16 outputs keep their peaks: a mean of small values can round to
zero in float16 (in float32 and bfloat16 only a mean below about 1e-38 would).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_neurons.functional import is_function_layer, split_function_layer
from lightning_neurons.hooks import get_module, split_call
from lightning_neurons.outputs import element, split_element
from lightning_neurons.state import untouched

#: torch's modules whose outputs are never negative (these classes exactly: a subclass may
#: compute something else).
NON_NEGATIVE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softmax,
    nn.Softmax2d,
)
#: Functional ops whose results are never negative.
NON_NEGATIVE_OPS: frozenset[str] = frozenset(
    {"relu", "relu6", "sigmoid", "hardsigmoid", "softplus", "softmax"}
)


def never_negative(model: nn.Module, layer: str) -> bool:
    """Whether ``layer`` (a module name, call site or function layer of ``model``) is a
    never-negative module or op.

    Example:
        >>> never_negative(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "1")
        True
    """
    name = split_call(layer)[0]
    if is_function_layer(name):
        return split_function_layer(name)[1] in NON_NEGATIVE_OPS
    return type(get_module(model, name)) in NON_NEGATIVE  # a subclass may change the forward


def never_negative_layers(
    model: nn.Module, layers: Sequence[str], forward: Callable[[], object]
) -> set[str]:
    """The module names of the entries of ``layers`` known never negative, by type
    (:func:`never_negative`) or seen in one run of ``forward()`` (:func:`_returned`)."""
    typed = {split_call(n)[0] for n in layers if never_negative(model, n)}
    return typed | _returned(model, layers, forward)


def _returned(model: nn.Module, layers: Sequence[str], forward: Callable[[], object]) -> set[str]:
    """The module names of ``layers`` that, in one run of ``forward()`` (run here without
    gradients, inside :func:`~lightning_neurons.state.untouched`), returned in every call the
    unchanged output of the last never-negative module that ran inside them; ``forward()``
    runs once, whether there is anything to watch or not. Empty when ``forward()`` raises:
    nothing is known then."""
    last: list[tuple[torch.Tensor, int]] = []
    returned: dict[str, bool] = {}

    def witness(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            last[:] = [(output, output._version)]

    def returns(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = element(output, split_element(name)[1], name)[0]  # no index: the first
            same = bool(last) and tensor is last[0][0] and tensor._version == last[0][1]
            returned[name] = returned.get(name, True) and same

        return hook

    names = {split_call(n)[0] for n in layers}
    handles = []
    try:
        for name in sorted(n for n in names if not is_function_layer(n)):
            module = get_module(model, name)
            inner = [m for m in module.modules() if m is not module and type(m) in NON_NEGATIVE]
            if inner:
                handles += [m.register_forward_hook(witness) for m in inner]
                handles.append(module.register_forward_hook(returns(name)))
        # run even with nothing to watch: the caller's forward may watch more (grouped.py)
        with untouched(model), torch.no_grad():
            forward()
    except Exception:  # noqa: BLE001 - a failed probe tells nothing: every layer keeps its peaks
        return set()
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    return {name for name, same in returned.items() if same}
