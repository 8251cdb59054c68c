"""normfold.torch.fuse_norms: hand-written norms become torch's, outputs unchanged, near misses refused."""

from __future__ import annotations

import copy
import json

import normfold.models as zoo
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from models.norm_spellings import (
    SPELLINGS,
    EpsOnStdNorm,
    FunctionalRMSNorm,
    HandLayerNorm,
    LlamaRMSNorm,
    UnbiasedVarNorm,
)
from normfold.torch import fuse_norms, fuse_norms_with_report

_TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
# Spellings whose hand-written module has a float eps attribute and computes exactly a torch norm.
_REPLACED = {
    "ln_hand_bert": "LayerNorm", "ln_nobias": "LayerNorm", "ln_rsqrt_mul": "LayerNorm",
    "ln_var_mean": "LayerNorm", "ln_last2": "LayerNorm", "ln_fp16": "LayerNorm",
    "rms_llama": "RMSNorm", "rms_llama_fp16": "RMSNorm", "rms_t5": "RMSNorm", "rms_gemma": "RMSNorm",
    "rms_div": "RMSNorm", "rms_qk": "RMSNorm", "gn_hand": "GroupNorm", "skip_ln": "LayerNorm",
    "skip_ln_sum_read": "LayerNorm", "skip_rms": "RMSNorm",
}
# Spellings whose norm-like module must be refused (no torch op computes it over the last axis).
_REFUSED = ("ln_channels_first", "nm_std_unbiased", "nm_var_unbiased", "nm_eps_on_std", "nm_l2_normalize", "nm_frn")


def _outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        result = module(*inputs)
    return result if isinstance(result, tuple) else (result,)


def _assert_close(want: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...], rtol: float) -> None:
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = float(a.double().abs().max())
        assert float((a.double() - b.double()).abs().max()) <= rtol * scale


def _float64(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return copy.deepcopy(module).double(), tuple(t.double() if t.is_floating_point() else t for t in inputs)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_outputs_unchanged_and_original_untouched(name: str) -> None:
    built = SPELLINGS[name].build()
    module, inputs = built.module, built.example_inputs
    before = _state(module)
    kinds = [type(m) for m in module.modules()]
    fused, report = fuse_norms_with_report(module)
    assert fused is not module
    assert [type(m) for m in module.modules()] == kinds
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    # float64: the replacement computes the same function.
    want64 = _outputs(*_float64(module, inputs))
    got64 = _outputs(*_float64(fused, inputs))
    _assert_close(want64, got64, 1e-6)
    # The module's own dtype, upcasts included.
    rtol = 8 * torch.finfo(inputs[0].dtype).eps
    _assert_close(_outputs(module, inputs), _outputs(fused, inputs), max(rtol, 1e-6))
    if SPELLINGS[name].expect == "refuse":
        assert report.replaced == []


@pytest.mark.parametrize("name", sorted(_REPLACED))
def test_hand_written_spellings_replaced(name: str) -> None:
    module = SPELLINGS[name].build().module
    fused, report = fuse_norms_with_report(module)
    assert report.refused == []
    assert len(report.replaced) == 1
    entry = report.replaced[0]
    assert entry["as"].startswith(_REPLACED[name])
    new = fused if entry["module"] == "(root)" else fused.get_submodule(entry["module"])
    assert type(new).__name__ == _REPLACED[name]
    original = module if entry["module"] == "(root)" else module.get_submodule(entry["module"])
    eps = getattr(original, "eps", getattr(original, "variance_epsilon", None))
    assert new.eps == eps


@pytest.mark.parametrize("name", _REFUSED)
def test_near_misses_refused_with_reason(name: str) -> None:
    module = SPELLINGS[name].build().module
    fused, report = fuse_norms_with_report(module)
    assert report.replaced == []
    assert [r["module"] for r in report.refused] == ["(root)"]
    assert report.refused[0]["reason"]
    assert not any(isinstance(m, _TORCH_NORMS) for m in fused.modules())


def test_llama_rmsnorms_replaced() -> None:
    built = zoo.build("llama")
    fused, report = fuse_norms_with_report(built.module)
    hand = [n for n, m in built.module.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert hand and sorted(r["module"] for r in report.replaced) == sorted(hand)
    assert report.refused == []
    assert all(isinstance(fused.get_submodule(n), nn.RMSNorm) for n in hand)
    assert all(isinstance(built.module.get_submodule(n), nn.Module) and
               not isinstance(built.module.get_submodule(n), nn.RMSNorm) for n in hand)
    _assert_close(_outputs(*_float64(built.module, built.example_inputs)),
                  _outputs(*_float64(fused, built.example_inputs)), 1e-6)
    _assert_close(_outputs(built.module, built.example_inputs), _outputs(fused, built.example_inputs), 1e-5)


def test_convnext_channels_first_layernorm_refused() -> None:
    built = zoo.build("convnext")
    fused, report = fuse_norms_with_report(built.module)
    channels_first = [n for n, m in built.module.named_modules()
                      if getattr(m, "data_format", None) == "channels_first"]
    assert channels_first and sorted(r["module"] for r in report.refused) == sorted(channels_first)
    assert report.replaced == []
    assert all(not isinstance(fused.get_submodule(n), nn.LayerNorm) for n in channels_first)
    _assert_close(_outputs(built.module, built.example_inputs), _outputs(fused, built.example_inputs), 1e-6)


def test_bert_has_nothing_to_replace() -> None:
    built = zoo.build("bert")
    fused, report = fuse_norms_with_report(built.module)
    assert report.to_dict() == {"replaced": [], "refused": []}
    _assert_close(_outputs(built.module, built.example_inputs), _outputs(fused, built.example_inputs), 0.0)


def test_report_to_dict_is_json() -> None:
    _, report = fuse_norms_with_report(SPELLINGS["skip_rms"].build().module)
    assert json.loads(json.dumps(report.to_dict())) == {
        "replaced": [{"module": "norm", "as": "RMSNorm([16], eps=1e-06)"}], "refused": []
    }


def test_fuse_norms_returns_the_module_of_the_report() -> None:
    module = SPELLINGS["rms_llama"].build().module
    assert isinstance(fuse_norms(module), nn.RMSNorm)
    assert isinstance(module, LlamaRMSNorm)


_EPS = st.sampled_from([1e-12, 1e-8, 1e-6, 1e-5, 3e-4, 0.1])


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(2, 24), eps=_EPS, bias=st.booleans(), rms=st.booleans(), half=st.booleans(),
       seed=st.integers(0, 2**16))
def test_eps_carried_exactly(dim: int, eps: float, bias: bool, rms: bool, half: bool, seed: int) -> None:
    torch.manual_seed(seed)
    module = LlamaRMSNorm(dim, eps=eps) if rms else HandLayerNorm(dim, eps=eps, bias=bias)
    # LlamaRMSNorm upcasts to float32 as nn.RMSNorm does; a float16 HandLayerNorm does not (refused).
    module = module.half() if half and rms else module
    fused = fuse_norms(module)
    assert isinstance(fused, nn.RMSNorm if rms else nn.LayerNorm)
    assert fused.eps == eps
    x = torch.randn(4, 3, dim, dtype=torch.float64)
    _assert_close(_outputs(module.double(), (x,)), _outputs(fused.double(), (x,)), 1e-6)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(2, 24), eps=_EPS, unbiased=st.booleans(), seed=st.integers(0, 2**16))
def test_near_misses_refused_for_any_eps(dim: int, eps: float, unbiased: bool, seed: int) -> None:
    torch.manual_seed(seed)
    module = UnbiasedVarNorm(dim, eps=eps) if unbiased else EpsOnStdNorm(dim, eps=eps)
    fused, report = fuse_norms_with_report(module)
    assert report.replaced == [] and len(report.refused) == 1
    assert type(fused) is type(module)


class _HardCodedLayerNorm(nn.Module):
    """``F.layer_norm`` with eps written in the call, no eps attribute."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class _LiteralEpsRMSNorm(nn.Module):
    """An RMSNorm by hand with its eps a literal in the forward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12) * self.weight


class _TwoEpsNorm(nn.Module):
    """Two F.rms_norm calls with different eps: no one eps to carry over."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (16,), self.weight, 1e-6) + F.rms_norm(x, (16,), self.weight, 1e-5)


@pytest.mark.parametrize(
    ("build", "kind", "eps"),
    [(lambda: FunctionalRMSNorm(16), nn.RMSNorm, 1e-6), (lambda: _HardCodedLayerNorm(16), nn.LayerNorm, 1e-5),
     (lambda: _LiteralEpsRMSNorm(16), nn.RMSNorm, 1e-12)],
)
def test_eps_written_in_forward_read_from_its_trace(build, kind: type, eps: float) -> None:
    torch.manual_seed(0)
    module = build()
    fused, report = fuse_norms_with_report(module)
    assert report.refused == [] and len(report.replaced) == 1
    assert type(fused) is kind and fused.eps == eps
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    x[0, 0] = 0.0
    _assert_close(_outputs(copy.deepcopy(module).double(), (x,)), _outputs(fused.double(), (x,)), 1e-6)


def test_two_literal_eps_refused() -> None:
    _, report = fuse_norms_with_report(_TwoEpsNorm(16))
    assert report.replaced == []
    assert "no one literal eps" in report.refused[0]["reason"]
