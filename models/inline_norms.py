"""Models whose normalizations are written inline in a bigger ``forward``, for ``fuse_norm_calls``.

Each entry of :data:`INLINE` is a tiny model (Linear or Conv layers, activations, residual adds)
whose forward computes a normalization inline, the way an upstream code base writes it (LLaMA's
upcast RMSNorm, a functional LayerNorm with ``var(unbiased=False)``, ``torch.var_mean``, Gemma's
``1 + w``, the Div-by-sqrt RMSNorm, BERT's eps 1e-12, a GroupNorm by view/mean/var/view), or a
near miss that no ``F.`` op computes (a channels-first norm over dim 1, unbiased variance, eps on
the standard deviation, ``keepdim=False``, a tensor eps, an intermediate read elsewhere).
:attr:`InlineCase.ops` says which F. calls ``fuse_norm_calls`` must emit (op name -> count),
:attr:`InlineCase.reason` a fragment of the refusal reason, :attr:`InlineCase.kept` a fragment of
the reason an affine stays in the graph.

Models are built deterministically (seeded) with random affine parameters, so a swapped scale
and shift or a dropped term changes the outputs; inputs hold an all-zero row where a zero row
reaches a normalization unchanged.
"""

from __future__ import annotations

__all__ = ["INLINE", "InlineCase", "build"]

import dataclasses
from collections.abc import Callable

import torch
from normfold.models._common import seeded
from torch import nn
from torch.nn import functional as F

from normfold.errors import InputError

DIM = 16


def _weight(*shape: int) -> nn.Parameter:
    """Random scales, some negative, never the identity default."""
    values = torch.empty(*shape).uniform_(0.5, 1.5)
    return nn.Parameter(values * torch.where(torch.rand(*shape) < 0.2, -1.0, 1.0))


def _bias(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-0.5, 0.5))


# --- spellings that fuse ------------------------------------------------------------------


class LlamaMLPBlock(nn.Module):
    """An attention-free LLaMA block: inline RMSNorm, SwiGLU MLP, residual, inline final RMSNorm."""

    def __init__(self, dim: int = DIM, hidden: int = 24, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_weight = _weight(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.final_weight = _weight(dim)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.norm_weight * h.to(input_dtype)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.final_weight * h.to(x.dtype)


class FunctionalLayerNormBlock(nn.Module):
    """Linear, GELU, then ``(h - mean) / sqrt(var(unbiased=False) + eps) * w + b``, Linear."""

    def __init__(self, dim: int = DIM, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.weight = _weight(dim)
        self.bias = _bias(dim)
        self.fc2 = nn.Linear(dim, dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + self.eps)
        return self.fc2(h * self.weight + self.bias)


class VarMeanResidualNorm(nn.Module):
    """``torch.var_mean(correction=0)``, ``(x - mean) * rsqrt(var + eps) * w + b``, after a residual."""

    def __init__(self, dim: int = DIM, eps: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.weight = _weight(dim)
        self.bias = _bias(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.proj(x)
        var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        return self.bias + (h - mean) * torch.rsqrt(var + self.eps) * self.weight


class GemmaBlock(nn.Module):
    """Gemma's RMSNorm inline: float32 ``x * rsqrt(mean(x * x) + eps)``, ``* (1 + w)``, type_as."""

    def __init__(self, dim: int = DIM, eps: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.weight = _bias(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).float()
        h = h * torch.rsqrt((h * h).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class DivRMSBlock(nn.Module):
    """``x / sqrt(mean(x ** 2) + eps) * w`` (torch. function spellings), then SiLU."""

    def __init__(self, dim: int = DIM, eps: float = 1e-8) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x / torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + self.eps) * self.weight
        return F.silu(y)


class BertLayerNorm(nn.Module):
    """BERT's TF-style LayerNorm inline: ``u``, ``(x - u).pow(2).mean``, eps 1e-12, ``w * x + b``."""

    def __init__(self, dim: int = DIM, eps: float = 1e-12) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.bias = _bias(dim)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class ConvGroupNormBlock(nn.Module):
    """Conv, GroupNorm by hand (view, mean, biased var, view back, per-channel affine), SiLU, Conv."""

    def __init__(self, channels: int = 8, groups: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.groups = groups
        self.weight = _weight(channels)
        self.bias = _bias(channels)
        self.eps = eps
        self.conv2 = nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        n, c, h, w = x.shape
        g = x.view(n, self.groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        g = (g - mean) / torch.sqrt(var + self.eps)
        x = g.view(n, c, h, w) * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return self.conv2(F.silu(x))


class LastTwoDimsLayerNorm(nn.Module):
    """A LayerNorm over the last two dims with an (H, W) affine, ``torch.`` reductions."""

    def __init__(self, shape: tuple[int, int] = (4, 5), eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = _weight(*shape)
        self.bias = _bias(*shape)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - torch.mean(x, (-2, -1), keepdim=True)
        return d * (torch.mean(d * d, (-2, -1), keepdim=True) + self.eps).rsqrt() * self.weight + self.bias


class RMSWithBias(nn.Module):
    """An RMSNorm followed by ``* w + b``: F.rms_norm has no bias, so ``+ b`` stays."""

    def __init__(self, dim: int = DIM, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.bias = _bias(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class RowWeightRMS(nn.Module):
    """An RMSNorm whose weight is ``[1, D]``, not the normalized shape ``[D]``: the core fuses,
    the multiply stays."""

    def __init__(self, dim: int = DIM, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _weight(1, dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class HalfLayerNorm(nn.Module):
    """A LayerNorm by hand with no float32 upcast: in float16 its own rounding is not F.layer_norm's."""

    def __init__(self, dim: int = DIM, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.bias = _bias(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(-1, keepdim=True)
        return d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class NormalizedReadTwice(nn.Module):
    """An RMSNorm whose normalized value is returned as well as scaled: the scale cannot join."""

    def __init__(self, dim: int = DIM, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight, y


class ShapeViewGroupNorm(nn.Module):
    """A GroupNorm by hand without affine, viewed back with ``x.shape``: nothing pins the channel
    count, and the view groups any ``C * H * W`` while F.group_norm needs ``C % groups == 0``."""

    def __init__(self, groups: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups = groups
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(x.size(0), self.groups, -1)
        var, mean = torch.var_mean(g, dim=2, keepdim=True, unbiased=False)
        return ((g - mean) / (var + self.eps).sqrt()).view(x.shape)


# --- near misses --------------------------------------------------------------------------


class ChannelsFirstBlock(nn.Module):
    """ConvNeXt's channels-first LayerNorm inline: statistics over dim 1 of NCHW, after a Conv."""

    def __init__(self, channels: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.weight = _weight(channels)
        self.bias = _bias(channels)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class UnbiasedVarNorm(nn.Module):
    """``(x - mean) / sqrt(x.var() + eps)``: ``var`` divides by N - 1."""

    def __init__(self, dim: int = DIM, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + self.eps) * self.weight


class AnnotatedTransformerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: ``a * (x - mean) / (x.std() + eps) + b``."""

    def __init__(self, dim: int = DIM, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2 = _weight(dim)
        self.b_2 = _bias(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class KeepdimFalseRMS(nn.Module):
    """``x * rsqrt(mean(x^2, keepdim=False) + eps)``: on a square input it broadcasts over rows."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1) + self.eps)


class TensorEpsRMS(nn.Module):
    """An RMSNorm whose eps is a buffer tensor, not a literal."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class VarianceReadElsewhere(nn.Module):
    """An RMSNorm whose mean square is also returned: fusing would still have to compute it."""

    def __init__(self, dim: int = DIM, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _weight(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ms = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(ms + self.eps)), ms


# --- the registry -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InlineCase:
    """A model, its example input, and what ``fuse_norm_calls`` must do with it."""

    name: str
    module: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    kept: str | None = None
    zero_row: bool = True

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """The model (seeded) and an input (seeded; with a zero row when ``zero_row``)."""
        with seeded(0):
            module = self.module()
            x = torch.randn(self.input_shape)
        if self.zero_row:
            x[(0,) * (x.dim() - 1)] = 0.0
        return module.eval(), x


_TOKENS = (2, 5, DIM)
_IMAGE = (2, 3, 6, 5)

INLINE: dict[str, InlineCase] = {
    case.name: case
    for case in (
        InlineCase("llama_mlp_block", LlamaMLPBlock, _TOKENS, {"rms_norm": 2}, zero_row=False),
        InlineCase("functional_ln", FunctionalLayerNormBlock, _TOKENS, {"layer_norm": 1}, zero_row=False),
        InlineCase("var_mean_residual", VarMeanResidualNorm, _TOKENS, {"layer_norm": 1}, zero_row=False),
        InlineCase("gemma", GemmaBlock, _TOKENS, {"rms_norm": 1}),
        InlineCase("div_rms", DivRMSBlock, _TOKENS, {"rms_norm": 1}),
        InlineCase("bert_ln", BertLayerNorm, _TOKENS, {"layer_norm": 1}),
        InlineCase("conv_group_norm", ConvGroupNormBlock, _IMAGE, {"group_norm": 1}, zero_row=False),
        InlineCase("last_two_dims_ln", LastTwoDimsLayerNorm, (2, 3, 4, 5), {"layer_norm": 1}),
        InlineCase("rms_with_bias", RMSWithBias, _TOKENS, {"rms_norm": 1}, kept="F.rms_norm has no bias"),
        InlineCase("row_weight_rms", RowWeightRMS, _TOKENS, {"rms_norm": 1}, kept="not the normalized shape"),
        InlineCase("normalized_read_twice", NormalizedReadTwice, _TOKENS, {"rms_norm": 1}, kept="is also read by"),
        InlineCase("nm_channels_first", ChannelsFirstBlock, _IMAGE, reason="counted from the front", zero_row=False),
        InlineCase("nm_unbiased_var", UnbiasedVarNorm, _TOKENS, reason="unbiased variance (correction=1)"),
        InlineCase("nm_std", AnnotatedTransformerNorm, _TOKENS, reason="standard deviation"),
        InlineCase("nm_keepdim_false", KeepdimFalseRMS, (DIM, DIM), reason="keepdim is not True"),
        InlineCase("nm_tensor_eps", TensorEpsRMS, _TOKENS, reason="not a literal"),
        InlineCase("nm_group_norm_no_weight", ShapeViewGroupNorm, _IMAGE, reason="channel count", zero_row=False),
        InlineCase("nm_variance_read", VarianceReadElsewhere, _TOKENS, reason="is also read by `output`"),
    )
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Build case ``name`` (deterministic: seed 0)."""
    if name not in INLINE:
        raise InputError(f"unknown inline normalization case {name!r}; choose one of: {', '.join(INLINE)}")
    return INLINE[name].build()
