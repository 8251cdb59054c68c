"""Hugging Face's LLaMA spelling (transformers' modeling_llama), shrunk to a small decoder.

What matters for normfold:

- ``LlamaRMSNorm`` exactly as HF writes it: the input is cast to float32, ``x.pow(2).mean(-1,
  keepdim=True)``, ``x * torch.rsqrt(variance + eps)``, cast back, times the weight. It exports
  to Cast/Pow/ReduceMean/Add/Sqrt/Reciprocal (or Rsqrt)/Mul/Cast/Mul, Casts included even in a
  float32 model.
- Rotary position embeddings (``rotate_half`` with cos/sin from ``inv_freq @ position_ids``),
  a causal additive mask built from an ``arange`` comparison (which every opset exports), and
  grouped-query attention when ``kv_heads < heads``, with attention probabilities in float32.
- SwiGLU MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))`` and bias-free projections.
"""

from __future__ import annotations

__all__ = ["LlamaDecoderLayer", "LlamaModel", "LlamaRMSNorm", "build"]

import math

import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded


class LlamaRMSNorm(nn.Module):
    """HF's LlamaRMSNorm, line for line."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos and sin of ``position * inv_freq``, duplicated to the full head size."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, dim)


class LlamaAttention(nn.Module):
    """Causal multi-head (or grouped-query) attention with rotary embeddings, eager path."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim or hidden // heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = self.normalize_qk(query, key)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * self.scaling + attention_mask
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights, value).transpose(1, 2).contiguous()
        return self.o_proj(output.reshape(*input_shape, -1).contiguous())

    def normalize_qk(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q/k-norm before the rotary embedding: none in LLaMA (Gemma 3 has one)."""
        return query, key


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer: RMSNorm -> attention -> add, RMSNorm -> MLP -> add."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads)
        self.mlp = LlamaMLP(hidden, intermediate)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, position_embeddings, attention_mask)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class CausalDecoder(nn.Module):
    """The forward LLaMA and Gemma share: ``embed_tokens``, RoPE (``rotary_emb``) and an additive
    causal mask, ``layers``, the final ``norm``, ``lm_head``; ``input_ids`` -> logits."""

    embed_tokens: nn.Module
    rotary_emb: LlamaRotaryEmbedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        dtype = hidden_states.dtype
        causal = (positions[None, :] > positions[:, None]).to(dtype) * torch.finfo(dtype).min
        causal = causal[None, None, :, :]
        position_embeddings = self.rotary_emb(hidden_states, positions.unsqueeze(0))
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, causal)
        return self.lm_head(self.norm(hidden_states))


class LlamaModel(CausalDecoder):
    """Embedding, decoder layers, final RMSNorm, LM head; ``input_ids`` -> logits."""

    def __init__(
        self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, eps: float
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden, heads, kv_heads, intermediate, eps) for _ in range(layers)
        )
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        self.rotary_emb = LlamaRotaryEmbedding(hidden // heads)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)



def build(
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 100,
    eps: float = 1e-6,
    batch: int = 2,
    seq: int = 8,
) -> ZooModel:
    """LLaMA decoder; about 1B parameters at ``layers=16, hidden=2048, heads=32, kv_heads=8,
    intermediate=8192, vocab=32000`` (Llama-3.2-1B's shape with a smaller vocabulary).

    ``intermediate`` defaults to 8/3 of ``hidden`` rounded up to a multiple of 8.
    """
    kv_heads = kv_heads or heads
    if hidden % heads or (hidden // heads) % 2:
        raise InputError(f"hidden ({hidden}) must be a multiple of heads ({heads}) with an even head size")
    if heads % kv_heads:
        raise InputError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    intermediate = intermediate or math.ceil(8 * hidden / 3 / 8) * 8
    with seeded(seed):
        module = LlamaModel(vocab, hidden, layers, heads, kv_heads, intermediate, eps)
        randomize_norms(module, extra=(LlamaRMSNorm,))
        input_ids = torch.randint(0, vocab, (batch, seq))
    return finish("llama", module, {"input_ids": input_ids}, {"logits": {0: "batch", 1: "seq"}})
