"""normfold.torch.fuse_norm_calls: inline normalizations become one F. call each, outputs
unchanged, eps carried exactly, near misses refused with the graph left as it was."""

from __future__ import annotations

import collections
import copy
import json
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.nn import functional as F

from models.inline_norms import (
    INLINE,
    BertLayerNorm,
    GemmaBlock,
    HalfLayerNorm,
    LlamaMLPBlock,
)
from normfold.errors import InputError
from normfold.torch import fuse_norm_calls, fuse_norm_calls_with_report

_F_OPS = {F.layer_norm: "layer_norm", F.rms_norm: "rms_norm", F.group_norm: "group_norm"}
# Ops of a hand-written normalization that must not survive a rewrite.
_STATISTICS = {"mean", "var", "var_mean", "std", "pow", "sqrt", "rsqrt", "square"}
_FUSED = [name for name, case in INLINE.items() if case.ops]
_REFUSED = [name for name, case in INLINE.items() if case.reason]


def _f_calls(gm: fx.GraphModule) -> dict[str, int]:
    return dict(collections.Counter(_F_OPS[n.target] for n in gm.graph.nodes if n.target in _F_OPS))


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _outputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        result = module(x)
    return result if isinstance(result, tuple) else (result,)


def _assert_close(want: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...], rtol: float) -> None:
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        scale = float(a.double().abs().max())
        assert float((a.double() - b.double()).abs().max()) <= rtol * scale


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", _FUSED)
def test_inline_spelling_rewritten_outputs_unchanged(name: str) -> None:
    case = INLINE[name]
    module, x = case.build()
    before, code = _state(module), fx.symbolic_trace(module).code
    gm, report = fuse_norm_calls_with_report(module)
    assert report.refused == []
    assert len(report.replaced) == sum(case.ops.values())
    assert _f_calls(gm) == case.ops
    assert [n.name for n in gm.graph.nodes if _op_name(n) in _STATISTICS] == []
    if case.kept:
        assert all(case.kept in entry["kept"] for entry in report.replaced)
    else:
        assert all("kept" not in entry for entry in report.replaced)
    # float64: the same function; float32: the same rounding within a few units in the last place.
    want64 = _outputs(copy.deepcopy(module).double(), x.double())
    _assert_close(want64, _outputs(copy.deepcopy(gm).double(), x.double()), 1e-6)
    _assert_close(_outputs(module, x), _outputs(gm, x), 8 * torch.finfo(torch.float32).eps)
    # The input module is untouched.
    assert fx.symbolic_trace(module).code == code
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", _REFUSED)
def test_near_miss_refused_and_graph_left_as_traced(name: str) -> None:
    case = INLINE[name]
    module, x = case.build()
    gm, report = fuse_norm_calls_with_report(module)
    assert report.replaced == []
    assert len(report.refused) == 1 and case.reason in report.refused[0]["reason"]
    assert gm.code == fx.symbolic_trace(module).code
    for want, got in zip(_outputs(module, x), _outputs(gm, x)):
        assert torch.equal(want, got)


def test_channels_first_reason_names_the_trailing_dims() -> None:
    _, report = fuse_norm_calls_with_report(INLINE["nm_channels_first"].build()[0])
    assert "(1,)" in report.refused[0]["reason"] and "trailing" in report.refused[0]["reason"]


def test_bert_eps_1e12_carried_exactly_zero_rows_finite() -> None:
    module = BertLayerNorm()
    gm, report = fuse_norm_calls_with_report(module)
    assert report.replaced == [{"node": "add_1", "as": "F.layer_norm([16], eps=1e-12)"}]
    (call,) = [n for n in gm.graph.nodes if n.target is F.layer_norm]
    assert call.kwargs["eps"] == 1e-12 and repr(call.kwargs["eps"]) == "1e-12"
    assert call.kwargs["weight"].target == "weight" and call.kwargs["bias"].target == "bias"
    x = torch.randn(3, 4, 16)
    x[:, 0] = 0.0  # padding rows: only eps keeps them finite
    (want,), (got,) = _outputs(module, x), _outputs(gm, x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 0], module.bias.detach().expand(3, 16))
    _assert_close((want,), (got,), 8 * torch.finfo(torch.float32).eps)


def test_llama_block_both_norms_rewritten_rest_untouched() -> None:
    module, x = INLINE["llama_mlp_block"].build()
    traced = fx.symbolic_trace(module)
    gm, report = fuse_norm_calls_with_report(module)
    assert [e["as"] for e in report.replaced] == ["F.rms_norm([16], eps=1e-06)"] * 2
    assert _f_calls(gm) == {"rms_norm": 2}

    def layers(graph: fx.Graph) -> list[tuple[str, object]]:
        return [(n.op, n.target) for n in graph.nodes if n.op == "call_module" or n.target is F.silu]

    def adds(graph: fx.Graph) -> int:
        return sum(n.target is operator.add for n in graph.nodes)

    assert layers(gm.graph) == layers(traced.graph)
    assert adds(gm.graph) == adds(traced.graph) - 2  # the two `+ eps`; the residual add stays
    norms = [n for n in gm.graph.nodes if n.target is F.rms_norm]
    assert [n.kwargs["weight"].target for n in norms] == ["norm_weight", "final_weight"]
    assert norms[0].args[0].op == "placeholder"  # reads the block input itself, no upcast left
    _assert_close(_outputs(module.double(), x.double()), _outputs(gm.double(), x.double()), 1e-6)


def test_float16_llama_block_matches_in_float16() -> None:
    module, x = INLINE["llama_mlp_block"].build()
    module, x = module.half(), x.half()
    gm, report = fuse_norm_calls_with_report(module)
    assert _f_calls(gm) == {"rms_norm": 2} and report.refused == []
    (want,), (got,) = _outputs(module, x), _outputs(gm, x)
    assert got.dtype == torch.float16
    _assert_close((want,), (got,), 8 * torch.finfo(torch.float16).eps)


def test_float16_gemma_runs_in_float32_as_the_original_does() -> None:
    module = GemmaBlock().half()
    x = torch.randn(2, 5, 16).half()
    gm, report = fuse_norm_calls_with_report(module)
    assert report.replaced == [{"node": "mul_2", "as": "F.rms_norm([16], eps=1e-06) on x.to(torch.float32)"}]
    (call,) = [n for n in gm.graph.nodes if n.target is F.rms_norm]
    assert call.args[0].target == "to" and call.args[0].args[1] is torch.float32
    # Gemma's 1 + w, folded once as the model computes it (in float32).
    folded = gm.get_parameter(call.kwargs["weight"].args[0].target)
    assert folded.dtype == torch.float32
    assert torch.equal(folded, 1.0 + module.weight.detach().float())
    (want,), (got,) = _outputs(module, x), _outputs(gm, x)
    assert got.dtype == torch.float16
    _assert_close((want,), (got,), 8 * torch.finfo(torch.float16).eps)


def test_float16_layer_norm_without_upcast_refused() -> None:
    module = HalfLayerNorm().half()
    gm, report = fuse_norm_calls_with_report(module)
    assert report.replaced == []
    assert "outputs differ from F.layer_norm" in report.refused[0]["reason"]
    assert "float16" in report.refused[0]["reason"]
    assert gm.code == fx.symbolic_trace(module).code


def test_graph_module_taken_as_is_and_copied() -> None:
    traced = fx.symbolic_trace(LlamaMLPBlock())
    code = traced.code
    gm = fuse_norm_calls(traced)
    assert gm is not traced and traced.code == code
    assert _f_calls(gm) == {"rms_norm": 2}


def test_untraceable_module_is_an_input_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(InputError, match="cannot trace Branchy"):
        fuse_norm_calls(Branchy())


def test_report_to_dict_is_json() -> None:
    _, report = fuse_norm_calls_with_report(INLINE["rms_with_bias"].build()[0])
    assert json.loads(json.dumps(report.to_dict())) == {
        "replaced": [{"node": "mul_1", "as": "F.rms_norm([16], eps=1e-06)", "kept": "`add_1`: F.rms_norm has no bias"}],
        "refused": [],
    }


class _Chained(nn.Module):
    """RMSNorm of an RMSNorm, and the first one computed a second time."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def rms(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.rms(x)
        return self.rms(first) - self.rms(x)


def test_chained_and_repeated_norms() -> None:
    module = _Chained()
    gm, report = fuse_norm_calls_with_report(module)
    assert len(report.replaced) == 2 and report.refused == []
    norms = [n for n in gm.graph.nodes if n.target is F.rms_norm]
    assert len(norms) == 2 and norms[1].args[0] is norms[0]
    x = torch.randn(3, 8, dtype=torch.float64)
    _assert_close(_outputs(module.double(), x), _outputs(gm.double(), x), 1e-6)


class _InPlace(nn.Module):
    """x is doubled in place between the mean square and the multiply: not an RMSNorm of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        ms = x.pow(2).mean(-1, keepdim=True)
        x.mul_(2.0)
        return x * torch.rsqrt(ms + 1e-6)


def test_in_place_change_of_the_input_refused() -> None:
    gm, report = fuse_norm_calls_with_report(_InPlace())
    assert report.replaced == [] and "in place" in report.refused[0]["reason"]
    x = torch.randn(3, 8)
    assert torch.equal(gm(x), _InPlace()(x))


class _Generated(nn.Module):
    """LayerNorm or RMSNorm inline over the last ``len(shape)`` dims, in one of two spellings."""

    def __init__(self, shape: tuple[int, ...], eps: float, rms: bool, bias: bool, spelling: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(shape)) if bias else None
        self.dims = tuple(range(-len(shape), 0))
        self.eps, self.rms, self.spelling = eps, rms, spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            x = x - x.mean(self.dims, keepdim=True)
        if self.spelling == 0:
            y = x * torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + self.eps)
        else:
            y = x / torch.sqrt(torch.mean(x * x, dim=list(self.dims), keepdim=True) + self.eps)
        y = self.weight * y
        return y + self.bias if self.bias is not None else y


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(2, 9), min_size=1, max_size=2).map(tuple),
    eps=st.sampled_from([0.0, 1e-12, 1e-8, 1e-6, 1e-5, 3e-4, 0.1]),
    rms=st.booleans(),
    bias=st.booleans(),
    spelling=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_generated_norm_rewritten_eps_exact(
    shape: tuple[int, ...], eps: float, rms: bool, bias: bool, spelling: int, seed: int
) -> None:
    torch.manual_seed(seed)
    module = _Generated(shape, eps, rms, bias, spelling)
    gm, report = fuse_norm_calls_with_report(module)
    if eps == 0.0:
        # Zero rows give 0 / 0 in the original as in the F. op: nothing is verified, nothing rewritten.
        assert report.replaced == [] and "non-finite" in report.refused[0]["reason"]
        return
    op = F.rms_norm if rms else F.layer_norm
    (call,) = [n for n in gm.graph.nodes if n.target in _F_OPS]
    assert call.target is op
    assert call.args[1] == shape and call.kwargs["eps"] == eps
    assert call.kwargs["weight"].target == "weight"
    if not rms:
        assert (call.kwargs["bias"] is not None) == bias
    assert ("kept" in report.replaced[0]) == (rms and bias)
    x = torch.randn(3, 2, *shape, dtype=torch.float64)
    x[0, 0] = 0.0
    _assert_close(_outputs(module.double(), x), _outputs(gm.double(), x), 1e-6)
