"""Hugging Face's Gemma 3 text-decoder spelling (transformers' modeling_gemma3), shrunk.

What matters for normfold:

- ``Gemma3RMSNorm`` as HF writes it: ``x.float()``, ``x * torch.rsqrt(x.pow(2).mean(-1,
  keepdim=True) + eps)``, then ``output * (1.0 + self.weight.float())`` and ``.type_as(x)``.
  The weight is stored as an offset from 1 (zero means identity), so the scale a fuser must
  take is ``1 + weight``, an Add of a constant folded or not.
- Four such norms per layer (Gemma 2/3's sandwich: input, post-attention, pre-feedforward,
  post-feedforward) and two more over ``head_dim`` of the 4-D query and key tensors
  (``q_norm``/``k_norm`` after ``view(...).transpose(1, 2)``), before the rotary embedding.
- The embedding scaled by ``sqrt(hidden)`` (``Gemma3TextScaledWordEmbedding``, the scale a
  buffer cast to the weight's dtype), a GeGLU MLP ``down_proj(gelu_tanh(gate_proj(x)) *
  up_proj(x))``, attention scaled by ``query_pre_attn_scalar ** -0.5`` with softmax in float32,
  grouped-query attention when ``kv_heads < heads``, and an LM head tied to the embedding.

Rotary embeddings, ``repeat_kv`` and the causal mask are LLaMA's (HF copies them); one rotary
base serves all layers and there is no sliding window (at these sequence lengths a window of
512 changes nothing).
"""

from __future__ import annotations

__all__ = ["Gemma3DecoderLayer", "Gemma3ForCausalLM", "Gemma3RMSNorm", "build"]

import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded
from normfold.models.llama import CausalDecoder, LlamaAttention, LlamaMLP, LlamaRotaryEmbedding


class Gemma3RMSNorm(nn.Module):
    """HF's Gemma3RMSNorm, line for line: float32 math, scale ``1 + weight``, ``type_as``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float())
        # Llama does x.to(float16) * w whilst Gemma3 is (x * w).to(float16)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class Gemma3TextScaledWordEmbedding(nn.Embedding):
    """An embedding whose lookups are multiplied by ``embed_scale`` (``sqrt(hidden)``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class Gemma3MLP(LlamaMLP):
    """GeGLU: ``down_proj(gelu_pytorch_tanh(gate_proj(x)) * up_proj(x))``: LLaMA's MLP with GELU."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__(hidden, intermediate)
        self.act_fn = nn.GELU(approximate="tanh")


class Gemma3Attention(LlamaAttention):
    """LLaMA's attention with its own ``head_dim`` and RMSNorm on q and k over it, before RoPE.

    The scaling is ``head_dim ** -0.5`` (query_pre_attn_scalar = head_dim).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim)
        self.q_norm = Gemma3RMSNorm(dim=head_dim, eps=eps)
        self.k_norm = Gemma3RMSNorm(dim=head_dim, eps=eps)

    def normalize_qk(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(query), self.k_norm(key)


class Gemma3DecoderLayer(nn.Module):
    """Sandwich-norm decoder layer: norm -> attention -> norm -> add, norm -> MLP -> norm -> add."""

    def __init__(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float
    ) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(hidden, heads, kv_heads, head_dim, eps)
        self.mlp = Gemma3MLP(hidden, intermediate)
        self.input_layernorm = Gemma3RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = Gemma3RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(hidden, eps=eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, position_embeddings, attention_mask)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states


class Gemma3ForCausalLM(CausalDecoder):
    """Scaled embedding, decoder layers, final RMSNorm, tied LM head; ``input_ids`` -> logits."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        layers: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.embed_tokens = Gemma3TextScaledWordEmbedding(vocab, hidden, embed_scale=hidden**0.5)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(hidden, heads, kv_heads, head_dim, intermediate, eps) for _ in range(layers)
        )
        self.norm = Gemma3RMSNorm(hidden, eps=eps)
        self.rotary_emb = LlamaRotaryEmbedding(head_dim)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tie_word_embeddings


def build(
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 16,
    intermediate: int = 64,
    vocab: int = 100,
    eps: float = 1e-6,
    batch: int = 2,
    seq: int = 8,
) -> ZooModel:
    """Gemma 3 decoder (Gemma-3-1B is ``layers=26, hidden=1152, heads=4, kv_heads=1,
    head_dim=256, intermediate=6912, vocab=262144``).

    Norm weights are drawn like every zoo norm's, so the scales ``1 + weight`` are far from 1
    (some near 0 or negative).
    """
    if head_dim % 2:
        raise InputError(f"head_dim ({head_dim}) must be even (rotary embeddings)")
    if heads % kv_heads:
        raise InputError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    with seeded(seed):
        module = Gemma3ForCausalLM(vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, eps)
        randomize_norms(module, extra=(Gemma3RMSNorm,))
        input_ids = torch.randint(0, vocab, (batch, seq))
    return finish("gemma", module, {"input_ids": input_ids}, {"logits": {0: "batch", 1: "seq"}})
