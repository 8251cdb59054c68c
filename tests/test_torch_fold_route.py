"""normfold.torch.fold_batchnorm through reshapes: timm LeViT's LinearNorm and its near misses.

Each folded module is compared with the original in float64; refusals keep the BatchNorm and
carry the reason.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normfold.models import build  # noqa: E402
from normfold.models.levit import LinearNorm  # noqa: E402
from normfold.torch import fold_batchnorm_with_report  # noqa: E402


def _bns(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm1d) for m in module.modules())


def _close(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = copy.deepcopy(b).double()(x.double())
        actual = copy.deepcopy(a).double()(x.double())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_levit_linear_norms_fold_with_example_inputs() -> None:
    zoo = build("levit")
    x = zoo.example_inputs[0]
    folded, report = fold_batchnorm_with_report(zoo.module, example_inputs=(x,))
    linear_norms = sum(isinstance(m, LinearNorm) for m in zoo.module.modules())
    assert sum(site.kind == "Linear" for site in report.folded) == linear_norms
    # Only NormLinear's BN (before its Linear: nothing before it to fold into) is left.
    assert _bns(folded) == 1 and [r.bn for r in report.refused] == ["head.bn"]
    _close(folded, zoo.module, x)


def test_without_example_inputs_the_route_is_refused_with_the_reason() -> None:
    zoo = build("levit")
    _, report = fold_batchnorm_with_report(zoo.module)
    reasons = [r.reason for r in report.refused if r.bn.endswith("qkv.bn")]
    assert reasons and all("pass example_inputs" in reason for reason in reasons)


class MergedTokens(nn.Module):
    """``bn(linear(x).flatten(1))``: features ``l·C + c`` — per (token, channel) statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3, bias=False)
        self.bn = nn.BatchNorm1d(15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).flatten(1))


def test_channels_merged_with_tokens_are_refused() -> None:
    module = MergedTokens().eval()
    x = torch.randn(2, 5, 4)
    folded, report = fold_batchnorm_with_report(module, example_inputs=(x,))
    assert report.folded == [] and "merged with an axis before them" in report.refused[0].reason
    _close(folded, module, x)


class ReadTwice(nn.Module):
    """The Linear's output is also added to the result: it needs the unscaled values."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = LinearNorm(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm.linear(x)
        return self.norm.bn(y.flatten(0, 1)).reshape_as(y) + y


def test_other_reader_of_the_linear_is_refused() -> None:
    module = ReadTwice().eval()
    x = torch.randn(2, 5, 4)
    folded, report = fold_batchnorm_with_report(module, example_inputs=(x,))
    assert report.folded == [] and "is also read by" in report.refused[0].reason
    _close(folded, module, x)
