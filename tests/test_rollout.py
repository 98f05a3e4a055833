"""Attention rollout: exact values on a toy transformer whose attention is worked out by hand,
the recorded attention changing no output, the models it cannot read, and the callback."""

from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import timm
import torch
import torchvision
from conftest import FAST_VIS, TinyData, TinyNet, fast_trainer
from torch import nn
from torch.nn import functional as F

from lightning_neurons import ActivationTracker, FeatureVisualizer, NeuronsError
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import attention_rollout, saliency, sizing
from lightning_neurons.visualize.rollout import has_image_attention, recorded_attention


class ToyViT(nn.Module):
    """Grey images cut into 2 x 2 patches, a class token (or none: the tokens' mean is
    classified), ``blocks`` single-layer attention blocks of 2 heads with a residual."""

    def __init__(self, blocks: int = 1, class_token: bool = True, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if class_token else None
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(blocks))
        self.head = nn.Linear(dim, 3)

    def qkv_of(self, block: int, t: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = t.shape
        return self.qkv[block](t).view(n, tokens, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return t if self.cls is None else torch.cat([self.cls.expand(len(x), -1, -1), t], 1)

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(t[:, 0] if self.cls is not None else t.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in range(len(self.qkv)):
            q, k, v = self.qkv_of(block, t)
            t = t + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.logits(t)


def _by_hand(model: ToyViT, x: torch.Tensor, target: torch.Tensor):
    """The model's forward pass with its attention written out: the attention of every block
    and its gradient from the target logits."""
    t, attentions = model.tokens(x), []
    for block in range(len(model.qkv)):
        q, k, v = model.qkv_of(block, t)
        a = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        attentions.append(a)
        t = t + (a @ v).transpose(1, 2).flatten(2)
    score = model.logits(t).gather(1, target.view(-1, 1)).sum()
    grads = torch.autograd.grad(score, attentions)
    return [a.detach() for a in attentions], grads


def _on_image(rows: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    cells = rows.reshape(len(rows), 1, grid, grid)
    return F.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("class_token", [True, False])
def test_rollout_of_a_toy_transformer_is_its_attention_worked_out_by_hand(class_token):
    torch.manual_seed(0)
    model = ToyViT(blocks=2, class_token=class_token).eval()
    x, target = torch.rand(3, 1, 8, 8), torch.tensor([0, 2, 1])
    attentions, grads = _by_hand(model, x, target)
    eye, prefix = torch.eye(attentions[0].shape[-1]), int(class_token)
    # plain (Abnar & Zuidema): ((A + I) / 2) of the second block times the first's
    first, second = (0.5 * a.mean(dim=1) + 0.5 * eye for a in attentions)
    plain = second @ first
    # weighted (Chefer et al.): R = I + W1; R = R + W2 R
    w1, w2 = ((g * a).clamp_min(0).mean(dim=1) for g, a in zip(grads, attentions, strict=True))
    weighted = (eye + w1) + w2 @ (eye + w1)
    for relevance, is_weighted in ((plain, False), (weighted, True)):
        rows = relevance[:, 0] if class_token else relevance.mean(dim=1)
        expected = _on_image(rows[:, prefix:], 4, 8)
        got = attention_rollout(model, x, target, weighted=is_weighted)
        torch.testing.assert_close(got, expected.clamp_min(0), rtol=1e-5, atol=1e-6)
    # through `saliency` (plain), in chunks of one image: the same maps
    chunked = saliency(model, x, "rollout", target, batch_size=1)
    torch.testing.assert_close(chunked, attention_rollout(model, x), rtol=1e-5, atol=1e-7)
    weighted_chunks = attention_rollout(model, x, target, weighted=True, batch_size=2)
    expected = attention_rollout(model, x, target, weighted=True)
    torch.testing.assert_close(weighted_chunks, expected, rtol=1e-5, atol=1e-7)
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def _recorded_on_another_thread(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What a block recording this thread's attention holds after ``model(x)`` ran on another."""
    with recorded_attention() as store:
        thread = threading.Thread(target=model, args=(x,))
        thread.start()
        thread.join()
    return store


def test_recording_the_attention_changes_no_output_and_restores_the_function():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8
    ).eval()
    tv = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    ).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)  # no nn.MultiheadAttention fast path
    real = F.scaled_dot_product_attention
    for model, blocks in ((vit, 12), (tv, 2)):
        fused = model(x)
        with recorded_attention() as store:
            written_out = model(x)
        # the same product in another order of float32 sums: a few ulps of the logits
        torch.testing.assert_close(written_out, fused, rtol=1e-4, atol=1e-5)
        assert len(store) == blocks and store[0].shape == (2, 3 if model is vit else 2, 17, 17)
        torch.testing.assert_close(store[0].sum(dim=-1), torch.ones(store[0].shape[:-1]))
        assert F.scaled_dot_product_attention is real
        assert has_image_attention(model, x[:1])
    assert _recorded_on_another_thread(vit, x) == []  # another thread's attention: not read
    with pytest.raises(RuntimeError), recorded_attention():
        raise RuntimeError("an error inside the block")
    assert F.scaled_dot_product_attention is real


class WindowedToy(ToyViT):
    """The toy's 4 x 4 patch tokens (no class token) attending only within 2 x 2 windows:
    ``[N x 4 windows, heads, 4, 4]`` attention, whose 4 tokens would also fit a 2 x 2 grid."""

    def __init__(self) -> None:
        super().__init__(class_token=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)  # [N, 16, dim]
        n, dim = t.shape[0], t.shape[-1]
        windows = t.view(n, 2, 2, 2, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(n * 4, 4, dim)
        q, k, v = self.qkv_of(0, windows)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.logits(windows.view(n, 16, dim) + mixed.view(n, 16, dim))


def test_a_model_without_attention_over_the_image_gets_a_clear_error():
    for model in (TinyNet().eval(), WindowedToy().eval()):
        assert not has_image_attention(model, torch.rand(1, 1, 8, 8))
        for n in (1, 2):  # one image: the windows are no batch of images either
            with pytest.raises(NeuronsError, match="saw no self-attention over the image's"):
                attention_rollout(model, torch.rand(n, 1, 8, 8))


def test_the_callback_maps_a_transformer_and_leaves_rollout_out_of_a_cnn(tmp_path):
    for backbone, mapped in ((ToyViT(), True), (TinyNet(), False)):
        torch.manual_seed(0)
        vis = FeatureVisualizer(saliency=["gradient", "rollout"], on_error="raise", **FAST_VIS)
        layers = ["backbone.embed"] if mapped else None  # the toy has no activation
        callbacks = [ActivationTracker(layers, on_error="raise"), vis]
        module = ImageClassifier(backbone, num_classes=3, lr=1e-2)
        trainer = fast_trainer(tmp_path / str(mapped), callbacks=callbacks, max_epochs=1)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=TinyData())
        said = [str(w.message) for w in record if "attention rollout reads" in str(w.message)]
        maps = vis.saliency_results
        assert maps is not None and not vis.failures
        if mapped:  # the function's maps of the probes, for their predicted classes
            assert not said and set(maps.maps) == {"gradient", "rollout"}
            own = attention_rollout(module, maps.images, maps.predicted)
            torch.testing.assert_close(maps.maps["rollout"], own, rtol=1e-4, atol=1e-7)
        else:
            assert len(said) == 1 and set(maps.maps) == {"gradient"}


class HandWrittenToy(ToyViT):
    """The toy with its attention written out by hand (``torch.softmax`` of the scores), as
    tutorials and research code write it: no ``scaled_dot_product_attention`` call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in range(len(self.qkv)):
            q, k, v = self.qkv_of(block, t)
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            t = t + (a @ v).transpose(1, 2).flatten(2)
        return self.logits(t)


def _eager_twins() -> list[tuple[nn.Module, nn.Module, int]]:
    """(fused, written out, blocks): the toy, timm's ViT with ``fused_attn=False``, Hugging
    Face's ViT with ``attn_implementation="eager"``; each twin with the same weights."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    toy = ToyViT(blocks=2, dim=6)
    hand = HandWrittenToy(blocks=2, dim=6)
    hand.load_state_dict(toy.state_dict())
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8
    )
    unfused = copy.deepcopy(vit)
    for block in unfused.blocks:
        block.attn.fused_attn = False
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=5,
    )  # fmt: skip
    hf = ViTForImageClassification(config)
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    assert hf.config._attn_implementation == "sdpa"
    return [(toy, hand, 2), (vit, unfused, 12), (hf, eager, 2)]


def test_attention_written_out_by_the_model_gives_the_fused_attention_maps():
    for fused, written, blocks in _eager_twins():
        fused, written = fused.eval(), written.eval()
        channels = 1 if isinstance(fused, ToyViT) else 3
        x = torch.rand(3, channels, 32 if channels == 3 else 8, 32 if channels == 3 else 8)
        with recorded_attention() as store:
            written(x)
        assert len(store) == blocks and store[0].shape[0] == 3
        for weighted in (False, True):
            target = torch.tensor([0, 1, 2]) if weighted else None
            expected = attention_rollout(fused, x, target, weighted=weighted)
            got = attention_rollout(written, x, target, weighted=weighted)
            # the same products in another order of float32 sums
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert has_image_attention(written, x[:1])
        assert _recorded_on_another_thread(written, x) == []
    assert "softmax" not in torch.Tensor.__dict__ and torch.softmax(x, dim=-1).shape == x.shape


def test_rollout_chunks_count_the_attention_they_keep(monkeypatch):
    """Rows per chunk bounded by the attention a row keeps (blocks x heads x T^2, far more than
    the toy's layer outputs): the maps of the chunks equal those of one pass."""
    torch.manual_seed(0)
    model, x = ToyViT(blocks=8).eval(), torch.rand(40, 1, 16, 16)  # 65 tokens, 2 heads
    attention = 2 * 8 * 2 * 65 * 65  # elements a row keeps: probabilities and as much again
    monkeypatch.setattr(sizing, "CPU_CHUNK_BYTES", 4 * attention * 5)  # room for 5 rows
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])))
    try:
        maps = attention_rollout(model, x)
    finally:
        hook.remove()
    # the probe's image, the attention's measure, then chunks of 5 (the layer outputs alone,
    # 780 elements a row at most, would have allowed all 40 at once)
    assert rows == [1, 1] + [5] * 8
    torch.testing.assert_close(
        maps, attention_rollout(model, x, batch_size=40), rtol=1e-5, atol=1e-7
    )


def test_a_compiled_model_gets_the_maps_of_its_code_as_written():
    """torch.compile'd (and already run, so a compiled graph is cached): its attention is read
    from the model's code run eagerly, fused or written out by hand."""
    torch.manual_seed(0)
    x, target = torch.rand(3, 1, 8, 8), torch.tensor([0, 2, 1])
    for model in (ToyViT(blocks=2).eval(), HandWrittenToy(blocks=2).eval()):
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(x), model(x))
        for weighted in (False, True):
            expected = attention_rollout(model, x, target, weighted=weighted)
            got = attention_rollout(compiled, x, target, weighted=weighted)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(compiled(x), model(x))  # compiled as before


class MultiheadToy(nn.Module):
    """A tutorial's ViT: the toy's tokens through ``nn.MultiheadAttention`` blocks called as
    ``out, weights = attn(t, t, t)`` (``need_weights=True``, its default: the weights are
    computed apart from ``scaled_dot_product_attention``, as ``[N x heads, T, T]``)."""

    def __init__(self, blocks: int = 2, dim: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.toy = ToyViT(blocks=0, dim=dim)
        self.batch_first = batch_first
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(dim, 2, batch_first=batch_first) for _ in range(blocks)
        )
        self.weights: list[torch.Tensor] = []  # what each block returned, last forward

    def forward(self, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        t, self.weights = self.toy.tokens(x), []
        for attn in self.attn:
            seq = t if self.batch_first else t.transpose(0, 1)
            out, weights = attn(seq, seq, seq, average_attn_weights=not per_head)
            t = t + (out if self.batch_first else out.transpose(0, 1))
            self.weights.append(weights)
        return self.toy.logits(t)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_asked_for_its_weights_is_read_and_returns_them(batch_first):
    torch.manual_seed(0)
    model, x = MultiheadToy(batch_first=batch_first).eval(), torch.rand(3, 1, 8, 8)
    x.requires_grad_(True)  # no fused fast path
    logits = model(x, per_head=True)
    per_head = [w.detach() for w in model.weights]  # [N, heads, T, T], computed by torch
    model(x)
    averaged = [w.detach() for w in model.weights]
    for heads in (True, False):  # the logits and the weights it returns are as torch's own
        with recorded_attention() as store:
            got = model(x, per_head=heads)
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-6)
        for returned, expected in zip(model.weights, per_head if heads else averaged, strict=True):
            torch.testing.assert_close(returned, expected, rtol=1e-5, atol=1e-6)
        assert len(store) == 2 and store[0].shape == (3, 2, 17, 17)
    # the plain rollout of the per-head weights torch returns
    eye = torch.eye(17)
    first, second = (0.5 * w.mean(dim=1) + 0.5 * eye for w in per_head)
    expected = _on_image((second @ first)[:, 0, 1:], 4, 8)
    torch.testing.assert_close(attention_rollout(model, x), expected, rtol=1e-5, atol=1e-6)
    assert F.multi_head_attention_forward.__module__ == "torch.nn.functional"


def test_hieras_unrolled_tokens_are_mapped_where_timm_puts_them_back():
    """timm's Hiera attends over its tokens unrolled (each pooling window's together) until its
    last stage: the rollout's row is put back on the grid by the model's own ``reroll``
    (before: the cells in the order the tokens lie, a scrambled map)."""
    from timm.models.hiera import Hiera

    from lightning_neurons.layouts import token_order

    torch.manual_seed(0)  # stage 3 (4 x 4 tokens) has one block of global attention
    model = Hiera(img_size=(64, 64), embed_dim=8, num_heads=1, stages=(1, 1, 2, 1)).eval()
    x = torch.rand(2, 3, 64, 64)
    with recorded_attention() as store:
        model(x.clone().requires_grad_(True))
    (attention,) = [a.detach() for a in store if a.shape[-2:] == (16, 16)]
    order = token_order(model, "blocks.3", 16)
    assert order is not None and order.tolist() != list(range(16))
    mixed = 0.5 * attention.mean(dim=1) + 0.5 * torch.eye(16)
    rows = mixed.mean(dim=1)  # no class token: the rows' mean, in the tokens' order
    expected = _on_image(rows[:, order], 4, 64)
    torch.testing.assert_close(attention_rollout(model, x), expected, rtol=1e-5, atol=1e-7)
