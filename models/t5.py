"""Hugging Face's T5 encoder spelling (transformers' modeling_t5), shrunk.

What matters for normfold:

- ``T5LayerNorm`` as HF writes it: the *variance* comes from a float32 copy,
  ``hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)``, but the input itself (not
  the copy) is multiplied by ``torch.rsqrt(variance + eps)``; the result is cast to the weight's
  dtype only when that is half precision, then ``self.weight * hidden_states``. No mean is
  subtracted and there is no bias: an RMSNorm under a LayerNorm name.
- Pre-norm blocks with residual adds (``hidden_states + dropout(layer(norm(hidden_states)))``)
  and a final RMSNorm, as ``T5Stack`` runs them; in half precision each block clamps the hidden
  states to the float16 range first, as HF does.
- Attention without score scaling (T5 folds it into the initialisation) and with the additive
  padding mask built from an int64 ``attention_mask`` input, softmax in float32. The relative
  position bias is left out: it adds no normalization.
- The feed-forward of T5 v1.0 (``DenseReluDense``: ``wo(relu(wi(x)))``) or of T5 v1.1 / Flan-T5
  (``T5DenseGatedActDense``: ``wo(gelu_new(wi_0(x)) * wi_1(x))``, the tanh GELU written out),
  chosen by ``feed_forward``.
"""

from __future__ import annotations

__all__ = ["T5Block", "T5EncoderModel", "T5LayerNorm", "build"]

import math

import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded

FEED_FORWARDS = ("relu", "gated-gelu")


class T5LayerNorm(nn.Module):
    """HF's T5LayerNorm, line for line: RMSNorm with the variance computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # convert into half-precision if necessary
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class NewGELUActivation(nn.Module):
    """HF's ``gelu_new``: the tanh approximation of GELU, written out."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))
        return 0.5 * input * (1.0 + torch.tanh(inner))


class T5DenseActDense(nn.Module):
    """T5 v1.0's feed-forward: ``wo(dropout(relu(wi(x))))``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.act = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.act(self.wi(hidden_states)))
        if hidden_states.dtype != self.wo.weight.dtype:
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        return self.wo(hidden_states)


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's gated feed-forward: ``wo(dropout(gelu_new(wi_0(x)) * wi_1(x)))``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.act = NewGELUActivation()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states))
        if hidden_states.dtype != self.wo.weight.dtype:
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        return self.wo(hidden_states)


class T5LayerFF(nn.Module):
    """``x + dropout(DenseReluDense(layer_norm(x)))``."""

    def __init__(self, d_model: int, d_ff: int, feed_forward: str, eps: float) -> None:
        super().__init__()
        dense = T5DenseGatedActDense if feed_forward == "gated-gelu" else T5DenseActDense
        self.DenseReluDense = dense(d_model, d_ff)
        self.layer_norm = T5LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        forwarded_states = self.DenseReluDense(self.layer_norm(hidden_states))
        return hidden_states + self.dropout(forwarded_states)


class T5Attention(nn.Module):
    """T5's self-attention, eager path: no score scaling, additive mask, softmax in float32."""

    def __init__(self, d_model: int, heads: int, d_kv: int) -> None:
        super().__init__()
        self.n_heads = heads
        self.key_value_proj_dim = d_kv
        inner_dim = heads * d_kv
        self.q = nn.Linear(d_model, inner_dim, bias=False)
        self.k = nn.Linear(d_model, inner_dim, bias=False)
        self.v = nn.Linear(d_model, inner_dim, bias=False)
        self.o = nn.Linear(inner_dim, d_model, bias=False)
        self.dropout = 0.1

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_states.shape[0]

        def shape(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)

        query_states = shape(self.q(hidden_states))
        key_states = shape(self.k(hidden_states))
        value_states = shape(self.v(hidden_states))
        scores = torch.matmul(query_states, key_states.transpose(3, 2))
        scores += mask
        attn_weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.view(batch_size, -1, self.n_heads * self.key_value_proj_dim)
        return self.o(attn_output)


class T5LayerSelfAttention(nn.Module):
    """``x + dropout(SelfAttention(layer_norm(x)))``."""

    def __init__(self, d_model: int, heads: int, d_kv: int, eps: float) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(d_model, heads, d_kv)
        self.layer_norm = T5LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attention_output = self.SelfAttention(self.layer_norm(hidden_states), mask)
        return hidden_states + self.dropout(attention_output)


def _clamp_half(hidden_states: torch.Tensor) -> torch.Tensor:
    """HF's "clamp inf values to enable fp16 training", applied after each sub-layer."""
    if hidden_states.dtype == torch.float16:
        clamp_value = torch.where(
            torch.isinf(hidden_states).any(),
            torch.finfo(hidden_states.dtype).max - 1000,
            torch.finfo(hidden_states.dtype).max,
        )
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


class T5Block(nn.Module):
    """An encoder block: self-attention sub-layer, then feed-forward sub-layer."""

    def __init__(self, d_model: int, heads: int, d_kv: int, d_ff: int, feed_forward: str, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(d_model, heads, d_kv, eps), T5LayerFF(d_model, d_ff, feed_forward, eps)]
        )

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden_states = _clamp_half(self.layer[0](hidden_states, mask))
        return _clamp_half(self.layer[-1](hidden_states))


class T5EncoderModel(nn.Module):
    """Embedding, encoder blocks, final RMSNorm; ``input_ids, attention_mask`` -> hidden states."""

    def __init__(
        self,
        vocab: int,
        d_model: int,
        layers: int,
        heads: int,
        d_kv: int,
        d_ff: int,
        feed_forward: str,
        eps: float,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d_model)
        self.block = nn.ModuleList(
            T5Block(d_model, heads, d_kv, d_ff, feed_forward, eps) for _ in range(layers)
        )
        self.final_layer_norm = T5LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.embed_tokens(input_ids))
        dtype = hidden_states.dtype
        extended = attention_mask[:, None, None, :].to(dtype)
        extended = (1.0 - extended) * torch.finfo(dtype).min
        for layer_module in self.block:
            hidden_states = layer_module(hidden_states, extended)
        return self.dropout(self.final_layer_norm(hidden_states))


def build(
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    d_kv: int | None = None,
    d_ff: int | None = None,
    feed_forward: str = "gated-gelu",
    vocab: int = 100,
    eps: float = 1e-6,
    batch: int = 2,
    seq: int = 8,
) -> ZooModel:
    """T5 encoder (t5-v1.1-base is ``layers=12, hidden=768, heads=12, d_ff=2048, vocab=32128``).

    ``d_kv`` defaults to ``hidden // heads``, ``d_ff`` to ``2 * hidden``. The example batch has
    trailing padding (id 0, mask 0) in every row but the first.
    """
    if feed_forward not in FEED_FORWARDS:
        raise InputError(f"feed_forward {feed_forward!r} is not one of: {', '.join(FEED_FORWARDS)}")
    if d_kv is None and hidden % heads:
        raise InputError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    d_kv = d_kv or hidden // heads
    with seeded(seed):
        module = T5EncoderModel(vocab, hidden, layers, heads, d_kv, d_ff or 2 * hidden, feed_forward, eps)
        randomize_norms(module, extra=(T5LayerNorm,))
        input_ids = torch.randint(1, vocab, (batch, seq))
        lengths = [seq] + [max(1, seq - 1 - (i % max(1, seq - 1))) for i in range(1, batch)]
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
        input_ids = input_ids * mask
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    return finish("t5", module, inputs, {"last_hidden_state": {0: "batch", 1: "seq"}})
