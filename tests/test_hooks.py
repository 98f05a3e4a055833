import pytest
import torch
from conftest import TinyNet
from torch import nn

from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import (
    HookSet,
    count_forward_hooks,
    default_layers,
    get_module,
    hooked,
    resolve_layers,
    run_layers,
    selects,
    signed_layers,
)
from lightning_neurons.layouts import held_values, reduce_activation
from lightning_neurons.signs import never_negative


def test_default_layers_are_the_activations_not_the_signed_convs():
    # TinyNet's fc is followed by torch.relu in its forward: the function layer "relu()"
    assert default_layers(TinyNet()) == ["relu1", "relu2", "relu()"]


def test_globs_resolve_in_model_order():
    assert resolve_layers(TinyNet(), ["fc", "conv*"]) == ["conv1", "conv2", "fc"]


def test_unknown_layer_lists_available_names_and_suggests():
    with pytest.raises(
        NeuronsError, match=r"layer 'conv9' not found in TinyNet.*Available: conv1, relu1"
    ):
        resolve_layers(TinyNet(), ["conv9"])
    nested = nn.Sequential(TinyNet())
    with pytest.raises(NeuronsError, match=r"Did you mean: 0\.conv1"):
        get_module(nested, "conv1")


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(NeuronsError, match=r"pattern 'block\*' matches no module"):
        resolve_layers(TinyNet(), ["block*"])


def test_model_without_layers_to_track():
    with pytest.raises(NeuronsError, match="no activation.*Name the layers"):
        resolve_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), None)


def test_hooks_are_removed_even_when_the_forward_raises():
    model = TinyNet()
    seen = []
    with pytest.raises(RuntimeError), hooked(model, ["conv1", "fc"], lambda n, t: seen.append(n)):
        assert count_forward_hooks(model) == 3  # two layers and the pass counter on the model
        model(torch.rand(2, 3, 8, 8))  # wrong channel count
    assert count_forward_hooks(model) == 0
    with hooked(model, ["conv1", "fc"], lambda n, t: seen.append((n, tuple(t.shape)))):
        model(torch.rand(2, 1, 8, 8))
    assert seen == [("conv1", (2, 4, 8, 8)), ("fc", (2, 8))]
    assert count_forward_hooks(model) == 0


def test_reduce_activation_shapes_and_errors():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert reduce_activation(x, "mean").item() == pytest.approx(7.5)
    assert reduce_activation(x, "max").item() == 15.0
    assert reduce_activation(torch.ones(3, 5), "mean").shape == (3, 5)
    # channels first, as the hooks hand outputs over: [B, D, N] tokens reduce over the tokens
    assert reduce_activation(torch.arange(6.0).view(1, 2, 3), "max").tolist() == [[2.0, 5.0]]
    with pytest.raises(NeuronsError, match=r"shape \(3,\).*\[B, K\].*\[B, K, H, W\]"):
        reduce_activation(torch.ones(3), "mean", "seq")


def test_a_module_named_like_a_module_method_is_found():
    """``self.half = nn.ReLU()`` registers a module that ``model.get_submodule("half")`` does not
    find (it finds ``Module.half``, a method)."""

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.half = nn.ReLU()

    model = nn.Sequential(Named())
    assert get_module(model, "0.half") is model[0]._modules["half"]


def test_held_values_reduce_where_the_values_lie_and_never_alias_the_output():
    """Means and peaks over the positions, equal for a channels-last output (reduced in place,
    not copied flat first); one position is its own mean and peak (one copy, no reduction);
    ``peaks=False`` gives the means as the peaks. None of them is a view of the output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 3, generator=g)
    values, peaks = held_values(x, "mean")
    torch.testing.assert_close(values, x.mean(dim=(2, 3)), rtol=0, atol=0)
    assert torch.equal(peaks, x.flatten(2).amax(2))
    last = x.contiguous(memory_format=torch.channels_last)
    # float32 sums of 15 values of |x| < 5 in another order: a few ulps of 15 * 5
    torch.testing.assert_close(held_values(last, "mean")[0], values, rtol=0, atol=1e-5)
    assert torch.equal(held_values(last, "max")[0], peaks)
    one = torch.randn(4, 6, 1, 1, generator=g)
    for out in (one, torch.randn(4, 6, generator=g), torch.randn(4, 6, 1, generator=g)):
        v, p = held_values(out, "mean")
        assert p is v and torch.equal(v, out.reshape(4, 6))
        assert v.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
    v, p = held_values(x.relu(), "mean", peaks=False)
    assert p is v and torch.equal(v > 0, x.relu().flatten(2).amax(2) > 0)


def test_never_negative_layers_are_torchs_rectifiers_and_their_ops_only():
    class Shifted(nn.ReLU):  # a subclass may compute anything
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) - 1

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.GELU(), Shifted(), nn.Sigmoid())
    assert [never_negative(model, n) for n in ("0", "1", "1#1", "2", "3", "4")] == [
        False, True, True, False, False, True,
    ]  # fmt: skip
    assert never_negative(model, "relu()") and never_negative(model, "0.relu6()#2")
    assert not never_negative(model, "gelu()") and not never_negative(model, "silu()")


class SharedReLU(nn.Module):
    """One ReLU module called twice per forward pass, on outputs of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_each_call_of_a_shared_module_is_its_own_layer():
    model = SharedReLU()
    seen = []
    with hooked(model, ["relu"], lambda n, t: seen.append((n, t.shape[1]))):
        model(torch.rand(2, 1, 8, 8))
        model(torch.rand(2, 1, 8, 8))  # counting starts again with each forward pass
    assert seen == [("relu", 4), ("relu#1", 6)] * 2
    seen.clear()
    with hooked(model, ["relu#1"], lambda n, t: seen.append((n, t.shape[1]))):
        model(torch.rand(2, 1, 8, 8))
    assert seen == [("relu#1", 6)]
    assert default_layers(model) == ["relu"]  # selects both calls


def test_call_site_names_in_lists_globs_and_suggestions():
    model = SharedReLU()
    assert resolve_layers(model, ["relu#1", "conv*"]) == ["conv1", "conv2", "relu#1"]
    assert resolve_layers(model, ["relu#1", "relu"]) == ["relu"]  # the module covers its calls
    assert selects(["relu"], "relu#1") and selects(resolve_layers(model, ["re*#*"]), "relu#1")
    assert not selects(["relu#0"], "relu#1") and selects(["relu#0"], "relu")
    with pytest.raises(NeuronsError, match=r"Did you mean: relu#1\?"):
        resolve_layers(model, ["rleu#1"])
    with pytest.raises(NeuronsError, match=r"index of the module's call.*'relu#1'"):
        resolve_layers(model, ["relu#second"])
    with pytest.raises(NeuronsError, match=r"'relu#2' did not run.*ran 2 time\(s\).*relu, relu#1"):
        run_layers(model, ["relu#2"], lambda: model(torch.rand(1, 1, 8, 8)))
    assert run_layers(model, ["relu"], lambda: model(torch.rand(1, 1, 8, 8))) == ["relu", "relu#1"]
    assert count_forward_hooks(model) == 0


def test_hook_returning_a_tensor_replaces_that_call_only():
    model = SharedReLU()
    x = torch.rand(2, 1, 8, 8)
    with hooked(model, ["relu#1"], lambda n, t: torch.zeros_like(t)):
        out = model(x)
    assert torch.allclose(out, model.head.bias.expand(2, 3))  # the pooled features were zeroed


def test_signed_layers_are_the_affine_ones():
    assert signed_layers(TinyNet(), ["conv1", "relu1", "fc", "pool"]) == ["conv1", "fc"]


class _DictInside(nn.Module):
    """A block that returns a dict, inside a model that reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.conv(x)}


def test_hooks_on_every_module_can_pass_over_outputs_without_a_tensor():
    """A layer that returns a dict is an error when named, and passed over with `skip_others`
    (Grad-CAM's default layer reads every module's output)."""
    model = nn.Sequential()
    model.add_module("block", _DictInside())
    x, seen = torch.rand(1, 1, 5, 5), []
    error = "layer 'block' returned dict, not a tensor"
    with pytest.raises(NeuronsError, match=error), hooked(model, ["block"], lambda n, t: None):
        model(x)
    seen.clear()
    with hooked(model, ["block", "block.conv"], lambda n, t: seen.append(n), skip_others=True):
        model(x)
    assert seen == ["block.conv"] and count_forward_hooks(model) == 0


class _InPlaceAfter(nn.Module):
    """A hooked conv whose output the forward then changes in place, and an ``F.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h += 1.0  # after the hook: what the hook saw must not change
        return self.fc(torch.nn.functional.relu(self.relu(h).mean((2, 3)) - 1.2))


def _hand_over(model: nn.Module, layers: list[str], images: list[torch.Tensor]) -> list:
    seen: list = []
    hooks = HookSet(lightning_batches=True)
    hooks.add(model, layers, lambda name, out: seen.append((name, out.clone())))
    hooks.new_pass()
    for x in images:  # two passes in one batch
        model(x)
    hooks.replay()
    hooks.remove()
    return seen


@pytest.mark.parametrize(
    ("backend", "how"),
    [
        ("eager", "wrapper"),
        ("eager", "in_place"),
        ("aot_eager", "wrapper"),
        ("aot_eager", "in_place"),
        pytest.param("inductor", "wrapper", marks=pytest.mark.slow),  # code generated: ~15 s
    ],
)
def test_hooks_traced_into_a_fullgraph_compile_hand_over_what_eager_hooks_see(backend, how):
    """Traced hooks keep copies inside the graph (its functionalised form too: ``aot_eager``;
    generated code: ``inductor``) and hand them over at :meth:`HookSet.replay`, in the order and
    with the call sites of the eager hooks, pass by pass: the model's pre-hook traced
    (``Module.compile``) or not (the ``OptimizedModule`` wrapper)."""
    torch.manual_seed(0)
    net, images = _InPlaceAfter(), [torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6)]
    eager = _hand_over(net, ["conv", "relu()"], images)
    assert [n for n, _ in eager] == ["conv", "relu()", "conv", "relu()"]
    torch._dynamo.reset()
    if how == "wrapper":
        compiled, prefix = torch.compile(net, backend=backend, fullgraph=True), "_orig_mod."
    else:
        compiled, prefix = _InPlaceAfter(), ""
        compiled.load_state_dict(net.state_dict())
        compiled.compile(backend=backend, fullgraph=True)
    got = _hand_over(compiled, [prefix + "conv", prefix + "relu()"], images)
    assert [n.removeprefix(prefix) for n, _ in got] == [n for n, _ in eager]
    # the same operations on the same data; inductor's kernels may sum in another order (a
    # mean of 36 float32 values: a few units in the last place)
    tolerance = dict(rtol=1e-5, atol=1e-6) if backend == "inductor" else dict(rtol=0, atol=0)
    for (_, a), (_, b) in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    assert count_forward_hooks(compiled) == 0
