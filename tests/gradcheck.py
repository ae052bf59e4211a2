"""The one finite-difference gradient check every op and layer test uses."""
import numpy as np

import disttrain as dt


def numerical_grad(f, arrays, index, eps=1e-6):
    """d sum(f(*arrays) * weights) / d arrays[index], by central differences (float64)."""
    x = arrays[index]
    grad = np.zeros_like(x)
    flat = x.reshape(-1)  # a view: writes go to x
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = f(*arrays)
        flat[i] = saved - eps
        minus = f(*arrays)
        flat[i] = saved
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(op, *inputs, wrt=None, atol=1e-6, rtol=1e-5, seed=0):
    """Check the gradient of ``op(*tensors)`` against central differences, in float64.

    ``inputs`` are numpy arrays (made float64 tensors that require grad) or anything else
    (passed through unchanged). The output is reduced with fixed random weights, so every
    output element's gradient path is exercised. ``wrt`` limits the inputs checked.
    Returns the output tensor.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.array(x, dtype=np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x
              for x in inputs]
    float_positions = [i for i, x in enumerate(arrays) if isinstance(x, np.ndarray) and x.dtype.kind == "f"]
    wrt = float_positions if wrt is None else wrt

    def as_inputs(*values, requires_grad=False):
        return [dt.tensor(v, requires_grad=requires_grad) if i in float_positions else v
                for i, v in enumerate(values)]

    leaves = as_inputs(*arrays, requires_grad=True)
    out = op(*leaves)
    weights = rng.standard_normal(out.shape)
    (out * weights).sum().backward()

    def scalar(*values):
        with dt.no_grad():
            return float((op(*as_inputs(*values)).data * weights).sum())

    for i in wrt:
        expected = numerical_grad(scalar, arrays, i)
        got = leaves[i].grad
        assert got is not None, f"input {i}: no gradient reached it"
        if isinstance(got, dt.RowSparseGrad):
            got = got.to_dense()
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol,
                                   err_msg=f"gradient of input {i} (shape {arrays[i].shape})")
    return out
