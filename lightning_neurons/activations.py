"""Which modules are activations: torch's classes, and any other by one rule.

A module is an **activation module** (its output is a response, and a default layer) when

1. it is one of torch's activation classes in :data:`ACTIVATIONS`; or
2. its class, or the name of its class, is given in ``activations=`` (``"Swish"``,
   ``"timm.layers.activations.GELU"``); or
3. it passes the **rule** below, whatever library it comes from (timm's ``GELU``, a user's own
   ``class Swish(nn.Module)``): it is a leaf module (no children) without parameters or buffers,
   its class is not one of torch's own (those are judged by the list: ``Identity``, ``Dropout``,
   ``Sigmoid`` are not responses), and on a probe tensor of values from -6 to 6 in eval mode its
   output

   * has the input's shape and is **elementwise**: permuting the input's elements permutes the
     output's the same way (a norm, a softmax or a pooling fails this);
   * is **not affine** (an identity, a scaling, a dropout in eval mode fail this);
   * **grows with its input** like a rectifier: its value at 6 is above 3 (the gates, sigmoid,
     tanh and hard-sigmoid, which saturate at 1, fail this, as ``Sigmoid`` is left out of 1.).

   The probe runs once per class and configuration (its ``extra_repr``), without gradients, on
   the model's device, with the module's ``training`` flag and the CPU random state restored.

Limits: a module whose forward needs a particular input (a shape, a dtype, keyword arguments)
fails the probe and is not recognised; an activation with parameters (a learned slope) is not a
leaf without parameters. Name such classes in ``activations=``.

Function names in ``activations=`` (``"sigmoid"``, ``"tanh"``) add those functional ops to the
default layers (see :mod:`lightning_neurons.functional`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_neurons.errors import NeuronsError
from lightning_neurons.functional import OPS, RESPONSE_OPS

#: torch's activation modules whose outputs are responses (the nonlinearities of CNNs). Gates such
#: as ``Sigmoid`` / ``Hardsigmoid`` and ``Tanh`` are left out: inside blocks they scale other
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


def _class_names(cls: type) -> set[str]:
    return {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}


def _is_torch_class(cls: type) -> bool:
    return cls.__module__.startswith("torch.")


def _probe(module: nn.Module, device: torch.device) -> bool:
    """Whether ``module`` acts as an elementwise rectifier on a probe tensor (see the module
    docstring)."""
    x = torch.linspace(-6.0, 6.0, 120, device=device).view(2, 3, 4, 5)
    order = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0)).to(device)
    was = module.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            module.eval()
            out = module(x.clone())
            shuffled = module(x.flatten()[order].view_as(x).clone())
    except Exception:  # any failure on the probe: not recognised by the rule
        return False
    finally:
        module.train(was)
    if not isinstance(out, torch.Tensor) or not isinstance(shuffled, torch.Tensor):
        return False
    if out.shape != x.shape or shuffled.shape != x.shape or not out.is_floating_point():
        return False
    flat = out.flatten().float()
    if not torch.allclose(shuffled.flatten().float(), flat[order], rtol=1e-5, atol=1e-6):
        return False
    curve = flat[1:] - flat[:-1]  # the probe's values rise evenly: affine <=> equal steps
    scale = float(flat.abs().max()) + 1e-6
    if float((curve[1:] - curve[:-1]).abs().max()) <= 1e-5 * scale:
        return False
    return bool(flat[-1] > 3.0)


@dataclass
class ActivationRule:
    """Tells activation modules and the functional ops that are default layers.

    Args:
        names: Extra activation classes and functional ops: class names
            (``"Swish"``), qualified class names (``"timm.layers.activations.GELU"``) or op names
            of :data:`~lightning_neurons.functional.OPS` (``"sigmoid"``).

    Example:
        >>> rule = ActivationRule(["Swish", "sigmoid"])
        >>> rule.ops[-1]
        'sigmoid'
    """

    names: Sequence[str] = ()
    _known: dict[tuple[type, str], bool] = field(default_factory=dict, repr=False)

    @property
    def ops(self) -> tuple[str, ...]:
        """The functional ops that are default layers."""
        extra = tuple(n for n in self.names if n in OPS and n not in RESPONSE_OPS)
        return RESPONSE_OPS + extra

    def check(self, model: nn.Module) -> None:
        """Raise when an entry of :attr:`names` names neither an op nor a class of ``model``.

        Raises:
            NeuronsError: Naming the entry, the ops and the model's module classes.
        """
        classes: set[str] = set()
        for module in model.modules():
            classes |= _class_names(type(module))
        unknown = [n for n in self.names if n not in OPS and n not in classes]
        if unknown:
            short = sorted({type(m).__name__ for m in model.modules()})
            raise NeuronsError(
                f"`activations` entry {unknown[0]!r} is neither a functional op ({', '.join(OPS)}) "
                f"nor the class of a module of {type(model).__name__} (its classes: "
                f"{', '.join(short)})"
            )

    def __call__(self, module: nn.Module, device: torch.device | None = None) -> bool:
        """Whether ``module`` is an activation module."""
        cls = type(module)
        if isinstance(module, ACTIVATIONS) or _class_names(cls) & set(self.names):
            return True
        if _is_torch_class(cls) or next(module.children(), None) is not None:
            return False
        if next(module.parameters(recurse=False), None) is not None:
            return False
        if next(module.buffers(recurse=False), None) is not None:
            return False
        key = (cls, module.extra_repr())
        if key not in self._known:
            self._known[key] = _probe(module, device or torch.device("cpu"))
        return self._known[key]


def check_activations(activations: Sequence[str] | None) -> tuple[str, ...]:
    """The ``activations`` argument as a tuple of names.

    Raises:
        NeuronsError: If it is not a list of non-empty strings.
    """
    if activations is None:
        return ()
    if isinstance(activations, str):
        activations = [activations]
    if not all(isinstance(a, str) and a for a in activations):
        raise NeuronsError(
            "`activations` must be a list of class names ('Swish', "
            f"'timm.layers.activations.GELU') or op names ('sigmoid'); got {activations!r}"
        )
    return tuple(activations)
