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

Not known: a block that ends in a ReLU (a ResNet block), whose forward could change the ReLU's
result in place before returning it; under ``inference_mode`` (Lightning's validation) no version
counter tells. Float16 outputs keep their peaks: a mean of small values can round to zero in
float16 (in float32 and bfloat16 only a mean below about 1e-38 would).
"""

from __future__ import annotations

from torch import nn

from lightning_neurons.functional import is_function_layer, split_function_layer
from lightning_neurons.hooks import get_module, split_call

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
