"""The DiT repository's spelling (facebookresearch/DiT models.py, with timm's Attention and Mlp), shrunk.

What matters for normfold:

- ``nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)``: no weight or bias, so the
  fused LayerNormalization gets a scale of ones and no bias. Each is followed by adaLN
  modulation, ``modulate(x, shift, scale) = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)``,
  with ``shift`` and ``scale`` computed per sample from the conditioning vector
  (``adaLN_modulation = Sequential(SiLU, Linear(hidden, 6 * hidden))`` chunked in six): an
  affine that is *not* a constant and must not be folded into the norm.
- Gated residuals ``x + gate.unsqueeze(1) * attn(modulate(norm1(x), ...))``, timm's attention
  (fused ``qkv`` Linear, ``reshape/permute/unbind``, scaled scores) and tanh-GELU Mlp.
- The conditioning ``c`` is the timestep embedding: DiT's sinusoidal ``timestep_embedding`` of
  the float ``timesteps`` input (cos and sin of ``t * exp(-log(10000) * i / half)``) through
  ``Linear -> SiLU -> Linear``; the class-label embedding is left out.
- A convolutional stem before the patch embedding, ``Conv2d(3x3) -> GroupNorm -> SiLU`` (the
  latent-side stem of hybrid DiT/UNet models), so the model also holds a GroupNorm, then DiT's
  ``PatchEmbed`` (a strided Conv2d, flatten, transpose), fixed sin-cos position embeddings, and
  ``FinalLayer`` (modulated affine-free LayerNorm, Linear) followed by ``unpatchify``.
"""

from __future__ import annotations

__all__ = ["DiT", "DiTBlock", "FinalLayer", "TimestepEmbedder", "build"]

import math

import numpy as np
import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """Create sinusoidal timestep embeddings of ``dim`` channels from (N,) timesteps."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
        ).to(device=t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # DiT runs under autocast; cast as diffusers' TimestepEmbedding callers do, so that a
        # half-precision copy of the model runs without it.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a ``patch x patch`` stride-``patch`` Conv2d, flattened to tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # NCHW -> NLC


class Attention(nn.Module):
    """timm's Attention, the non-fused path."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """timm's Mlp: ``fc2(act(fc1(x)))``."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: modulated affine-free LayerNorm, Linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size * grid_size, embed_dim) fixed sin-cos position embeddings, as DiT builds them."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class DiT(nn.Module):
    """Conv stem (GroupNorm), patch embedding, DiT blocks, final layer, unpatchify."""

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        stem: int,
        hidden: int,
        depth: int,
        heads: int,
        groups: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1), nn.GroupNorm(groups, stem, eps=1e-6), nn.SiLU()
        )
        self.x_embedder = PatchEmbed(patch_size, stem, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        num_patches = (input_size // patch_size) ** 2
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden, input_size // patch_size)).float()
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        assert self.pos_embed.shape[1] == num_patches
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, patch_size**2 * C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(self.stem(x)) + self.pos_embed
        c = self.t_embedder(t)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def build(
    *,
    seed: int = 0,
    depth: int = 2,
    hidden: int = 32,
    heads: int = 2,
    patch: int = 2,
    channels: int = 4,
    stem: int = 16,
    groups: int = 4,
    batch: int = 2,
    image: int = 8,
) -> ZooModel:
    """DiT on ``batch x channels x image x image`` latents and ``batch`` float timesteps.

    DiT-S/2 is ``depth=12, hidden=384, heads=6, patch=2`` (on 32x32 latents). The adaLN
    modulation layers are random (upstream starts them at zero, which makes every block the
    identity), and the timesteps are spread over [0, 1000).
    """
    if hidden % heads or hidden % 4:
        raise InputError(f"hidden ({hidden}) must be a multiple of heads ({heads}) and of 4")
    if image % patch:
        raise InputError(f"image ({image}) must be a multiple of patch ({patch})")
    if stem % groups:
        raise InputError(f"stem ({stem}) must be a multiple of groups ({groups})")
    with seeded(seed):
        module = DiT(image, patch, channels, stem, hidden, depth, heads, groups)
        randomize_norms(module)
        x = torch.randn(batch, channels, image, image)
        t = torch.rand(batch) * 1000
    return finish("dit", module, {"x": x, "t": t}, {"out": {0: "batch"}})
