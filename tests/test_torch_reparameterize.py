"""normfold.torch.reparameterize: multi-branch torch modules merged into one Conv per sum.

Outputs are compared with the original module's (float64 runs where precision matters, float16
judged against a float32 run); the original module must come back untouched.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normfold.models import build  # noqa: E402
from normfold.torch import reparameterize, reparameterize_with_report  # noqa: E402


def _randomize(make: type[nn.Module]) -> nn.Module:
    """``make()`` built and given random BN statistics under a fixed seed."""
    from normfold.models._common import randomize_norms, seeded

    with seeded(0):
        module = make()
        randomize_norms(module)
    return module.eval()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _counts(module: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    return convs, bns


def _same_in_float64(rewritten: nn.Module, module: nn.Module, x: torch.Tensor) -> None:
    """``rewritten`` computes what ``module`` does, both run in float64 on ``x``."""
    with torch.no_grad():
        expected = copy.deepcopy(module).double()(x)
        torch.testing.assert_close(copy.deepcopy(rewritten).double()(x), expected, rtol=1e-6,
                                   atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize(("name", "block"), [("repvgg", "RepVggBlock"), ("mobileone", "MobileOneBlock")])
def test_zoo_blocks_become_one_conv_each(name: str, block: str) -> None:
    zoo = build(name)
    before = _state(zoo.module)
    blocks = sum(type(m).__name__ == block for m in zoo.module.modules())
    merged, report = reparameterize_with_report(zoo.module)
    assert len(report.merged) == blocks and report.refused == []
    assert _counts(merged) == (blocks, 0)
    # The original is untouched: same parameters, still multi-branch.
    after = _state(zoo.module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _counts(zoo.module)[1] > 0
    x = zoo.example_inputs[0].double()
    with torch.no_grad():
        expected = copy.deepcopy(zoo.module).double()(x)
        actual = copy.deepcopy(merged).double()(x)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_float16_against_float32() -> None:
    zoo = build("repvgg")
    half = zoo.half()
    merged = reparameterize(half.module)
    x = zoo.example_inputs[0]
    with torch.no_grad():
        reference = zoo.module(x)
        unmerged = half.module(x.half()).float()
        result = merged(x.half()).float()
    scale = float(reference.abs().max())
    unmerged_error = float((unmerged - reference).abs().max()) / scale
    merged_error = float((result - reference).abs().max()) / scale
    assert merged_error <= max(2 * unmerged_error, 2e-3), (merged_error, unmerged_error)


class DiverseBlock(nn.Module):
    """ACNet + DBB branches of one input: 3×3, 1×3, 3×1, AvgPool + BN, 1×1 → BN → 3×3 (unpadded
    1×1 output is fine only when its bias is zero: this one has no bias and a zero-shift BN)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.square = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.hor = nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(c))
        self.ver = nn.Sequential(nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(c))
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c))
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x) + self.pool(x) + self.kxk(self.pw(x))


def test_acnet_and_dbb_branches_merge() -> None:
    module = _randomize(DiverseBlock)
    merged, report = reparameterize_with_report(module)
    assert len(report.merged) == 1 and len(report.merged[0].branches) == 5
    assert _counts(merged) == (1, 0)
    # The merged weights are float32 (the module's dtype), rounded once.
    _same_in_float64(merged, module, torch.randn(2, 4, 7, 7, dtype=torch.float64))


class ShiftedBlock(nn.Module):
    """A second 3×3 branch padded (2, 0) rows: same output size, different windows."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=0)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = self.b(nn.functional.pad(x, (1, 1, 2, 0)))
        return self.a(x) + shifted + self.bn(x)


def test_mismatched_windows_are_refused_and_the_rest_merges() -> None:
    module = _randomize(ShiftedBlock)
    merged, report = reparameterize_with_report(module)
    # a + bn merge; the padded-then-convolved branch reads another tensor (the pad), so stays.
    assert len(report.merged) == 1 and len(report.merged[0].branches) == 2
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), module(x), rtol=1e-5, atol=1e-5)


class SharedConv(nn.Module):
    """The 1×1 Conv module is called twice: in the sum and on its own (per-site clone)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(c, c, 3, padding=1)
        self.k1 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k3(x) + self.k1(x), self.k1(x * 2)


def test_a_module_called_elsewhere_keeps_its_weights() -> None:
    module = SharedConv().eval()
    merged = reparameterize(module)
    assert torch.equal(merged.k1.weight, module.k1.weight)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        for got, want in zip(merged(x), module(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class Strided(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.k1 = nn.Conv2d(c, c, 1, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k3(x) + self.k1(x)[:, :, ::2, ::2]


def test_branches_of_other_tensors_or_strides_are_not_merged() -> None:
    module = Strided().eval()
    merged, report = reparameterize_with_report(module)
    assert report.merged == []
    assert merged is not module and isinstance(merged, Strided)


def test_untraceable_module_is_reported() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + x if x.sum() > 0 else x

    merged, report = reparameterize_with_report(Branchy().eval())
    assert report.merged == [] and "cannot trace" in report.refused[0].reason


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass that calls ``F.batch_norm`` itself after
    ``_assert(x.ndim == 4)``, then its ``drop`` and ``act`` (both Identity here)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(self.drop(x))


class TimmConvNormAct(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn = BatchNormAct2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TimmRepVggBlock(nn.Module):
    """timm's RepVggBlock forward, ``drop_path`` (Identity at rate 0) between the two adds."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(c)
        self.conv_kxk, self.conv_1x1 = TimmConvNormAct(c, 3), TimmConvNormAct(c, 1)
        self.drop_path, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x = self.drop_path(x)
        x += identity
        return self.act(x)


def test_timm_spelling_functional_batchnorm_and_asserts() -> None:
    module = _randomize(TimmRepVggBlock)
    merged, report = reparameterize_with_report(module)
    assert len(report.merged) == 1 and len(report.merged[0].branches) == 3
    assert _counts(merged) == (1, 0)
    # The shape asserts now read the merged Conv's output: nothing keeps the branches alive.
    calls = [n for n in merged.graph.nodes if n.op == "call_module"]
    assert [type(merged.get_submodule(n.target)).__name__ for n in calls].count("Conv2d") == 1
    _same_in_float64(merged, module, torch.randn(2, 4, 6, 6, dtype=torch.float64))


class RepGhostLike(nn.Module):
    """timm's RepGhost module: ``fusion_bn(fusion_conv(y)) + cheap_bn(dwconv(y))`` with
    ``fusion_conv = nn.Identity()``, ``y`` also read by the next block (its other readers)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.fusion_conv, self.fusion_bn = nn.Identity(), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.relu(self.cheap(y) + self.fusion_bn(self.fusion_conv(y))) * y


def test_repghost_identity_bn_through_identity_merges() -> None:
    module = _randomize(RepGhostLike)
    merged, report = reparameterize_with_report(module)
    assert len(report.merged) == 1 and report.refused == []
    assert report.merged[0].branches == ("cheap.0", "identity fusion_bn")
    # Only the primary Conv's BN is left, for fold_batchnorm.
    assert _counts(merged) == (2, 1)
    _same_in_float64(merged, module, torch.randn(2, 3, 6, 6, dtype=torch.float64))


class Leftovers(nn.Module):
    """FastViT's RepMixer ``x + γ·(mixer(x) − norm(x))`` (``norm`` an identity-only MobileOne
    block, ``0 + BN(x)``), which merges; then BatchNorm branches with no Conv to merge into —
    two BNs of one tensor, a BN alone in its sum — beside a RepVGG-style sum that merges."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.mixer = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.norm, self.bn_a, self.bn_b, self.lone = (nn.BatchNorm2d(c) for _ in range(4))
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        identity_out = identity_out + self.norm(x)
        y = x + self.gamma * (self.mixer(x) - identity_out)
        z = self.bn_a(y) + self.bn_b(y)
        return self.k3(z) + self.identity(z) + self.lone(torch.relu(z))


def test_report_names_every_batchnorm_left() -> None:
    from normfold.torch import fold_batchnorm_with_report

    module = _randomize(Leftovers)
    merged, report = reparameterize_with_report(module)
    folded, fold_report = fold_batchnorm_with_report(merged)
    assert sorted(sorted(site.branches) for site in report.merged) == [
        ["identity identity", "k3.0"], ["identity norm", "identity x", "mixer"]]
    left = {name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert left == {"bn_a", "bn_b", "lone"}
    refused = {site.node: site.reason for site in report.refused}
    assert set(refused) == left
    assert "none of the 2 branches of `mixer_reparam`" in refused["bn_a"]
    assert "no Conv branch of `relu`" in refused["lone"]
    assert left <= {site.bn for site in fold_report.refused}
    _same_in_float64(folded, module, torch.randn(2, 4, 6, 6, dtype=torch.float64))


class SubtractedInput(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.k3, self.k1 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.k3(x) + self.k1(x) - t


def test_a_subtracted_leftover_refuses_the_sum() -> None:
    module = SubtractedInput().eval()
    merged, report = reparameterize_with_report(module)
    assert report.merged == [] and isinstance(merged, SubtractedInput)
    assert [site.node for site in report.refused] == ["sub"]
    assert "`t` stays in the sum subtracted or scaled" in report.refused[0].reason
