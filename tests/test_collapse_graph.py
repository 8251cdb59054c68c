"""Collapse on torch.fx graphs: refusals with reasons, pad-first, and merges checked in float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import fx, nn

from normfold.math.collapse_scores import ChannelPlan
from normfold.models.resnet import BasicBlock
from normfold.torch.layer_collapse import driver
from normfold.torch.layer_collapse.graph import pad_first, refusal, sites
from normfold.torch.layer_collapse.linearize import linearize_site
from normfold.torch.layer_collapse.rewrite import layer_count, merge_layers, record_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _traced(module: nn.Module, seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.running_mean.uniform_(-1, 1)
            sub.running_var.uniform_(0.5, 2)
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-0.5, 0.5)
    return driver.trace(module.double())


def _linearize_all(gm: fx.GraphModule, x: torch.Tensor, seed: int = 0) -> fx.GraphModule:
    """Every site becomes a random per-channel affine map (merging must be exact for any)."""
    rng = np.random.default_rng(seed)
    record_shapes(gm, (x,))
    for node in list(sites(gm)):
        channels = node.args[0].meta["collapse_shape"][1]
        plan = ChannelPlan(rng.uniform(0.5, 1.5, channels), rng.normal(size=channels),
                           np.zeros(channels), np.ones(channels, dtype=bool))
        linearize_site(gm, node.name, plan, 1, source="test", like=next(gm.parameters()))
    return gm


def _site(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


# ---- refusals, one each ------------------------------------------------------------------------

class _Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.conv2 = nn.MaxPool2d(2), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.bn(self.conv1(x)))))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return torch.matmul(h, h.transpose(1, 2))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.gate, self.out = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        return self.out(h * torch.sigmoid(self.gate(h.mean((2, 3), keepdim=True))))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1))


class _Last(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.mark.parametrize(
    ("module", "site", "reason"),
    [
        (_Pooled(), "relu", "MaxPool2d pool (nonlinear) lies between"),
        (_Attention(), "relu", "attention: it feeds matmul"),
        (_Gated(), "relu", "gating: mul"),
        (_Concat(), "relu", "joins it with a nonlinear branch (sigmoid"),
        (_Last(), "relu", "it feeds the model output"),
    ],
    ids=["maxpool", "attention", "gating", "concat", "output"],
)
def test_structural_refusals_say_why(module, site, reason):
    gm = _traced(module)
    assert reason in refusal(gm, _site(gm, site))


def _two_convs(width: int, padding: int = 0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(width, width, 3, padding=padding), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=padding), nn.BatchNorm2d(width),
    )


def test_a_merge_that_grows_the_work_is_refused():
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    gm = _linearize_all(_traced(_two_convs(8)), x)
    kept = merge_layers(gm, (x,))
    assert layer_count(kept.module) == 2
    (reason,) = kept.refused.values()
    assert "would grow the work x1.39" in reason and "max_flops_growth 1" in reason
    merged = merge_layers(gm, (x,), max_flops_growth=1.5)
    assert layer_count(merged.module) == 1
    torch.testing.assert_close(merged.module(x), gm(x), rtol=0, atol=1e-10)


def test_a_padded_second_conv_needs_pad_first():
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    gm = _linearize_all(_traced(_two_convs(8, padding=1)), x)
    refused = merge_layers(gm, (x,), max_flops_growth=2.0)
    assert layer_count(refused.module) == 2
    assert "exact only after pad-first" in next(iter(refused.refused.values()))
    # Allowed anyway, the merge is measured: it differs only on the border ring.
    border = merge_layers(gm, (x,), max_flops_growth=2.0, allow_border=True)
    (conv_merge,) = [m for m in border.merges if m.kind == "conv-conv"]
    assert not conv_merge.exact and conv_merge.max_error > 1e-3
    torch.testing.assert_close(border.module(x)[..., 2:-2, 2:-2], gm(x)[..., 2:-2, 2:-2], rtol=0, atol=1e-10)


def test_pad_first_moves_the_padding_up_the_chain_and_then_merges_exactly():
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    module = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
    )
    original = _linearize_all(_traced(module), x)
    moved = copy.deepcopy(original)
    assert pad_first(moved, _site(moved, "_6")) is None
    assert pad_first(moved, _site(moved, "_3")) is None
    assert moved.get_submodule("0").padding == (1 + 2 * (1 + 1),) * 2  # p0 + s0·(p3 + s3·p6)
    assert moved.get_submodule("3").padding == (0, 0) and moved.get_submodule("6").padding == (0, 0)
    # Same function away from the border, and the chain now merges exactly into one conv.
    torch.testing.assert_close(moved(x)[..., 2:-2, 2:-2], original(x)[..., 2:-2, 2:-2], rtol=0, atol=1e-10)
    merged = merge_layers(moved, (x,), max_flops_growth=10.0)
    assert layer_count(merged.module) == 1
    assert all(m.exact for m in merged.merges)
    torch.testing.assert_close(merged.module(x), moved(x), rtol=0, atol=1e-10)


def test_pad_first_refuses_when_there_is_no_conv_to_move_to():
    gm = _traced(_Pooled())
    assert "not from a conv" in pad_first(gm, _site(gm, "conv2"))


# ---- merges, each against the unmerged model in float64 ---------------------------------------

class _Blocks(nn.Module):
    """An identity-shortcut block then a strided projection block, unpadded second convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = BasicBlock(4, 4)
        self.b = BasicBlock(4, 8, stride=2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.b(self.a(x))), 1))


def test_residual_blocks_and_the_classifier_collapse():
    x = torch.randn(2, 4, 11, 11, dtype=torch.float64)
    gm = _traced(_Blocks())
    for name in ("a", "b"):  # pad-first by hand: the block's second conv loses its padding
        block = gm.get_submodule(name)
        block.conv1.padding = (1 + block.conv1.stride[0],) * 2
        block.conv2.padding = (0, 0)
    gm = _linearize_all(gm, x)
    before = layer_count(gm)
    merged = merge_layers(gm, (x,), max_flops_growth=100.0)
    kinds = sorted(m.kind for m in merged.merges if m.kind != "fold")
    assert kinds == ["classifier-into-conv", "conv-conv", "conv-conv", "shortcut", "shortcut"]
    assert (before, layer_count(merged.module)) == (6, 2)
    # The first block became one padded conv, so the second cannot take its padding.
    (reason,) = merged.refused.values()
    assert "add_1_merged is zero-padded" in reason and "pad-first" in reason
    torch.testing.assert_close(merged.module(x), gm(x), rtol=0, atol=1e-10)
    assert max(m.max_error for m in merged.merges) < 1e-10


def test_linear_layers_with_batchnorm1d_merge():
    x = torch.randn(5, 6, dtype=torch.float64)
    module = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )
    gm = _linearize_all(_traced(module), x)
    merged = merge_layers(gm, (x,))
    assert layer_count(merged.module) == 1
    torch.testing.assert_close(merged.module(x), gm(x), rtol=0, atol=1e-10)


def test_merging_keeps_the_model_dtype_and_leaves_the_input_alone():
    x = torch.randn(2, 6)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    gm = driver.trace(module)
    _linearize_all(gm, x.double().float())
    snapshot = copy.deepcopy(gm.state_dict())
    merged = merge_layers(gm, (x,))
    assert next(merged.module.parameters()).dtype == torch.float32
    assert all(torch.equal(snapshot[k], v) for k, v in gm.state_dict().items())
    torch.testing.assert_close(merged.module(x), gm(x), rtol=1e-5, atol=1e-5)


class _Tail(nn.Module):
    """An identity-shortcut block, its output ReLU, then pool and classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = BasicBlock(8, 8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.a(x)), 1))


def test_the_classifier_moves_through_the_pool_and_an_identity_residual():
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    gm = _traced(_Tail())
    record_shapes(gm, (x,))
    site = _site(gm, "a_relu_1")  # only the block's output ReLU
    channels = 8
    rng = np.random.default_rng(5)
    plan = ChannelPlan(rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), np.zeros(channels),
                       np.ones(channels, dtype=bool))
    linearize_site(gm, site.name, plan, 1, source="test", like=next(gm.parameters()))
    merged = merge_layers(gm, (x,))
    kinds = [m.kind for m in merged.merges]
    assert "classifier-into-conv" in kinds
    assert layer_count(merged.module) == layer_count(gm)  # fc became a 1x1 conv on the shortcut...
    widths = sorted(m.out_channels for m in merged.module.modules() if isinstance(m, nn.Conv2d))
    assert widths == [3, 3, 8]  # ...and the block's second conv now computes 3 channels, not 8
    torch.testing.assert_close(merged.module(x), gm(x), rtol=0, atol=1e-10)


def test_the_package_and_the_public_function_have_different_names():
    import importlib

    import normfold.torch
    import normfold.torch.layer_collapse as package

    assert callable(normfold.torch.collapse) and normfold.torch.collapse is package.collapse
    assert importlib.import_module("normfold.torch.layer_collapse") is package
