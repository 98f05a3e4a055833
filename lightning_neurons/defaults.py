"""The default layers of a model: the outputs of its nonlinearities and blocks (its responses).

See :func:`default_layers` for the rule; :mod:`lightning_neurons.activations` tells activation
modules, :mod:`lightning_neurons.functional` the calls of activation functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from lightning_neurons.activations import ActivationRule, check_activations
from lightning_neurons.functional import OPS, called_ops, function_layer, held_ops
from lightning_neurons.layouts import patch_embedding
from lightning_neurons.state import model_device

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: The ops that join branches (an Inception module's ``torch.cat``).
_JOINS = ("cat", "concat", "concatenate")

#: At most this many convolutions and linear layers in each branch of a *branching block*: an
#: Inception module's branches hold 1 to 3 (torchvision's GoogLeNet and Inception v3, timm's);
#: the streams of a two-stream backbone hold many more, and are walked into.
BRANCH_DEPTH = 3


def _is_container(module: nn.Module) -> bool:
    """A Sequential / ModuleList / ModuleDict that runs its children as they are (its class does
    not define its own ``forward``), or a module whose ``forward`` runs ``self.children()`` (timm's
    RegNet stages: ``for block in self.children(): x = block(x)``)."""
    if not isinstance(module, _CONTAINERS):
        return bool(called_ops(module, ("children",)))
    return not any(
        "forward" in vars(cls)
        for cls in type(module).__mro__
        if cls not in _CONTAINERS and issubclass(cls, nn.Module) and cls is not nn.Module
    )


def _is_branching(module: nn.Module) -> bool:
    """Whether ``module`` joins shallow branches into one output, as an Inception module does:
    its ``forward`` concatenates (``torch.cat``) and it has two children or more, each holding at
    most :data:`BRANCH_DEPTH` convolutions and linear layers."""
    children = list(module.children())
    if len(children) < 2 or not called_ops(module, _JOINS):
        return False
    weighted = (nn.modules.conv._ConvNd, nn.Linear)
    return all(
        sum(isinstance(m, weighted) for m in child.modules()) <= BRANCH_DEPTH for child in children
    )


def _is_auxiliary(name: str, module: nn.Module, classifier: nn.Linear | None) -> bool:
    """Whether ``module`` (called ``name`` in its parent) is an auxiliary classifier: its name
    contains ``aux`` and its last ``Linear`` has as many outputs as the model's ``classifier``
    (GoogLeNet's ``aux1``, Inception v3's ``AuxLogits``). Such a head runs in training mode only,
    so no analysis (eval mode) sees it run."""
    if "aux" not in name.lower() or classifier is None:
        return False
    heads = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(heads) and heads[-1].out_features == classifier.out_features


def _final_classifier(model: nn.Module) -> nn.Linear | None:
    """The model's last ``Linear`` (its final classifier), or ``None``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def auxiliary_classifiers(model: nn.Module) -> list[str]:
    """The names of ``model``'s auxiliary classifiers (see :func:`default_layers`, rule 5)."""
    classifier = _final_classifier(model)
    return [
        name
        for name, m in model.named_modules()
        if name and _is_auxiliary(name.rpartition(".")[2], m, classifier)
    ]


def activation_rule(activations: Sequence[str] | ActivationRule | None) -> ActivationRule:
    """An :class:`~lightning_neurons.activations.ActivationRule` from ``activations=`` (names, a
    rule, or ``None``)."""
    if isinstance(activations, ActivationRule):
        return activations
    return ActivationRule(check_activations(activations))


def default_layers(
    model: nn.Module, activations: Sequence[str] | ActivationRule | None = None
) -> list[str]:
    """The layers whose outputs are *responses*: the outputs of nonlinearities and of blocks.

    The rule, on any ``nn.Module``, walking the module tree from the model down:

    1. an activation module is a layer, with every one of its calls (a shared activation module
       gives one layer per call): torch's ReLU, GELU, SiLU, Hardswish, ..., the classes named in
       ``activations``, and parameter-free elementwise rectifiers of any library (timm's ``GELU``,
       a user's ``Swish``; see :mod:`lightning_neurons.activations`);
    2. the calls of activation functions (``F.relu``, ``torch.gelu``, ``x.relu()``) that a
       walked module's own ``forward`` makes are a layer ``"<module>.relu()"`` (see
       :mod:`lightning_neurons.functional`), after the module's children;
    3. a *block* is a layer and is not walked into: a module that is a direct child of a
       *container* (``nn.Sequential`` / ``ModuleList`` / ``ModuleDict`` running its children as
       they are, or a module whose ``forward`` runs ``self.children()``), has its own
       ``forward``, contains an activation (module, function call, or a function held as an
       attribute: torch's ``nn.TransformerEncoderLayer``) and does not contain the
       final classifier (the model's last ``Linear``). Its output is the
       block's response: the post-ReLU output of a ResNet ``BasicBlock``, an ``MBConv`` /
       ``CNBlock`` output, a DenseNet dense block's, a transformer block's tokens. So is a
       *branching block* wherever it lies: a module whose ``forward`` concatenates the outputs
       of shallow branches (each at most :data:`BRANCH_DEPTH` convolutions or linear layers), an
       Inception module (GoogLeNet's ``inception4a``, Lucid's ``mixed4a``);
    4. everything else is walked into (the model, a backbone attribute, containers, blocks that
       are not children of a container); ``Conv2d``, ``BatchNorm``, ``Linear`` and other leaves
       are never default layers, so the final classifier's logits are not either;
    5. an auxiliary classifier is skipped: a module whose name contains ``aux`` and whose last
       ``Linear`` has as many outputs as the final classifier (GoogLeNet's ``aux1`` and
       ``aux2``, Inception v3's ``AuxLogits``). It runs in training mode only, and the analyses
       run the model in eval mode.

    So a ResNet gives its stem ReLU and every residual block's output, a VGG its ReLUs, ConvNeXt
    and vision transformers their blocks, GoogLeNet and Inception v3 their stem's activations and
    Inception modules, a tutorial CNN with ``F.relu`` in ``forward`` its ``relu()`` calls.
    docs/layers_models.md has tables for timm's and torchvision's models.

    Args:
        model: The model.
        activations: More activation classes (names) and functional ops (``"sigmoid"``), see
            :class:`~lightning_neurons.activations.ActivationRule`.

    Returns:
        Layer names in the model's order (each selects all its calls, see the module docstring).
        Empty when the model has no activation at all.

    Raises:
        NeuronsError: If an entry of ``activations`` names neither an op nor a class of the model.
    """
    from torchmetrics import Metric

    rule = activation_rule(activations)
    rule.check(model)
    device = model_device(model)
    classifier = _final_classifier(model)
    found: list[str] = []

    def own_calls(module: nn.Module) -> list[str]:
        return [] if rule(module, device) else called_ops(module, rule.ops)

    def is_block(child: nn.Module) -> bool:
        return (
            any(True for _ in child.children())
            and any(
                rule(m, device) or own_calls(m) or held_ops(m, rule.ops) for m in child.modules()
            )
            and not any(m is classifier for m in child.modules())
        )

    def walk(module: nn.Module, prefix: str, in_container: bool) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, Metric) or _is_auxiliary(name, child, classifier):
                continue
            if rule(child, device):
                found.append(full)
            elif _is_container(child):
                walk(child, full, in_container=True)
            elif (in_container or _is_branching(child)) and is_block(child):
                found.append(full)
            else:
                walk(child, full, in_container=False)
        if not _is_container(module):
            found.extend(function_layer(prefix, op) for op in own_calls(module))

    if rule(model, device):
        return []
    walk(model, "", in_container=_is_container(model))
    return found


def layer_order(model: nn.Module, rule: ActivationRule) -> dict[str, float]:
    """``{layer name: position}`` of every module and every function layer a module's code
    names (:data:`~lightning_neurons.functional.OPS`); a function layer comes after its module's
    descendants (the calls a module makes between its children's are not ordered statically)."""
    names = [n for n, _ in model.named_modules()]
    order: dict[str, float] = {n: float(i) for i, n in enumerate(names) if n}
    end = {n: i for i, n in enumerate(names)}
    for i, name in enumerate(names):
        parts = name.split(".") if name else []
        for depth in range(len(parts)):
            end[".".join(parts[:depth])] = i
    device = model_device(model)
    for name, module in model.named_modules():
        if _is_container(module) or rule(module, device):
            continue
        for op in called_ops(module, OPS):
            order[function_layer(name, op)] = end[name] + 0.5
    return order


def default_cam_layer(model: nn.Module) -> str | None:
    """Grad-CAM's layer for a vision transformer, ``None`` for other models (whose default is
    their last ``Conv2d``).

    A model is a vision transformer here when its last ``Conv2d`` is its patch embedding (kernel
    equal to stride, see :func:`~lightning_neurons.layouts.patch_embedding`): its last convolution
    maps pixels to patches, so Grad-CAM reads a block's tokens on the patch grid instead
    (:func:`token_block`, of its default layers).
    """
    patch = patch_embedding(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if patch is None or convs[-1] != patch:
        return None
    return token_block(model, default_layers(model))


def token_block(model: nn.Module, blocks: Sequence[str]) -> str | None:
    """Of a transformer's ``blocks`` (in the order they run), Grad-CAM's: the last, or the one
    before it when the model reads its class token (a ``class_token`` / ``cls_token`` parameter,
    or one per branch as CrossViT's ``cls_token_0``, and no average pooling: no ``global_pool``
    attribute, or ``pool`` string, saying ``avg`` or ``mean``): the last block's patch tokens
    then reach the logits through nothing (only its class token is read), while its input's
    do, through the last block's attention."""
    if not blocks:
        return None
    pools = [str(getattr(m, "global_pool", "")) for m in model.modules()]  # timm: str or module
    pools += [p for m in model.modules() if isinstance(p := getattr(m, "pool", None), str)]
    averages = any("avg" in p or "mean" in p for p in pools)
    names = (n.rsplit(".", 1)[-1] for n, _ in model.named_parameters())
    has_token = any(n.startswith(("class_token", "cls_token")) for n in names)  # CrossViT: _0
    reads_class_token = has_token and not averages
    return blocks[-2] if reads_class_token and len(blocks) > 1 else blocks[-1]


def infer_num_classes(model: nn.Module) -> int | None:
    """The class count from ``num_classes`` (attribute or hparams) or the last Linear's width;
    2 for a binary classifier's one logit (see :func:`~lightning_neurons.batch.read_logits`)."""
    for source in (model, getattr(model, "hparams", {})):
        value = (
            source.get("num_classes")
            if isinstance(source, Mapping)
            else getattr(source, "num_classes", None)
        )
        if isinstance(value, int) and value > 0:
            return max(value, 2)
    classifier = _final_classifier(model)
    return max(classifier.out_features, 2) if classifier is not None else None
