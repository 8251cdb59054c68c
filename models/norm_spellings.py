"""Normalization spellings the zoo's models do not hold, and look-alikes that must be refused.

Each entry of :data:`SPELLINGS` is a tiny module written the way some upstream code base writes
its normalization (T5, Gemma, DiT, ConvNeXt, HF LLaMA's q/k-norm, ...) or a near miss that looks
like one but computes something else (unbiased std, eps on the std, ``F.normalize``, Filter
Response Norm, LRN). :attr:`Spelling.expect` says whether ``fuse-norm`` must fuse it (into
:attr:`Spelling.ops` for target ``onnx``, :attr:`Spelling.ort_ops` for ``onnxruntime``) or
refuse it (with a reason that contains :attr:`Spelling.reason`).

Modules are built deterministically (seeded) with random affine parameters, so a swapped scale
and shift or a dropped term changes the outputs. Inputs have symbolic "batch" (and, for token
sequences, "seq") axes. :func:`cached_export` exports a spelling with one of
:data:`VARIANTS` through :func:`normfold.models.export.export` and keeps the file in the zoo's
cache folder, keyed by this file's source and the torch version.
"""

from __future__ import annotations

__all__ = ["SPELLINGS", "VARIANTS", "Spelling", "build", "cached_export"]

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from normfold.errors import InputError
from normfold.models import ZooModel, llama
from normfold.models._common import finish, seeded
from normfold.models.export import ExportVariant, default_cache_dir, export

# The zoo's variants plus dynamo at opset 23 (torch 2.13 exports it; nn.RMSNorm becomes
# RMSNormalization there).
VARIANTS: dict[str, ExportVariant] = {
    v.name: v
    for v in (
        ExportVariant("ts14", "torchscript", 14),
        ExportVariant("ts17", "torchscript", 17),
        ExportVariant("ts17-static", "torchscript", 17, dynamic=False),
        ExportVariant("dynamo18", "dynamo", 18),
        ExportVariant("dynamo18-noopt", "dynamo", 18, optimize=False),
        ExportVariant("dynamo23", "dynamo", 23),
    )
}

# TorchScript below the LayerNormalization opset and at it, dynamo without its optimizer (which
# fuses some spellings itself and deletes tiny eps, see TRAPS.md); dynamo23 where it matters.
ALL_VARIANTS = ("ts14", "ts17", "dynamo18-noopt")
WITH_23 = (*ALL_VARIANTS, "dynamo23")
# TorchScript has no symbolic function for aten::rms_norm.
DYNAMO_ONLY = ("dynamo18-noopt", "dynamo23")
NEAR_MISS_VARIANTS = ("ts17", "dynamo18-noopt")

HIDDEN = 16


@dataclasses.dataclass(frozen=True)
class Spelling:
    """One normalization spelling and what ``fuse-norm`` must do with it.

    ``ops`` / ``ort_ops``: fused op type -> count expected in the output for target ``onnx`` /
    ``onnxruntime`` (``ort_ops`` None: ``ops`` with RMSNormalization spelled as onnxruntime's
    SimplifiedLayerNormalization). ``skip_ops``: the same for target
    ``onnxruntime`` with ``FuseNormPass(skip_ops=True)`` (residual spellings only).
    ``reason``: a fragment of the refusal reason (near misses only).
    ``variants``: the export variants (keys of :data:`VARIANTS`) the spelling is tested with.
    """

    name: str
    build: Callable[[], ZooModel]
    expect: Literal["fuse", "refuse"]
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    ort_ops: dict[str, int] | None = None
    skip_ops: dict[str, int] | None = None
    reason: str | None = None
    variants: tuple[str, ...] = ALL_VARIANTS
    rtol: float = 1e-4
    atol: float = 1e-4

    @property
    def expected_ort_ops(self) -> dict[str, int]:
        if self.ort_ops is not None:
            return self.ort_ops
        return {("SimplifiedLayerNormalization" if op == "RMSNormalization" else op): n for op, n in self.ops.items()}


def _uniform(*shape: int, low: float = 0.5, high: float = 1.5) -> nn.Parameter:
    """Random affine parameters, some negative, never the identity defaults."""
    values = torch.empty(*shape).uniform_(low, high)
    sign = torch.where(torch.rand(*shape) < 0.2, -1.0, 1.0)
    return nn.Parameter(values * sign)


def _tokens(batch: int = 2, seq: int = 5, hidden: int = HIDDEN) -> torch.Tensor:
    x = torch.randn(batch, seq, hidden)
    x[0, 1] = 0.0  # an all-zero row: padding positions must stay finite
    return x


def _package(
    name: str,
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, dict[int, str]],
    dtype: torch.dtype | None = None,
    seq_inputs: tuple[str, ...] = (),
) -> ZooModel:
    """Package like the zoo does; ``seq_inputs`` also get a symbolic "seq" axis 1."""
    if dtype is not None:
        module = module.to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    zoo = finish(name, module, inputs, outputs)
    axes = {k: dict(v) for k, v in zoo.dynamic_axes.items()}
    for input_name in seq_inputs:
        axes[input_name][1] = "seq"
    return dataclasses.replace(zoo, dynamic_axes=axes)


_TOKEN_OUT = {"y": {0: "batch", 1: "seq"}}
_IMAGE_OUT = {"y": {0: "batch"}}


class _HandNorm(nn.Module):
    """What every hand-written spelling here holds: a non-trivial ``weight`` of ``shape``, a
    ``bias`` (None when ``bias`` is False) and ``eps``; subclasses write only ``forward``."""

    def __init__(self, shape: tuple[int, ...], eps: float, *, bias: bool) -> None:
        super().__init__()
        self.weight = _uniform(*shape)
        self.bias = nn.Parameter(torch.empty(*shape).uniform_(-0.5, 0.5)) if bias else None
        self.eps = eps


# --- LayerNorm spellings ------------------------------------------------------------------


class HandLayerNorm(_HandNorm):
    """BERT's original TF-style LayerNorm (also ConvNeXt's, channels-last): Pow 2, Div, eps 1e-12."""

    def __init__(self, dim: int, eps: float = 1e-12, bias: bool = True) -> None:
        super().__init__((dim,), eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight * x
        return x + self.bias if self.bias is not None else x


class RsqrtLayerNorm(_HandNorm):
    """Mul(d, d) squares and ``d * rsqrt(var + eps)``, affine written ``x * w + b``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__((dim,), eps, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(-1, keepdim=True)
        var = (d * d).mean(-1, keepdim=True)
        return d * torch.rsqrt(var + self.eps) * self.weight + self.bias


class VarMeanLayerNorm(_HandNorm):
    """``torch.var_mean(correction=0)`` then ``(x - mean) / sqrt(var + eps)``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__((dim,), eps, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class DiTModulatedNorm(nn.Module):
    """DiT's ``LayerNorm(elementwise_affine=False)`` followed by adaLN modulation from ``c``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim)
        self.dim = dim

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.ada(F.silu(c)).unsqueeze(1)
        shift, scale = modulation[..., : self.dim], modulation[..., self.dim :]
        return self.norm(x) * (1 + scale) + shift


class LastTwoAxesLayerNorm(_HandNorm):
    """A hand-written LayerNorm over the last two axes, with a (H, W) affine."""

    def __init__(self, shape: tuple[int, int], eps: float = 1e-5) -> None:
        super().__init__(shape, eps, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean((-2, -1), keepdim=True)
        s = (x - u).pow(2).mean((-2, -1), keepdim=True)
        return (x - u) / torch.sqrt(s + self.eps) * self.weight + self.bias


class ChannelsFirstLayerNorm(_HandNorm):
    """ConvNeXt's channels-first LayerNorm over axis 1 of NCHW (not a last-axis LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__((dim,), eps, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class UpcastLayerNorm(_HandNorm):
    """Mixed precision: normalize in float32, cast back, then the half-precision affine."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__((dim,), eps, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        u = h.mean(-1, keepdim=True)
        s = (h - u).pow(2).mean(-1, keepdim=True)
        h = (h - u) / torch.sqrt(s + self.eps)
        return self.weight * h.to(x.dtype) + self.bias


class ResidualLayerNorm(nn.Module):
    """Residual Add then LayerNorm; with ``keep_sum`` the sum is also returned (pre-LN stream)."""

    def __init__(self, dim: int, keep_sum: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = HandLayerNorm(dim, eps=1e-12)
        self.keep_sum = keep_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = x + self.proj(x)
        y = self.norm(h)
        return (y, h) if self.keep_sum else y


# --- RMSNorm spellings --------------------------------------------------------------------


class LlamaRMSNorm(llama.LlamaRMSNorm):
    """Hugging Face's LlamaRMSNorm (the zoo's, line for line) with a non-trivial weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        self.weight = _uniform(dim)


class T5LayerNorm(nn.Module):
    """T5's RMSNorm: variance from the float32 copy, the input itself times rsqrt, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _uniform(dim)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: Mul(x, x) mean, ``(1 + weight)`` (a constant after folding), type_as."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_(-0.5, 0.5))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class DivRMSNorm(_HandNorm):
    """``x / sqrt(mean(x^2) + eps) * w``: the Div spelling."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__((dim,), eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FunctionalRMSNorm(nn.Module):
    """``F.rms_norm`` with an explicit eps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = _uniform(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


class QKNorm(nn.Module):
    """q/k-norm: an RMSNorm over the head dim of (batch, heads, seq, head_dim) tensors."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q_norm = LlamaRMSNorm(dim // heads)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        with torch.no_grad():
            self.k_norm.weight.copy_(_uniform(dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = x.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        return self.q_norm(q) + self.k_norm(q * 2.0)


class ResidualRMSNorm(nn.Module):
    """LLaMA's residual stream: ``h = x + f(x)``; RMSNorm(h) and h itself both go on."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm = LlamaRMSNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.proj(x)
        return self.norm(h), h


# --- GroupNorm spellings ------------------------------------------------------------------


class HandGroupNorm(_HandNorm):
    """GroupNorm written by hand: view, mean, biased var, normalize, view back, affine."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__((channels,), eps, bias=True)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = x.view(n, self.groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        g = (g - mean) / torch.sqrt(var + self.eps)
        x = g.view(n, c, h, w)
        return x * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, channels, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(_uniform(channels))
        norm.bias.uniform_(-0.5, 0.5)
    return norm


# --- near misses --------------------------------------------------------------------------


class AnnotatedTransformerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: unbiased ``x.std()`` with eps added to the std."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2 = _uniform(dim)
        self.b_2 = nn.Parameter(torch.empty(dim).uniform_(-0.5, 0.5))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class UnbiasedVarNorm(_HandNorm):
    """``(x - mean) / sqrt(x.var(unbiased=True) + eps)``: divides by N - 1, not N."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__((dim,), eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.var(-1, keepdim=True, unbiased=True)
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + self.eps) * self.weight


class EpsOnStdNorm(_HandNorm):
    """Biased variance, but eps added to the standard deviation instead of the variance."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__((dim,), eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(d.pow(2).mean(-1, keepdim=True))
        return d / (std + self.eps) * self.weight


class L2NormalizeScaled(nn.Module):
    """``F.normalize(x) * sqrt(d) * g``: x / max(||x||, eps), not x / sqrt(mean(x^2) + eps)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = _uniform(dim)
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=2) * self.scale * self.g


class CosineNorm(nn.Module):
    """Cosine normalization: ``normalize(x) @ normalize(w).T`` (a bounded dot product)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()


class FilterResponseNorm(nn.Module):
    """Filter Response Norm: x * rsqrt(mean(x^2 over H, W) + eps), per-channel affine, TLU."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = _uniform(1, channels, 1, 1)
        self.beta = nn.Parameter(torch.empty(1, channels, 1, 1).uniform_(-0.5, 0.5))
        self.tau = nn.Parameter(torch.empty(1, channels, 1, 1).uniform_(-0.5, 0.5))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        return torch.max(self.gamma * x + self.beta, self.tau)


class LRNLike(nn.Module):
    """Local response normalization by hand: x / (k + alpha * mean of x^2 over nearby channels)^beta."""

    def __init__(self, size: int = 3, alpha: float = 1e-2, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.pool = nn.AvgPool3d((size, 1, 1), stride=1, padding=(size // 2, 0, 0))
        self.alpha, self.beta, self.k = alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        div = self.pool((x * x).unsqueeze(1)).squeeze(1)
        return x / (self.k + self.alpha * div).pow(self.beta)


# --- the registry -------------------------------------------------------------------------


def _tokens_model(name: str, module: nn.Module, dtype: torch.dtype | None = None) -> ZooModel:
    return _package(name, module, {"x": _tokens()}, _TOKEN_OUT, dtype, seq_inputs=("x",))


def _image_model(name: str, module: nn.Module, channels: int = 8) -> ZooModel:
    x = torch.randn(2, channels, 4, 5)
    x[0, :, 0, 0] = 0.0
    return _package(name, module, {"x": x}, _IMAGE_OUT)


def _entries() -> list[Spelling]:
    ln = {"LayerNormalization": 1}
    rms = {"RMSNormalization": 1}
    gn = {"GroupNormalization": 1}
    # onnxruntime's CPU provider runs Reshape + InstanceNormalization faster (fuse_group_norm).
    gn_ort = {"InstanceNormalization": 1}
    return [
        Spelling(
            "ln_hand_bert", lambda: _tokens_model("ln_hand_bert", HandLayerNorm(HIDDEN)), "fuse", ln,
            variants=(*ALL_VARIANTS, "dynamo18"),
        ),
        # From opset 17 on, both exporters write LayerNormalization themselves.
        Spelling(
            "ln_nn", lambda: _tokens_model("ln_nn", nn.LayerNorm(HIDDEN, eps=1e-12)), "fuse", ln, variants=("ts14",)
        ),
        Spelling("ln_nobias", lambda: _tokens_model("ln_nobias", HandLayerNorm(HIDDEN, 1e-5, bias=False)), "fuse", ln),
        Spelling("ln_rsqrt_mul", lambda: _tokens_model("ln_rsqrt_mul", RsqrtLayerNorm(HIDDEN)), "fuse", ln),
        Spelling("ln_var_mean", lambda: _tokens_model("ln_var_mean", VarMeanLayerNorm(HIDDEN)), "fuse", ln),
        Spelling(
            "ln_dit",
            lambda: _package("ln_dit", DiTModulatedNorm(HIDDEN), {"x": _tokens(), "c": torch.randn(2, HIDDEN)},
                             _TOKEN_OUT, seq_inputs=("x",)),
            "fuse", ln,
        ),
        Spelling(
            "ln_last2",
            lambda: _image_model("ln_last2", LastTwoAxesLayerNorm((4, 5))), "fuse", ln,
        ),
        Spelling(
            "ln_fp16",
            lambda: _tokens_model("ln_fp16", UpcastLayerNorm(HIDDEN), torch.float16), "fuse", ln,
            rtol=2e-3, atol=2e-3,
        ),
        Spelling(
            "ln_channels_first", lambda: _image_model("ln_channels_first", ChannelsFirstLayerNorm(8)), "fuse", ln
        ),
        Spelling("rms_llama", lambda: _tokens_model("rms_llama", LlamaRMSNorm(HIDDEN)), "fuse", rms, variants=WITH_23),
        Spelling(
            "rms_llama_fp16",
            lambda: _tokens_model("rms_llama_fp16", LlamaRMSNorm(HIDDEN), torch.float16), "fuse", rms,
            rtol=2e-3, atol=2e-3,
        ),
        Spelling("rms_t5", lambda: _tokens_model("rms_t5", T5LayerNorm(HIDDEN)), "fuse", rms),
        Spelling("rms_gemma", lambda: _tokens_model("rms_gemma", GemmaRMSNorm(HIDDEN)), "fuse", rms, variants=WITH_23),
        Spelling("rms_div", lambda: _tokens_model("rms_div", DivRMSNorm(HIDDEN)), "fuse", rms),
        Spelling(
            "rms_nn", lambda: _tokens_model("rms_nn", nn.RMSNorm(HIDDEN, eps=1e-6)), "fuse", rms,
            variants=DYNAMO_ONLY,
        ),
        Spelling(
            "rms_functional", lambda: _tokens_model("rms_functional", FunctionalRMSNorm(HIDDEN)), "fuse", rms,
            variants=("dynamo18-noopt",),
        ),
        Spelling(
            "rms_qk", lambda: _package("rms_qk", QKNorm(HIDDEN), {"x": _tokens()}, {"y": {0: "batch", 2: "seq"}},
                                 seq_inputs=("x",)),
            "fuse", {"RMSNormalization": 2}, variants=DYNAMO_ONLY,
        ),
        Spelling("gn_nn", lambda: _image_model("gn_nn", _group_norm(4, 8)), "fuse", gn, ort_ops=gn_ort),
        Spelling(
            "gn_one_group", lambda: _image_model("gn_one_group", _group_norm(1, 8)), "fuse", gn, ort_ops=gn_ort,
            variants=("ts14", "ts17"),
        ),
        Spelling(
            "gn_hand", lambda: _image_model("gn_hand", HandGroupNorm(4, 8)), "fuse", gn, ort_ops=gn_ort,
            variants=WITH_23,
        ),
        Spelling(
            "skip_ln", lambda: _tokens_model("skip_ln", ResidualLayerNorm(HIDDEN)), "fuse", ln,
            skip_ops={"SkipLayerNormalization": 1}, variants=("ts14", "ts17"),
        ),
        Spelling(
            "skip_ln_sum_read",
            lambda: _package("skip_ln_sum_read", ResidualLayerNorm(HIDDEN, keep_sum=True), {"x": _tokens()},
                             {"y": {0: "batch", 1: "seq"}, "h": {0: "batch", 1: "seq"}}, seq_inputs=("x",)),
            "fuse", ln, skip_ops={"SkipLayerNormalization": 1},
        ),
        Spelling(
            "skip_rms",
            lambda: _package("skip_rms", ResidualRMSNorm(HIDDEN), {"x": _tokens()},
                             {"y": {0: "batch", 1: "seq"}, "h": {0: "batch", 1: "seq"}}, seq_inputs=("x",)),
            "fuse", rms, skip_ops={"SkipSimplifiedLayerNormalization": 1},
        ),
        Spelling(
            "nm_std_unbiased", lambda: _tokens_model("nm_std_unbiased", AnnotatedTransformerNorm(HIDDEN)), "refuse",
            reason="unbiased", variants=NEAR_MISS_VARIANTS,
        ),
        Spelling(
            "nm_var_unbiased", lambda: _tokens_model("nm_var_unbiased", UnbiasedVarNorm(HIDDEN)), "refuse",
            reason="unbiased", variants=NEAR_MISS_VARIANTS,
        ),
        Spelling(
            "nm_eps_on_std", lambda: _tokens_model("nm_eps_on_std", EpsOnStdNorm(HIDDEN)), "refuse",
            reason="standard deviation", variants=NEAR_MISS_VARIANTS,
        ),
        Spelling(
            # TorchScript writes the output's last dim as symbolic here, which the zoo's export check refuses.
            "nm_l2_normalize", lambda: _tokens_model("nm_l2_normalize", L2NormalizeScaled(HIDDEN)), "refuse",
            reason="L2", variants=("dynamo18-noopt",),
        ),
        Spelling(
            "nm_cosine", lambda: _tokens_model("nm_cosine", CosineNorm(HIDDEN)), "refuse",
            reason="L2", variants=NEAR_MISS_VARIANTS,
        ),
        Spelling(
            "nm_frn", lambda: _image_model("nm_frn", FilterResponseNorm(8)), "refuse",
            reason="Filter Response", variants=NEAR_MISS_VARIANTS,
        ),
        Spelling(
            "nm_lrn", lambda: _image_model("nm_lrn", LRNLike()), "refuse",
            reason="local response", variants=NEAR_MISS_VARIANTS,
        ),
    ]


def _seeded(spelling: Spelling) -> Spelling:
    def build_seeded() -> ZooModel:
        with seeded(0):
            return spelling.build()

    return dataclasses.replace(spelling, build=build_seeded)


SPELLINGS: dict[str, Spelling] = {s.name: _seeded(s) for s in _entries()}


def build(name: str) -> ZooModel:
    """Build spelling ``name`` (deterministic: seed 0)."""
    if name not in SPELLINGS:
        raise InputError(f"unknown normalization spelling {name!r}; choose one of: {', '.join(SPELLINGS)}")
    return SPELLINGS[name].build()


def cached_export(name: str, variant: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of spelling ``name`` exported with ``variant`` (a key of :data:`VARIANTS`).

    Exports on first use into ``<zoo cache>/spellings``; the key holds this file's source, the
    zoo exporter's source and the torch version, so an edit never returns a stale file.
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown spelling export variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "spellings"
    digest = hashlib.sha256()
    import normfold.models.export as exporter

    for source in (__file__, exporter.__file__):
        digest.update(Path(source).read_bytes())
    path = folder / f"{name}-{variant}-torch{torch.__version__}-{digest.hexdigest()[:12]}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    return export(build(name), VARIANTS[variant], path)
