"""Hugging Face's BERT spelling (transformers' modeling_bert), shrunk to a small encoder.

What matters for normfold:

- ``nn.LayerNorm(hidden, eps=1e-12)``: TorchScript exports below opset 17 decompose it into
  ReduceMean/Sub/Pow/ReduceMean/Add(1e-12)/Sqrt/Div/Mul/Add; a fuser that treats the tiny eps as
  zero (onnxscript's default rules do) turns an all-zero row into NaN.
- The additive attention mask built from an int64 ``attention_mask`` input:
  ``(1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min``; the example inputs have
  padding positions so the mask is not all ones.
- Residual ``LayerNorm(dense(x) + input)`` after attention and after the GELU (erf) MLP, the
  Add+LayerNorm pair that onnxruntime's SkipLayerNormalization fuses.
- A pooler (``tanh(dense(hidden[:, 0]))``) as the second output, as BertModel returns it.
"""

from __future__ import annotations

__all__ = ["BertLayer", "BertModel", "build"]

import math

import torch
from torch import nn

from normfold.errors import InputError
from normfold.models import ZooModel
from normfold.models._common import finish, randomize_norms, seeded

LAYER_NORM_EPS = 1e-12


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, vocab: int, hidden: int, max_positions: int, type_vocab: int = 2) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Scaled dot-product attention with the additive mask, written out as HF's eager path."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        new_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = self.dropout(nn.functional.softmax(scores + attention_mask, dim=-1))
        context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.all_head_size,))


class BertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + input)``: HF's BertSelfOutput and BertOutput."""

    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """Self-attention with Add+LayerNorm, then GELU MLP with Add+LayerNorm."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attention_output = BertResidualOutput(hidden, hidden)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.intermediate_act_fn = nn.GELU()
        self.output = BertResidualOutput(intermediate, hidden)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention = self.attention_output(self.attention(hidden_states, attention_mask), hidden_states)
        return self.output(self.intermediate_act_fn(self.intermediate(attention)), attention)


class BertModel(nn.Module):
    """Embeddings, ``layers`` encoder layers, pooler; returns (last_hidden_state, pooler_output)."""

    def __init__(
        self, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int
    ) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_positions)
        self.layer = nn.ModuleList(BertLayer(hidden, heads, intermediate) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self.embeddings(input_ids, token_type_ids)
        dtype = hidden_states.dtype
        extended = attention_mask[:, None, None, :].to(dtype)
        extended = (1.0 - extended) * torch.finfo(dtype).min
        for layer in self.layer:
            hidden_states = layer(hidden_states, extended)
        pooled = torch.tanh(self.pooler(hidden_states[:, 0]))
        return hidden_states, pooled


def build(
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 100,
    max_positions: int = 512,
    batch: int = 2,
    seq: int = 8,
    token_type_ids: bool = True,
) -> ZooModel:
    """BERT encoder (BERT-base is ``layers=12, hidden=768, heads=12, vocab=30522``).

    The example batch has token ids in [1, vocab) with trailing padding (id 0, mask 0) in every
    row but the first; ``token_type_ids`` marks the second half of each row as segment 1, or is
    left out (the model then uses zeros) when ``token_type_ids`` is False.
    """
    if hidden % heads:
        raise InputError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if seq > max_positions:
        raise InputError(f"seq ({seq}) exceeds max_positions ({max_positions})")
    with seeded(seed):
        module = BertModel(vocab, hidden, layers, heads, intermediate or 4 * hidden, max_positions)
        randomize_norms(module)
        input_ids = torch.randint(1, vocab, (batch, seq))
        lengths = [seq] + [max(1, seq - 1 - (i % max(1, seq - 1))) for i in range(1, batch)]
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
        input_ids = input_ids * mask
        types = (torch.arange(seq)[None, :] >= seq // 2).to(torch.int64).expand(batch, -1).contiguous()
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if token_type_ids:
        inputs["token_type_ids"] = types
    outputs = {"last_hidden_state": {0: "batch", 1: "seq"}, "pooler_output": {0: "batch"}}
    return finish("bert", module, inputs, outputs)
