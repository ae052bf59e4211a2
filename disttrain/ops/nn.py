"""Neural-network ops: dropout, embedding lookup, losses and normalisation layers.

Losses and normalisations carry their own closed-form gradients: one fused rule costs a few
whole-array passes where the composed graph would keep a dozen intermediates alive.
"""
import numpy as np

from disttrain import backend, random
from disttrain.ops import reduce
from disttrain.ops.broadcast import unbroadcast
from disttrain.ops.elementwise import mul, sub
from disttrain.ops.operands import as_tensor, same_kind, xp_of
from disttrain.tensor import RowSparseGrad, Tensor

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(name, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(loss, reduction):
    """Apply a loss's reduction to a per-element loss tensor (composed, so it differentiates)."""
    if reduction == "mean":
        return reduce.mean(loss)
    if reduction == "sum":
        return reduce.sum(loss)
    return loss


# --- regularisation and lookup -------------------------------------------------------------


def dropout(x, p=0.5, training=True, rng=None):
    """Inverted dropout: zero each element with probability p and scale the rest by 1 / (1 - p),
    so evaluation (``training=False``) is the identity."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    x = as_tensor(x)
    if not training or p == 0:
        return x
    xp = xp_of(x)
    rng = random.default_rng() if rng is None else rng
    keep = rng.random(x.shape, dtype=np.float32) >= p
    scale = x.dtype.type(0 if p == 1 else 1 / (1 - p))
    mask = xp.asarray(keep * scale)
    return Tensor.from_op(x.data * mask, (x,), lambda g: (g * mask,))


def embedding(weight, indices, sparse=False, padding_idx=None):
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ``indices`` of any shape.

    With ``sparse=True`` the gradient is a RowSparseGrad (only the rows used), so a large
    table costs what the batch touched; otherwise a dense array built with add.at. Rows equal
    to ``padding_idx`` get no gradient.
    """
    weight = as_tensor(weight)
    indices = indices.data if isinstance(indices, Tensor) else backend.array_module(weight.data).asarray(indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, got dtype {indices.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be (num_embeddings, dim), got shape {weight.shape}")
    rows = weight.shape[0]
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= rows):
        raise IndexError(f"embedding: indices range over [{int(indices.min())}, {int(indices.max())}] "
                         f"but the table has {rows} rows")
    xp = xp_of(weight)

    def backward(g):
        if padding_idx is not None:
            g = g * (indices != padding_idx)[..., None]
        if sparse:
            return (RowSparseGrad.from_rows(indices, g, weight.shape),)
        grad = xp.zeros(weight.shape, g.dtype)
        xp.add.at(grad, indices.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (grad,)
    return Tensor.from_op(weight.data[indices], (weight,), backward)


# --- losses --------------------------------------------------------------------------------


def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy from raw logits and integer class labels, like PyTorch's.

    logits (N, C) or (N, C, d1, ...); labels (N,) or (N, d1, ...). Labels equal to
    ``ignore_index`` add no loss and no gradient, and "mean" averages over the others.
    The forward is log_softmax's; the gradient is fused, (softmax - smoothed one-hot) * scale,
    with the softmax recovered from the log-probabilities by one exp (log_softmax's own rule
    followed by the pick's would cost two more (N, C) passes and round differently).
    """
    _check_reduction("cross_entropy", reduction)
    logits = as_tensor(logits)
    labels = labels.data if isinstance(labels, Tensor) else backend.array_module(logits.data).asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: labels must be integer class indices, got dtype {labels.dtype}")
    if logits.ndim < 2 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"cross_entropy: logits of shape {logits.shape} need labels of shape "
                         f"{logits.shape[:1] + logits.shape[2:]} (N, C, d1... -> N, d1...), got {labels.shape}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    xp = xp_of(logits)
    classes = logits.shape[1]
    # Work on (M, C) with the class axis last; M counts every labelled position.
    scores = xp.moveaxis(logits.data, 1, -1).reshape(-1, classes) if logits.ndim > 2 else logits.data
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    if bool(((flat_labels < 0) | (flat_labels >= classes))[valid].any()):
        raise IndexError(f"cross_entropy: labels must lie in [0, {classes}) or equal ignore_index "
                         f"({ignore_index})")
    targets = xp.where(valid, flat_labels, 0)
    rows = xp.arange(scores.shape[0])

    log_probs = reduce.log_softmax_array(scores, axis=1)
    losses = -log_probs[rows, targets]
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * log_probs.mean(axis=1)
    losses = (losses * valid).astype(logits.dtype, copy=False)
    count = int(valid.sum())
    if reduction == "none":
        out = losses.reshape(labels.shape)
    elif reduction == "sum":
        out = losses.sum()
    else:  # like PyTorch, a batch where every label is ignored has a mean of nan
        out = losses.sum() / count if count else xp.asarray(np.nan, logits.dtype)

    def backward(g):
        if reduction == "none":
            scale = g.reshape(-1) * valid
        elif reduction == "sum":
            scale = g * valid
        else:
            scale = (g / count if count else g * np.nan) * valid
        grad = xp.exp(log_probs)
        grad[rows, targets] -= 1 - label_smoothing
        if label_smoothing:
            grad -= label_smoothing / classes
        grad *= scale.astype(grad.dtype, copy=False)[:, None]
        if logits.ndim > 2:
            grad = xp.moveaxis(grad.reshape(labels.shape + (classes,)), -1, 1)
        return (grad,)
    return Tensor.from_op(out, (logits,), backward)


def binary_cross_entropy_with_logits(logits, targets, reduction="mean"):
    """Sigmoid + binary cross-entropy in the stable form max(x, 0) - x * y + log(1 + e^-|x|),
    which never takes the log of a sigmoid that rounded to 0 or 1. Targets may require grad."""
    _check_reduction("binary_cross_entropy_with_logits", reduction)
    logits = as_tensor(logits)
    targets = as_tensor(targets, like=logits)
    same_kind("binary_cross_entropy_with_logits", [logits, targets])
    if logits.shape != targets.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: logits of shape {logits.shape} and "
                         f"targets of shape {targets.shape} differ")
    xp = xp_of(logits)
    x, y = logits.data, targets.data
    e = xp.exp(-xp.abs(x))
    losses = xp.maximum(x, 0) - x * y + xp.log1p(e)

    def backward(g):
        probability = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return ((probability - y) * g if logits.requires_grad else None,
                -x * g if targets.requires_grad else None)
    return _reduce(Tensor.from_op(losses, (logits, targets), backward), reduction)


def mse_loss(input, target, reduction="mean"):
    """Mean squared error, composed from sub and mul (its gradient needs no fusing)."""
    _check_reduction("mse_loss", reduction)
    input = as_tensor(input)
    target = as_tensor(target, like=input)
    if input.shape != target.shape:
        raise ValueError(f"mse_loss: input of shape {input.shape} and target of shape {target.shape} differ")
    difference = sub(input, target)
    return _reduce(mul(difference, difference), reduction)


# --- normalisation -------------------------------------------------------------------------


def _standardize(data, axes, eps):
    """(x - mean) / sqrt(var + eps) over ``axes`` (biased variance), with the mean, the variance
    and 1 / sqrt(var + eps) that the gradient and running statistics need."""
    xp = backend.array_module(data)
    mean = data.mean(axis=axes, keepdims=True)
    centred = data - mean
    var = (centred * centred).mean(axis=axes, keepdims=True)
    inv_std = 1 / xp.sqrt(var + eps)
    return centred * inv_std, mean, var, inv_std


def _standardize_backward(grad_normalized, normalized, inv_std, axes):
    """Gradient through x -> (x - mean(x)) / std(x) when the statistics are the batch's own:
    inv_std * (dn - mean(dn) - n * mean(dn * n)), each mean over ``axes``."""
    return inv_std * (grad_normalized - grad_normalized.mean(axis=axes, keepdims=True)
                      - normalized * (grad_normalized * normalized).mean(axis=axes, keepdims=True))


def _affine(name, x, weight, bias, shape):
    """weight and bias as tensors (or None), checked against the per-feature ``shape``."""
    tensors = [x]
    for label, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            if tuple(param.shape) != tuple(shape):
                raise ValueError(f"{name}: {label} of shape {tuple(param.shape)} for input of shape "
                                 f"{x.shape}; expected {tuple(shape)}")
            tensors.append(param)
    same_kind(name, tensors)


def _scale_and_shift(x, normalized, weight, bias, per_feature, axes, backward_normalized):
    """The graph node of a normalisation: ``normalized * weight + bias``, weight and bias (or
    None) reshaped to ``per_feature`` and shared across ``axes``. ``backward_normalized`` maps
    the gradient w.r.t. ``normalized`` to x's."""
    out = normalized * weight.data.reshape(per_feature) if weight is not None else normalized
    if bias is not None:
        out = out + bias.data.reshape(per_feature)

    def backward(g):
        grads = (None,)
        if x.requires_grad:
            grads = (backward_normalized(g * weight.data.reshape(per_feature) if weight is not None else g),)
        if weight is not None:
            grads += ((g * normalized).sum(axis=axes) if weight.requires_grad else None,)
        if bias is not None:
            grads += (g.sum(axis=axes) if bias.requires_grad else None,)
        return grads
    return Tensor.from_op(out, (x,) + tuple(p for p in (weight, bias) if p is not None), backward)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the trailing ``normalized_shape`` axes, then scale and shift per feature."""
    x = as_tensor(x)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if x.shape[x.ndim - len(normalized_shape):] != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {x.shape} does not end with normalized_shape "
                         f"{normalized_shape}")
    weight = None if weight is None else as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    _affine("layer_norm", x, weight, bias, normalized_shape)
    leading = x.ndim - len(normalized_shape)
    axes = tuple(range(leading, x.ndim))
    normalized, _, _, inv_std = _standardize(x.data, axes, eps)
    return _scale_and_shift(x, normalized, weight, bias, normalized_shape, tuple(range(leading)),
                            lambda grad: _standardize_backward(grad, normalized, inv_std, axes))


def _batch_norm_node(x, normalized, inv_std, weight, bias, per_channel, axes):
    """batch_norm's graph node when it normalises with the batch's own statistics. Its
    backward needs sum(g) and sum(g * normalized) per channel, which are also the bias and
    weight gradients: computed once, they give x's gradient in seven passes over the data
    instead of eleven for _standardize_backward composed with the affine rule."""
    scale = weight.data.reshape(per_channel) if weight is not None else None
    out = normalized * scale if scale is not None else normalized
    if bias is not None:
        out = out + bias.data.reshape(per_channel)

    def backward(g):
        count = g.size // g.shape[1]
        sum_g = g.sum(axis=axes, keepdims=True)
        sum_gn = (g * normalized).sum(axis=axes, keepdims=True)
        grads = (None,)
        if x.requires_grad:
            # inv_std * (dn - mean(dn) - n * mean(dn * n)) with dn = g * scale, per channel
            factor = inv_std * scale if scale is not None else inv_std
            grad_x = g * factor
            grad_x -= factor * (sum_g / count)
            grad_x -= normalized * (factor * (sum_gn / count))
            grads = (grad_x,)
        if weight is not None:
            grads += (sum_gn.reshape(-1) if weight.requires_grad else None,)
        if bias is not None:
            grads += (sum_g.reshape(-1) if bias.requires_grad else None,)
        return grads
    return Tensor.from_op(out, (x,) + tuple(p for p in (weight, bias) if p is not None), backward)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalisation of (N, C) or (N, C, H, W, ...) over every axis but the channel axis 1.

    Training uses the batch statistics and updates ``running_mean`` / ``running_var`` in place
    (running = (1 - momentum) * running + momentum * batch, the variance unbiased, as PyTorch
    does); evaluation uses the running statistics. Running stats may be arrays, tensors or None.
    """
    x = as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: expected (N, C) or (N, C, ...) input, got shape {x.shape}")
    channels = x.shape[1]
    weight = None if weight is None else as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    _affine("batch_norm", x, weight, bias, (channels,))
    axes = (0,) + tuple(range(2, x.ndim))
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    running_mean = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    running_var = running_var.data if isinstance(running_var, Tensor) else running_var
    for label, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and tuple(stat.shape) != (channels,):
            raise ValueError(f"batch_norm: {label} of shape {tuple(stat.shape)} for input of shape {x.shape}")
    xp = xp_of(x)

    use_batch_stats = training or running_mean is None or running_var is None
    if use_batch_stats:
        count = x.size // channels
        if training and count < 2:
            raise ValueError(f"batch_norm: training needs more than one value per channel, got input "
                             f"of shape {x.shape}")
        normalized, mean, var, inv_std = _standardize(x.data, axes, eps)
        if training and running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mean.reshape(channels)
        if training and running_var is not None:
            running_var *= 1 - momentum
            running_var += momentum * var.reshape(channels) * (count / (count - 1))
        return _batch_norm_node(x, normalized, inv_std, weight, bias, per_channel, axes)
    inv_std = (1 / xp.sqrt(running_var + eps)).astype(x.dtype, copy=False).reshape(per_channel)
    normalized = (x.data - running_mean.reshape(per_channel)) * inv_std

    def backward_normalized(grad):  # the running statistics are constants
        return grad * inv_std
    return _scale_and_shift(x, normalized, weight, bias, per_channel, axes, backward_normalized)
