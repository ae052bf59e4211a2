"""Multi-head scaled dot-product attention and the Transformer encoder layer built on it.

Parameter names, shapes, initialisation, mask conventions and return values follow PyTorch's
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``, so their weights load unchanged.
"""
import math

import numpy as np

from disttrain import ops
from disttrain.nn import functional as F, init
from disttrain.nn.dropout import Dropout
from disttrain.nn.linear import Linear
from disttrain.nn.module import Module
from disttrain.nn.norm import LayerNorm
from disttrain.nn.parameter import Parameter
from disttrain.ops.operands import xp_of
from disttrain.tensor import Tensor


def _additive_mask(mask, name, dtype, xp):
    """A mask as numbers to add to the attention scores: boolean True (= may not attend)
    becomes -inf, a float mask is added as it is."""
    mask = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
    if mask.dtype == bool:
        return xp.where(mask, -np.inf, 0).astype(dtype)
    if mask.dtype.kind != "f":
        raise TypeError(f"MultiheadAttention: {name} must be boolean or floating, got dtype {mask.dtype}")
    return mask.astype(dtype, copy=False)


class MultiheadAttention(Module):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(head_dim) + mask) V, in num_heads heads.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) returns (output, weights): output like query,
    weights (N, L, S) averaged over heads (or (N, num_heads, L, S)), or None without need_weights.
    Shapes are (L, N, E) - or (N, L, E) with batch_first - or unbatched (L, E).
    ``attn_mask`` is (L, S) or (N * num_heads, L, S); ``key_padding_mask`` is (N, S); a boolean
    mask is True where attention is NOT allowed, a float mask is added to the scores.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False):
        super().__init__()
        # PyTorch's positional order is kept; the options below are not implemented here.
        if add_bias_kv or add_zero_attn or kdim not in (None, embed_dim) or vdim not in (None, embed_dim):
            raise NotImplementedError("MultiheadAttention: add_bias_kv, add_zero_attn and kdim/vdim other "
                                      "than embed_dim are not supported")
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} is not divisible by "
                             f"num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim, self.batch_first = embed_dim // num_heads, batch_first
        self.in_proj_weight = Parameter(np.zeros((3 * embed_dim, embed_dim), np.float32))
        if bias:
            self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, np.float32))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        # PyTorch's choice: Glorot for the packed q/k/v projection, zero biases; out_proj keeps
        # Linear's default weight initialisation.
        init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def _project(self, query, key, value):
        """q, k, v as (N, heads, length, head_dim); one packed matmul for self-attention."""
        embed = self.embed_dim
        if query is key and key is value:
            q, k, v = ops.split(F.linear(query, self.in_proj_weight, self.in_proj_bias), 3, axis=-1)
        else:
            weights = ops.split(self.in_proj_weight, 3, axis=0)
            biases = ops.split(self.in_proj_bias, 3, axis=0) if self.in_proj_bias is not None else [None] * 3
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
        batch = query.shape[0]
        return [t.reshape(batch, t.shape[1], self.num_heads, embed // self.num_heads).transpose(0, 2, 1, 3)
                for t in (q, k, v)]

    def _mask(self, attn_mask, key_padding_mask, is_causal, batch, target, source, like):
        """One additive mask broadcastable to (N, heads, L, S), or None."""
        xp, dtype = xp_of(like), like.dtype
        total = None
        if attn_mask is None and is_causal:
            attn_mask = xp.triu(xp.ones((target, source), bool), k=1)
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, "attn_mask", dtype, xp)
            if mask.shape == (target, source):
                total = mask
            elif mask.shape == (batch * self.num_heads, target, source):
                total = mask.reshape(batch, self.num_heads, target, source)
            else:
                raise ValueError(f"MultiheadAttention: attn_mask of shape {mask.shape}; expected "
                                 f"{(target, source)} or {(batch * self.num_heads, target, source)}")
        if key_padding_mask is not None:
            mask = _additive_mask(key_padding_mask, "key_padding_mask", dtype, xp)
            if mask.shape != (batch, source):
                raise ValueError(f"MultiheadAttention: key_padding_mask of shape {mask.shape}; "
                                 f"expected (batch, source length) = {(batch, source)}")
            mask = mask.reshape(batch, 1, 1, source)
            total = mask if total is None else total + mask
        return None if total is None else Tensor(total)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(f"MultiheadAttention: query, key and value must all be 3-D (batched) or "
                             f"2-D (unbatched), got shapes {query.shape}, {key.shape}, {value.shape}")
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.embed_dim or value.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiheadAttention: the last axis of query, key and value must be "
                             f"embed_dim={self.embed_dim}, got shapes {query.shape}, {key.shape}, {value.shape}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"MultiheadAttention: key {key.shape} and value {value.shape} differ in length")
        batched = query.ndim == 3
        same = query is key and key is value
        if not batched:  # unbatched (L, E): a batch of one
            query, key, value = (t.expand_dims(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = (key_padding_mask.data if isinstance(key_padding_mask, Tensor)
                                    else np.asarray(key_padding_mask))[None]
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(1, 0, 2) for t in (query, key, value))
        if same:
            key = value = query
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[0] != batch:
            raise ValueError(f"MultiheadAttention: query batch {batch} and key batch {key.shape[0]} differ")

        q, k, v = self._project(query, key, value)
        scores = ops.matmul(q * (1 / math.sqrt(self.head_dim)), k.transpose(0, 1, 3, 2))  # (N, h, L, S)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, batch, target, source, scores)
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, axis=-1)
        if self.dropout and self.training:
            weights = F.dropout(weights, self.dropout, training=True)
        heads = ops.matmul(weights, v)                                  # (N, h, L, head_dim)
        output = self.out_proj(heads.transpose(0, 2, 1, 3).reshape(batch, target, self.embed_dim))

        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(1, 0, 2)
        if not need_weights:
            return output, None
        if average_attn_weights:
            weights = weights.mean(axis=1)
        return output, (weights if batched else weights.squeeze(0))

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class TransformerEncoderLayer(Module):
    """Self-attention then a position-wise feed-forward net, each with a residual connection and
    LayerNorm - after the residual (post-norm, "Attention is all you need"), or before it with
    ``norm_first=True`` (pre-norm, which trains deep stacks more stably).

    ``activation`` is "relu", "gelu" (exact, as PyTorch's) or a callable.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' or a "
                                 f"callable, got {activation!r}")
            activation = _ACTIVATIONS[activation]
        self.activation = activation

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._self_attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._feed_forward(self.norm2(x))
        else:
            x = self.norm1(x + self._self_attention(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._feed_forward(x))
        return x

    def _self_attention(self, x, attn_mask, key_padding_mask, is_causal):
        out, _ = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                need_weights=False, is_causal=is_causal)
        return self.dropout1(out)

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
