"""normfold.torch.fold_batchnorm: exact folds, per-site folding, refusals with reasons.

Every fold goes through :func:`_fold_checked`, which also proves the input module untouched
(parameters and buffers bitwise equal, same outputs). Numbers are compared per output channel,
relative to that channel's largest value, against the unfolded module run in float64.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402
from torch.fx.experimental.optimization import fuse as fx_fuse  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval  # noqa: E402

from normfold import runtime  # noqa: E402
from normfold.errors import InputError  # noqa: E402
from normfold.torch import FoldReport, fold_batchnorm, fold_batchnorm_with_report  # noqa: E402
from normfold.math import batchnorm as fm  # noqa: E402

_CONVS = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _randomize(module: nn.Module, *, var: str = "normal", seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (some scales negative); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if not isinstance(sub, _BatchNorm) or sub.running_mean is None:
                continue
            n = sub.num_features
            sub.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            variance = {"normal": torch.rand(n, generator=generator) * 1.5 + 0.5,
                        "tiny": torch.full((n,), 1e-10), "zero": torch.zeros(n)}[var]
            sub.running_var.copy_(variance)
            if sub.affine:
                sign = torch.where(torch.rand(n, generator=generator) < 0.3, -1.0, 1.0)
                sub.weight.copy_((torch.rand(n, generator=generator) + 0.5) * sign)
                sub.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return module.eval()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict(keep_vars=True).items()}


def _run(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


def _fold_checked(
    module: nn.Module, *inputs: torch.Tensor, **kwargs: object
) -> tuple[nn.Module, FoldReport]:
    """Fold, and prove the input module untouched: same tensors bit for bit, same outputs."""
    before, expected = _snapshot(module), _run(module, *inputs)
    folded, report = fold_batchnorm_with_report(module, **kwargs)
    after = _snapshot(module)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"fold_batchnorm changed {name}"
    assert torch.equal(_run(module, *inputs), expected)
    json.dumps(report.to_dict())  # the report is JSON
    return folded, report


def _channel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max over channels (axis 1) of max|actual - expected| / max|expected| in that channel."""
    a = actual.double().transpose(0, 1).reshape(actual.shape[1], -1)
    e = expected.double().transpose(0, 1).reshape(expected.shape[1], -1)
    scale = e.abs().amax(dim=1).clamp_min(1e-30)
    return float(((a - e).abs().amax(dim=1) / scale).max())


def _scale_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, for a model's output (logits) as a whole."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _bn_calls(module: nn.Module) -> list[str]:
    """The BatchNorm modules the traced forward of ``module`` still calls."""
    traced = fx.symbolic_trace(module)
    modules = dict(traced.named_modules())
    return [n.target for n in traced.graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], _BatchNorm)]


# -- the arithmetic ----------------------------------------------------------------------------


def test_shared_math_matches_torch_for_conv_and_linear() -> None:
    def f64(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().double().numpy()

    for layer, bn in ((nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)), (nn.Linear(4, 5), nn.BatchNorm1d(5))):
        pair = _randomize(nn.Sequential(layer, bn), seed=1).double()
        layer, bn = pair[0], pair[1]
        scale, shift = fm.bn_scale_shift(f64(bn.weight), f64(bn.bias), f64(bn.running_mean), f64(bn.running_var), bn.eps)
        weight, bias = fm.fold_after_conv(f64(layer.weight), f64(layer.bias), scale, shift)
        reference = (fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval)(layer, bn)
        np.testing.assert_allclose(weight, f64(reference.weight), rtol=1e-14, atol=0)
        np.testing.assert_allclose(bias, f64(reference.bias), rtol=1e-14, atol=1e-15)


def test_batchnorm_without_affine_parameters_is_pure_normalization() -> None:
    bn = nn.BatchNorm1d(3, affine=False).double().eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    scale, shift = fm.bn_scale_shift(None, None, bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps)
    x = torch.randn(2, 3, dtype=torch.float64)
    np.testing.assert_allclose(x.numpy() * scale + shift, bn(x).numpy(), rtol=1e-14, atol=1e-15)


def test_grouped_conv_transpose_weight_is_scaled_per_output_channel() -> None:
    # torch's fuse_conv_bn_weights(transpose=True) raises here (pytorch#180995).
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    scale = np.arange(1.0, 7.0)
    weight, bias = fm.fold_after_conv_transpose(
        layer.weight.detach().numpy(), layer.bias.detach().numpy(), scale, np.zeros(6), 2
    )
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    expected = _run(layer, x) * torch.from_numpy(scale).reshape(1, -1, 1, 1)
    actual = nn.functional.conv_transpose2d(x, torch.from_numpy(weight), torch.from_numpy(bias), groups=2)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# -- every layer shape, property-tested --------------------------------------------------------


@st.composite
def _conv_cases(draw: st.DrawFn) -> dict:
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    span = dilation * (kernel - 1)
    case = dict(
        dims=dims, transposed=transposed, groups=groups, kernel=kernel, stride=stride,
        dilation=dilation, in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)), bias=draw(st.booleans()),
        affine=draw(st.booleans()), var=draw(st.sampled_from(["normal", "normal", "tiny", "zero"])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 1e-1])), seed=draw(st.integers(0, 2**16)),
        size=span + 1 + draw(st.integers(0, 3)),
    )
    if transposed:
        case["padding"] = draw(st.integers(0, span // 2))
        case["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    else:
        case["padding"] = draw(st.integers(0, 2))
        case["output_padding"] = 0
    return case


def _conv_bn(case: dict) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(case["seed"])
    layer_type = _CONVS[case["dims"], case["transposed"]]
    extra = {"output_padding": case["output_padding"]} if case["transposed"] else {}
    layer = layer_type(case["in_channels"], case["out_channels"], case["kernel"],
                       stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                       groups=case["groups"], bias=case["bias"], **extra)
    bn = _BNS[case["dims"]](case["out_channels"], eps=case["eps"], affine=case["affine"])
    # No activation after the BatchNorm: a ReLU would leave channels of near-cancelled values,
    # where float32 rounding of the unfolded module itself exceeds any relative bound.
    module = _randomize(nn.Sequential(layer, bn), var=case["var"], seed=case["seed"])
    x = torch.randn(2, case["in_channels"], *[case["size"]] * case["dims"])
    return module, x


def _case(dims: int, transposed: bool, groups: int, **overrides: object) -> dict:
    case = dict(dims=dims, transposed=transposed, groups=groups, kernel=3, stride=2, dilation=2,
                in_channels=2 * groups, out_channels=3 * groups, bias=True, affine=True,
                var="normal", eps=1e-5, seed=dims, size=6, padding=1, output_padding=1)
    return {**case, **overrides}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_conv_cases())
# Grouped ConvTranspose with output_padding in every dimension, and a depthwise Conv.
@example(_case(1, True, 2))
@example(_case(2, True, 3, bias=False, affine=False))
@example(_case(3, True, 2, var="tiny"))
@example(_case(2, False, 4, in_channels=4, out_channels=4, output_padding=0))
def test_conv_and_conv_transpose_folds_are_exact(case: dict) -> None:
    module, x = _conv_bn(case)
    reference = _run(copy.deepcopy(module).double(), x.double())

    folded64, report = _fold_checked(copy.deepcopy(module).double(), x.double())
    assert [site.kind for site in report.folded] == [type(module[0]).__name__]
    assert not report.refused and not _bn_calls(folded64)
    assert _channel_error(_run(folded64, x.double()), reference) <= 1e-9

    folded32, _ = _fold_checked(module, x)
    assert _channel_error(_run(folded32, x), reference) <= 1e-5


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_linear_batchnorm1d_on_n_c_is_exact(inputs: int, outputs: int, bias: bool, affine: bool,
                                            seed: int) -> None:
    torch.manual_seed(seed)
    module = _randomize(nn.Sequential(nn.Linear(inputs, outputs, bias=bias),
                                      nn.BatchNorm1d(outputs, affine=affine)), seed=seed)
    x = torch.randn(4, inputs)
    reference = _run(copy.deepcopy(module).double(), x.double())
    folded, report = _fold_checked(module, x, example_inputs=(x,))
    assert len(report.folded) == 1 and not _bn_calls(folded)
    assert _channel_error(_run(folded, x), reference) <= 1e-5


# -- Linear + BatchNorm1d: exact only on (N, C) ------------------------------------------------


def test_linear_batchnorm1d_rank_comes_from_flatten_view_or_example_inputs() -> None:
    flattened = _randomize(nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(),
                                         nn.Linear(6, 6), nn.BatchNorm1d(6)))

    class Reshaped(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            self.how, self.fc, self.bn = how, nn.Linear(12, 6), nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.view(x.size(0), -1) if self.how == "view" else torch.flatten(x, 1)
            return self.bn(self.fc(x))

    x = torch.randn(3, 3, 4)
    for module in (flattened, _randomize(Reshaped("view")), _randomize(Reshaped("flatten"))):
        folded, report = _fold_checked(module, x)
        assert len(report.folded) == 1 and not _bn_calls(folded)
        assert _channel_error(_run(folded, x), _run(module, x)) <= 1e-5

    plain = _randomize(nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6)))
    folded, report = _fold_checked(plain, x.flatten(1))
    assert not report.folded and "pass example_inputs" in report.refused[0].reason
    assert torch.equal(_run(folded, x.flatten(1)), _run(plain, x.flatten(1)))


def test_batchnorm1d_on_a_3d_linear_output_is_refused_where_fx_fuse_is_wrong() -> None:
    # Linear on (N, L, C) then BatchNorm1d(L): the BatchNorm normalizes L, not the features.
    module = _randomize(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), seed=3)
    x = torch.randn(2, 8, 8)
    expected = _run(module, x)
    for kwargs in ({}, {"example_inputs": (x,)}):
        folded, report = _fold_checked(module, x, **kwargs)
        assert not report.folded and len(report.refused) == 1
        assert torch.equal(_run(folded, x), expected)
    assert "3-d Linear output (with example_inputs)" in report.refused[0].reason
    # torch's fuse folds it per feature anyway.
    assert (_run(fx_fuse(module), x) - expected).abs().max() > 0.1

    other = _randomize(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(3)), seed=4)
    folded, report = _fold_checked(other, torch.randn(2, 3, 8))
    assert "3 features but Linear produces 5 channels" in report.refused[0].reason


def test_unbatched_conv1d_output_is_refused_when_example_inputs_show_it() -> None:
    module = _randomize(nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)))
    x = torch.randn(4, 6)  # unbatched (C, L) with L == 6: BatchNorm1d normalizes L
    folded, report = _fold_checked(module, x, example_inputs=(x,))
    assert not report.folded and "2-d Conv1d output" in report.refused[0].reason
    assert torch.equal(_run(folded, x), _run(module, x))
    with pytest.raises(InputError, match="example_inputs do not run"):
        fold_batchnorm(module, example_inputs=(torch.randn(3),))


# -- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_modules_fold_in_float64_and_cast_once(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    module = _randomize(nn.Sequential(nn.Conv2d(8, 16, 3, bias=True), nn.BatchNorm2d(16, eps=1e-3)),
                        var="tiny", seed=5)
    low = copy.deepcopy(module).to(dtype)
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    folded, report = _fold_checked(low, x)
    assert len(report.folded) == 1
    reference = _run(copy.deepcopy(low).double(), x.double())
    assert _channel_error(_run(folded, x), reference) <= 4 * torch.finfo(dtype).eps
    conv = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.dtype == dtype and conv.bias.dtype == dtype

    # Expected: the float64 formula on the low-precision parameters, rounded once.
    layer, bn = (m.double() for m in copy.deepcopy(low))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = (layer.weight * scale.reshape(-1, 1, 1, 1)).to(dtype)
    bias = ((layer.bias - bn.running_mean) * scale + bn.bias).to(dtype)
    assert torch.equal(conv.weight.detach(), weight.detach())
    assert torch.equal(conv.bias.detach(), bias.detach())

    # Folding in the module's own dtype (torch's fuse) is never closer to the float64 truth.
    naive = fuse_conv_bn_eval(low[0], low[1])
    exact_weight = layer.weight.detach() * scale.detach().reshape(-1, 1, 1, 1)
    ours = (conv.weight.double() - exact_weight).abs().max()
    theirs = (naive.weight.double() - exact_weight).abs().max()
    assert ours <= theirs


# -- call sites --------------------------------------------------------------------------------


class _TwoBatchNorms(nn.Module):
    """One Conv module called twice, each call followed by its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x.flip(-1)))


def test_conv_called_at_two_sites_folds_per_site_where_fx_fuse_is_wrong() -> None:
    module = _randomize(_TwoBatchNorms(), seed=6)
    x = torch.randn(2, 3, 8, 8)
    expected = _run(module, x)
    folded, report = _fold_checked(module, x)
    assert sorted(site.bn for site in report.folded) == ["bn1", "bn2"]
    assert {site.layer for site in report.folded} == {"conv"}
    assert len({site.into for site in report.folded}) == 2  # one folded copy per site
    assert not _bn_calls(folded)
    assert _channel_error(_run(folded, x), expected) <= 1e-5
    # torch's fx fuse folds both BatchNorms into the one shared Conv (pytorch#104593).
    assert (_run(fx_fuse(module), x) - expected).abs().max() > 0.1


def test_conv_at_two_sites_with_one_batchnorm_and_batchnorm_at_two_sites() -> None:
    class OneFollowed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(2 * x)

    class SharedNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lone = self.bn(x[:, :1].expand(-1, 4, -1, -1))  # no layer before this call
            return self.bn(self.conv1(x)) * self.bn(self.conv2(x)) + lone

    x = torch.randn(2, 3, 8, 8)
    module = _randomize(OneFollowed(), seed=7)
    folded, report = _fold_checked(module, x)
    (site,) = report.folded
    assert site.into != "conv" and hasattr(folded, "conv")  # the unfollowed call keeps the Conv
    assert _channel_error(_run(folded, x), _run(module, x)) <= 1e-5

    module = _randomize(SharedNorm(), seed=8)
    folded, report = _fold_checked(module, x)
    assert sorted(s.layer for s in report.folded) == ["conv1", "conv2"]
    assert [r.bn for r in report.refused] == ["bn"] and _bn_calls(folded) == ["bn"]
    assert "not the output of a Conv" in report.refused[0].reason
    assert _channel_error(_run(folded, x), _run(module, x)) <= 1e-5


def test_weight_read_elsewhere_keeps_the_unfolded_conv() -> None:
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv.weight.sum()

    module = _randomize(ReadsWeight(), seed=9)
    x = torch.randn(1, 3, 4, 4)
    folded, report = _fold_checked(module, x)
    assert report.folded[0].into != "conv"
    assert _channel_error(_run(folded, x), _run(module, x)) <= 1e-5


class _StdConv(nn.Conv2d):
    """A Conv2d subclass whose forward standardizes the weight (as timm's StdConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def _hooked() -> nn.Module:
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    module[1].register_forward_hook(lambda m, args, out: out * 2)
    return module


_REFUSALS = {
    "training": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "training mode"),
    "no running stats": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1),
                                               nn.BatchNorm2d(4, track_running_stats=False)),
                         "track_running_stats=False"),
    "shared output": (_SharedOutput, "also read by `add`"),
    "after relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)),
                   "(ReLU), not a Conv"),
    # fx traces into the subclass's forward: the BatchNorm reads a functional conv2d.
    "conv subclass": (lambda: nn.Sequential(_StdConv(3, 4, 1), nn.BatchNorm2d(4)),
                      "`conv2d` is not the output of a Conv"),
    "bn hooks": (_hooked, "forward hooks"),
    "wrong bn rank": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)), None),
}


@pytest.mark.parametrize("case", sorted(_REFUSALS))
def test_refused_sites_say_why_and_change_nothing(case: str) -> None:
    build, reason = _REFUSALS[case]
    module = _randomize(build(), seed=10)
    x = torch.randn(2, 3, 5, 5)
    if case == "training":
        # Running a training BatchNorm updates its statistics: check the input by its tensors.
        module.train()
        before = _snapshot(module)
        folded, report = fold_batchnorm_with_report(module)
        assert all(torch.equal(before[k], v) for k, v in _snapshot(module).items())
        assert all(torch.equal(before[k], v) for k, v in _snapshot(folded).items())
    elif case == "wrong bn rank":
        # Conv2d -> BatchNorm1d cannot even run (BatchNorm1d sees a 4-d tensor); still no fold.
        folded, report = fold_batchnorm_with_report(module)
        reason = "sees a 3-d Conv2d output (by its class)"
    else:
        folded, report = _fold_checked(module, x)
        assert torch.equal(_run(folded, x), _run(module, x))
    assert not report.folded and len(report.refused) == 1
    assert reason in report.refused[0].reason


def test_affine_false_and_zero_variance_fold() -> None:
    module = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False),
                                      nn.BatchNorm2d(4, affine=False, eps=1e-5)), var="zero")
    x = torch.randn(2, 3, 6, 6)
    folded, report = _fold_checked(module, x)
    assert len(report.folded) == 1 and not _bn_calls(folded)
    assert _channel_error(_run(folded, x), _run(module.double(), x.double())) <= 1e-5


# -- modules torch.fx cannot trace -------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + x


class _Branchy(nn.Module):
    """Data-dependent control flow at the top; traceable children below."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = _Block()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.stem(x))
        if x.sum() > 0:
            return self.bn(self.conv(y))
        return self.conv(y)


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_module_folds_its_traceable_children_and_warns() -> None:
    module = _randomize(_Branchy(), seed=11)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="cannot trace `_Branchy`.*unfolded: bn"):
        folded, report = _fold_checked(module, x)
    assert type(folded) is _Branchy
    assert sorted(s.bn for s in report.folded) == ["block.bn", "stem.1"]
    assert [r.bn for r in report.refused] == ["bn"] and "cannot trace" in report.refused[0].reason
    assert [u.type for u in report.untraced] == ["_Branchy"]
    assert x.sum() != 0
    for sign in (1, -1):  # x and -x take the two branches
        assert _channel_error(_run(folded, sign * x), _run(module, sign * x)) <= 1e-5


def test_nothing_traceable_returns_the_copy_unchanged_with_a_warning() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)

    module = _randomize(Flat())
    x = torch.randn(1, 3, 4, 4).abs()
    with pytest.warns(UserWarning, match="cannot trace"):
        folded, report = _fold_checked(module, x)
    assert folded is not module and not report.folded
    assert _snapshot(folded).keys() == _snapshot(module).keys()
    copied, original = _snapshot(folded), _snapshot(module)
    assert all(torch.equal(copied[name], original[name]) for name in original)
    assert torch.equal(_run(folded, x), _run(module, x))


def test_untraceable_sequential_folds_adjacent_pairs_without_fx() -> None:
    module = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _Gate(),
                                      nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6),
                                      _StdConv(6, 6, 1), nn.BatchNorm2d(6)))
    x = torch.randn(2, 3, 7, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = _fold_checked(module, x)
    assert not caught  # every BatchNorm left has its own reason: none was left for want of a trace
    assert type(folded) is nn.Sequential
    assert [type(m).__name__ for m in folded] == [
        "Conv2d", "Identity", "_Gate", "ConvTranspose2d", "Identity", "_StdConv", "BatchNorm2d"
    ]
    assert [s.bn for s in report.folded] == ["1", "4"] and report.untraced
    assert [r.bn for r in report.refused] == ["6"]
    assert "a _StdConv: a subclass of Conv2d" in report.refused[0].reason
    assert _channel_error(_run(folded, x), _run(module, x)) <= 1e-5


def test_inplace_skips_the_copy() -> None:
    module = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    x = torch.randn(1, 3, 5, 5)
    expected = _run(module, x)
    folded = fold_batchnorm(module, inplace=True)
    assert folded.get_submodule("2") is module[2]  # not copied
    assert _channel_error(_run(folded, x), expected) <= 1e-5


# -- the model zoo -----------------------------------------------------------------------------


def _onnx_output(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, input_names=["input"], output_names=["out"],
                          opset_version=17, dynamo=False)
    (output,) = runtime.run(onnx.load_from_string(buffer.getvalue()), {"input": x.numpy()}).values()
    return output


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "vgg"])
def test_zoo_models_fold_every_batchnorm_exactly(name: str) -> None:
    from normfold import models

    zoo = models.build(name, batch=2)
    module, (x,) = zoo.module, zoo.example_inputs
    reference = _run(copy.deepcopy(module).double(), x.double())

    folded, report = _fold_checked(module, x)
    assert not report.refused and not report.untraced
    assert len(report.folded) == sum(isinstance(m, _BatchNorm) for m in module.modules())
    assert not _bn_calls(folded)
    assert _scale_error(_run(folded, x), reference) <= 1e-5

    folded64, _ = _fold_checked(copy.deepcopy(module).double(), x.double())
    assert _scale_error(_run(folded64, x.double()), reference) <= 1e-12

    # The folded module exports and runs in onnxruntime (optimizations off) to the same numbers.
    assert _scale_error(torch.from_numpy(_onnx_output(folded, x)), reference) <= 1e-5


# -- packaging ---------------------------------------------------------------------------------


def test_normfold_imports_without_torch_and_normfold_torch_says_how_to_get_it() -> None:
    code = (
        "import sys; import normfold; assert 'torch' not in sys.modules\n"
        "sys.modules['torch'] = None\n"
        "try:\n    import normfold.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'normfold[torch]' torch==2.13.0" in result.stdout
