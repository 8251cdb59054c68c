"""diffusers' UNet block spelling (ResnetBlock2D, TimestepEmbedding, spatial Attention), shrunk.

``conv_in -> ResnetBlock2D -> Attention -> ResnetBlock2D (width change, 1x1 shortcut) ->
GroupNorm -> SiLU -> conv_out``. Each ResnetBlock2D is ``GroupNorm(8, C) -> SiLU -> conv3x3``,
plus the timestep embedding projected by ``Linear(SiLU(temb))`` and broadcast over H and W,
then ``GroupNorm -> SiLU -> conv3x3`` and the skip connection. The timestep embedding itself is
diffusers' ``TimestepEmbedding`` (Linear -> SiLU -> Linear) of the ``temb`` input. The
attention block normalizes with GroupNorm, attends over the H*W positions with one head, and
adds the residual.

GroupNorm is the pattern here: TorchScript exports it as Reshape -> InstanceNormalization ->
Reshape -> Mul -> Add, the dynamo exporter at opset 18 differently; a GroupNorm followed by a
conv cannot be folded into it (the statistics depend on the input).
"""

from __future__ import annotations

__all__ = ["Attention", "ResnetBlock2D", "UNetBlock", "build"]

import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded

GROUPS = 8
EPS = 1e-5


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D with the default "default" time-embedding norm."""

    def __init__(self, cin: int, cout: int, temb_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, cout)
        self.norm2 = nn.GroupNorm(GROUPS, cout, eps=EPS)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        hidden_states = hidden_states + temb
        hidden_states = self.nonlinearity(self.norm2(hidden_states))
        hidden_states = self.conv2(self.dropout(hidden_states))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


class Attention(nn.Module):
    """diffusers' spatial self-attention (one head) with a GroupNorm and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(GROUPS, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        self.scale = channels**-0.5

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = self.group_norm(hidden_states).view(batch, channels, height * width).transpose(1, 2)
        query, key, value = self.to_q(hidden_states), self.to_k(hidden_states), self.to_v(hidden_states)
        probs = (torch.matmul(query, key.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        hidden_states = self.to_out(torch.matmul(probs, value))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        return hidden_states + residual


class UNetBlock(nn.Module):
    """``(sample, temb) -> sample``: conv_in, two resnet blocks around attention, conv_out."""

    def __init__(self, channels: int, width: int, temb_channels: int) -> None:
        super().__init__()
        self.time_embedding = nn.Sequential(
            nn.Linear(temb_channels, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width)
        )
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.resnet1 = ResnetBlock2D(width, width, 4 * width)
        self.attention = Attention(width)
        self.resnet2 = ResnetBlock2D(width, 2 * width, 4 * width)
        self.conv_norm_out = nn.GroupNorm(GROUPS, 2 * width, eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(temb)
        hidden_states = self.resnet1(self.conv_in(sample), emb)
        hidden_states = self.resnet2(self.attention(hidden_states), emb)
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))


def build(
    *,
    seed: int = 0,
    width: int = 32,
    channels: int = 4,
    temb_channels: int = 32,
    batch: int = 1,
    image: int = 16,
) -> ZooModel:
    """UNet block on ``batch x channels x image x image`` samples with ``batch x temb_channels`` temb."""
    if width % GROUPS:
        raise InputError(f"width ({width}) must be a multiple of the {GROUPS} GroupNorm groups")
    with seeded(seed):
        module = UNetBlock(channels, width, temb_channels)
        randomize_norms(module)
        sample = torch.randn(batch, channels, image, image)
        temb = torch.randn(batch, temb_channels)
    return finish("unet", module, {"sample": sample, "temb": temb}, {"out_sample": {0: "batch"}})
