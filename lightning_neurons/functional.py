"""Functional activations as layers: ``F.relu(x)`` inside a module's ``forward`` is a call site.

A model written as PyTorch's and Lightning's tutorials write it (``Conv2d`` / ``Linear`` modules,
``F.relu`` and ``F.max_pool2d`` in ``forward``) has no activation module to hook: its responses are
the results of function calls. This module makes those calls layers.

**Names.** The calls of activation function ``op`` made by the ``forward`` of the module named
``m`` (or by a method that ``forward`` calls) form the layer ``"m.op()"``: ``"backbone.relu()"``,
``"features.gelu()"``; calls made by the model's own ``forward`` are ``"relu()"``. As for modules,
the first call in one forward pass is ``"m.op()"``, the second ``"m.op()#1"``, and so on; in a
layer list ``"m.op()"`` selects every call and ``"m.op()#1"`` / ``"m.op()#*"`` the matching ones;
globs match them like module names (``"*.relu()"``, ``"backbone.*"``). ``F.relu(x)``,
``torch.relu(x)``, ``x.relu()`` and ``x.relu_()`` are all the op ``relu``; a call is counted for
the innermost module running when it is made, so the ``F.relu`` inside an ``nn.ReLU`` module is
that module's, never its parent's.

**How.** While hooks are attached, a forward pre-hook on every calling module that has a hooked
function layer enters a :class:`torch.overrides.TorchFunctionMode`, and its forward hook (run
also when the forward raises) leaves it: the mode sees every torch function call of that forward
and hands the results of the hooked ones to the analysis, which may replace them (ablation zeroes
an op's output this way). Pre- and post-hooks on the caller's submodules (all of them: a forward
may call a grandchild itself) tell whether a call is the caller's own. Nothing stays on the model
when the hooks are removed.

**Which calls are default layers.** Finding them needs no data: the code of a module's
``forward`` (and of the methods of its class that it refers to) is read for the names of
:data:`RESPONSE_OPS` read as functions (``F.relu``, ``torch.relu``, ``x.relu``); a name read
as a submodule (``self.relu(x)`` calling an ``nn.ReLU``, ``self.backbone.relu(x)``, or ``n.relu(x)``
when a submodule has that name) is a module call, not a function call. Limits:

* calls through a function stored under another name (``self.act = F.relu``, torch's own
  ``nn.TransformerEncoderLayer``) are not found by that reading; name them in ``layers=`` (they
  are still captured) or give the op's name in ``activations=``. A module that holds such a
  function as an attribute (:func:`held_ops`) does count as holding an activation, so torch's
  ``TransformerEncoderLayer`` in an ``nn.TransformerEncoder`` is a block, a default layer;
* a name read in ``forward`` but never called there (a dead branch) gives a default layer that
  never runs; the analyses then say it did not run;
* under ``torch.compile``, Dynamo traces the hooks and the mode (a compiled model gives the
  eager model's statistics; tested with the eager backend); ``fullgraph=True`` is not tested.
"""

from __future__ import annotations

import dis
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_neurons.deferred import is_compiling

#: Functional ops whose results are responses (rectifiers and their smooth kin): default layers.
RESPONSE_OPS: tuple[str, ...] = (
    "relu",
    "relu6",
    "leaky_relu",
    "prelu",
    "rrelu",
    "elu",
    "celu",
    "selu",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "softplus",
)
#: Further ops that can be named as layers (``layers=["m.sigmoid()"]``, or ``activations=``)
#: but are not default layers: inside blocks they gate other responses rather than being one.
GATE_OPS: tuple[str, ...] = ("sigmoid", "tanh", "hardsigmoid", "hardtanh", "softsign")
#: Every op that can be a layer.
OPS: tuple[str, ...] = RESPONSE_OPS + GATE_OPS

#: Ends the module part of a function layer's name: ``"backbone.relu()"``.
CALL_MARK = "()"


def _functions() -> dict[object, str]:
    """``{function object: op}`` for every spelling of every op (F., torch., Tensor., in place)."""
    found: dict[object, str] = {}
    for op in OPS:
        for owner in (F, torch, torch.Tensor):
            for name in (op, op + "_"):
                fn = getattr(owner, name, None)
                if fn is not None:
                    found.setdefault(fn, op)
    return found


_FUNCTIONS = _functions()


# ---- names -----------------------------------------------------------------------------------


def function_layer(caller: str, op: str) -> str:
    """The layer name of the calls of ``op`` by module ``caller`` (``""``: the model itself).

    Example:
        >>> function_layer("backbone", "relu"), function_layer("", "gelu")
        ('backbone.relu()', 'gelu()')
    """
    return f"{caller}.{op}{CALL_MARK}" if caller else f"{op}{CALL_MARK}"


def is_function_layer(name: str) -> bool:
    """Whether a layer name (module part, without ``#i``) names function calls."""
    return name.endswith(CALL_MARK)


def split_function_layer(name: str) -> tuple[str, str]:
    """``"backbone.relu()" -> ("backbone", "relu")``, ``"relu()" -> ("", "relu")``."""
    stem = name[: -len(CALL_MARK)]
    caller, _, op = stem.rpartition(".")
    return caller, op


# ---- finding the calls in the code -----------------------------------------------------------


def _is_library(fn: object) -> bool:
    return getattr(fn, "__module__", "").startswith("torch.")


def called_ops(module: nn.Module, ops: tuple[str, ...] = RESPONSE_OPS) -> list[str]:
    """The ops of ``ops`` whose names the module's ``forward`` (and the methods of its class it
    refers to) reads, in the order first read, as functions (:func:`_read_as_function`): names
    of submodules called (``self.relu(x)``, ``self.backbone.relu(x)``) are left out.

    torch's own classes are not read (their activations are modules or known functions).

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return F.relu(self.fc(x))
        >>> called_ops(Net())
        ['relu']
    """
    cls = type(module)
    forward = getattr(cls, "forward", None)
    if forward is None or _is_library(forward) or not hasattr(forward, "__code__"):
        return []
    seen: set[types.CodeType] = set()
    pending = [(forward.__code__, forward.__globals__)]
    found: list[str] = []
    while pending:
        code, names = pending.pop()
        if code in seen:
            continue
        seen.add(code)
        for name, chain in _code_reads(code):
            bare = name[:-1] if name.endswith("_") else name
            if bare in ops and bare not in found and _read_as_function(chain, module, names):
                found.append(bare)
            method = getattr(cls, name, None)
            code_ = getattr(method, "__code__", None)
            if isinstance(code_, types.CodeType) and not _is_library(method):
                pending.append((code_, method.__globals__))
    return found


#: What a held activation function is (``F.relu``, ``torch.relu``, a ``partial`` of one).
_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, functools.partial)


def held_ops(module: nn.Module, ops: tuple[str, ...] = RESPONSE_OPS) -> list[str]:
    """The ops of ``ops`` whose functions the module holds as attributes, which its ``forward``
    calls under another name (torch's ``nn.TransformerEncoderLayer``: ``self.activation =
    F.relu``), in the order held.

    Example:
        >>> held_ops(nn.TransformerEncoderLayer(8, 2, activation="gelu")), held_ops(nn.ReLU())
        (['gelu'], [])
        >>> block = nn.Linear(2, 2)
        >>> block.act = functools.partial(F.leaky_relu, negative_slope=0.2)
        >>> held_ops(block)
        ['leaky_relu']
    """
    found: list[str] = []
    for value in vars(module).values():
        value = value.func if isinstance(value, functools.partial) else value
        op = _FUNCTIONS.get(value) if isinstance(value, _FUNCTION_TYPES) else None
        if op in ops and op not in found:
            found.append(op)
    return found


@functools.lru_cache(maxsize=1024)
def _code_reads(code: types.CodeType) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(name, chain)`` for every global or attribute name the code (and the code nested in it)
    reads: ``chain`` is the base's kind and the names read from it, ``("self", "net", "relu")``
    for ``self.net.relu``, ``("global", "F", "relu")``, ``("local", "relu")`` for ``x.relu``,
    ``("?", "relu")`` for a base that is not a plain load. Cached: a model's classes are read
    once (a ResNet's 16 blocks are one class)."""
    reads: list[tuple[str, tuple[str, ...]]] = []
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            reads.append((ins.argval, ("global", ins.argval)))
        elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            chain, j = [ins.argval], i - 1
            while j >= 0 and instructions[j].opname in ("LOAD_ATTR", "LOAD_METHOD"):
                chain.insert(0, instructions[j].argval)
                j -= 1
            reads.append((ins.argval, (*_base(instructions[j] if j >= 0 else None), *chain)))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            reads.extend(_code_reads(const))
    return tuple(reads)


def _base(ins: dis.Instruction | None) -> tuple[str, ...]:
    """What an attribute chain starts from: ``("self",)``, ``("global", name)``, ``("local",)``
    (another variable, a tensor or a module) or ``("?",)``."""
    if ins is None or not isinstance(ins.argval, str):
        return ("?",)
    if ins.argval == "self" and ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF")):
        return ("self",)
    if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
        return ("global", ins.argval)
    return ("local",) if ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF")) else ("?",)


def _read_as_function(chain: tuple[str, ...], module: nn.Module, names: dict[str, object]) -> bool:
    """Whether the name at the end of ``chain`` (see :func:`_code_reads`) is read as a function
    (``F.relu``, ``torch.relu``, ``relu``, ``x.relu``) rather than as a submodule to call
    (``self.relu``, ``self.backbone.relu``, ``n.relu`` with a submodule of that name)."""
    kind, path = chain[0], chain[1:]
    if kind in ("self", "global"):
        owner: object = module if kind == "self" else names.get(path[0], _MISSING)
        try:  # (a property on the way may raise: then not known to be a module)
            for attr in path if kind == "self" else path[1:]:
                owner = getattr(owner, attr, _MISSING)
        except Exception:
            return True
        return not isinstance(owner, nn.Module)
    # a variable's attribute: a tensor's method, unless a submodule has that name
    name = path[-1]
    return not any(
        n.rpartition(".")[2] in (name, name.rstrip("_")) for n, _ in module.named_modules()
    )


_MISSING = object()


# ---- capturing the calls while the model runs ------------------------------------------------

#: Called with ``(function layer name, result)`` for each call the capture sees; a tensor it
#: returns replaces the result.
OnCall = Callable[[str, torch.Tensor], "torch.Tensor | None"]


@dataclass
class _Frame:
    """One running hooked caller: its name, how many of its children are running, and whether
    it started inside TorchDynamo's trace of a compiled forward."""

    caller: str
    ops: frozenset[str]
    busy: int = 0
    traced: bool = False


class _Mode(TorchFunctionMode):
    """Sees every torch function call while a hooked caller runs; reports its own op calls."""

    def __init__(self, capture: FunctionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, kinds, args=(), kwargs=None):  # noqa: ANN001
        result = func(*args, **(kwargs or {}))
        op = _FUNCTIONS.get(func)
        if op is None or not isinstance(result, torch.Tensor):
            return result
        return self.capture.seen(op, result)


@dataclass
class FunctionCapture:
    """The hooks that turn the calls of activation functions into layers.

    Args:
        wanted: ``{caller module name: ops}`` to capture.
        on_call: Called with ``(function layer name, result)``; may return a replacement.
    """

    wanted: dict[str, frozenset[str]]
    on_call: OnCall
    _stack: list[_Frame] = field(default_factory=list)
    _busy: list[_Frame | None] = field(default_factory=list)
    _mode: _Mode | None = None

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the hooks on the callers and their children; returns their handles."""
        modules = dict(model.named_modules())
        handles = []
        for caller, ops in self.wanted.items():
            module = modules[caller]
            # every submodule, not only the children: a forward may call a grandchild itself
            # (``self.backbone.layer1(x)``), whose calls are not the caller's own. Prepended: a
            # submodule that is itself a caller starts its frame after the outer frame is busy.
            for child in module.modules():
                if child is not module:
                    handles.append(
                        child.register_forward_pre_hook(self._child_starts, prepend=True)
                    )
                    handles.append(child.register_forward_hook(self._child_ends, always_call=True))
            handles.append(module.register_forward_pre_hook(self._starter(caller, ops)))
            # prepended: captures added later leave their modes first (modes are a stack)
            handles.append(module.register_forward_hook(self._ends, always_call=True, prepend=True))
        return handles

    def _starter(self, caller: str, ops: frozenset[str]) -> Callable[..., None]:
        def starts(*_: object) -> None:
            if not self._stack:
                self._mode = _Mode(self)
                self._mode.__enter__()
            self._stack.append(_Frame(caller, ops, traced=is_compiling()))

        return starts

    def _ends(self, *_: object) -> None:
        if self._stack:
            self._stack.pop()
        if not self._stack:
            self.leave()

    def _child_starts(self, *_: object) -> None:
        frame = self._stack[-1] if self._stack else None
        if frame is not None:
            frame.busy += 1
        self._busy.append(frame)

    def _child_ends(self, *_: object) -> None:
        frame = self._busy.pop() if self._busy else None
        if frame is not None:
            frame.busy -= 1

    def seen(self, op: str, result: torch.Tensor) -> torch.Tensor:
        """A call of ``op`` returned ``result``: report it when it is a hooked caller's own."""
        frame = self._stack[-1] if self._stack else None
        if frame is None or frame.busy or op not in frame.ops:
            return result
        if frame.traced and not is_compiling():
            # TorchDynamo's "eager" backend runs the graph the hooks were traced into with the
            # mode on: those calls were handed over when traced
            return result
        replaced = self.on_call(function_layer(frame.caller, op), result)
        return result if replaced is None else replaced

    def leave(self) -> None:
        """Leave the mode if it is entered (when the hooks go, also after an error)."""
        mode, self._mode = self._mode, None
        self._stack.clear()
        self._busy.clear()
        if mode is not None:
            mode.__exit__(None, None, None)
