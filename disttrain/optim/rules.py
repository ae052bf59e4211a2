"""Optimizer update rules, each written once as ``rule(param, grad, state, *, lr, **hyper)`` with
torch.optim's arithmetic; workers and parameter servers (on flat chunks of a key) run the same code."""
import numpy as np

from disttrain import backend


def _cast(factor, param):
    """Keep float32 params in float32: a per-row factor array (see apply_rows) is float64."""
    return factor.astype(param.dtype) if hasattr(factor, "astype") else factor


def _next_step(state):
    """Count this update; ``step`` is an int, or a per-row array under apply_rows."""
    state["step"] = state.get("step", 0) + 1
    return state["step"]


def _with_weight_decay(param, grad, weight_decay):
    """L2 penalty folded into the gradient (torch's ``grad.add(param, alpha=weight_decay)``)."""
    return grad + weight_decay * param if weight_decay != 0 else grad


# The rules below reuse one scratch array with ``out=`` instead of letting each numpy
# expression allocate its own temporary: faster on large keys (docs/performance.md).
# Products keep torch's evaluation order (value * a * b, a / b * value) so results match it.

def sgd(param, grad, state, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD: the momentum buffer starts as the first gradient, not as zeros."""
    _next_step(state)
    grad = _with_weight_decay(param, grad, weight_decay)
    if momentum != 0:
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = grad.copy()
        else:
            buffer *= momentum
            buffer += (1 - dampening) * grad if dampening != 0 else grad
        grad = grad + momentum * buffer if nesterov else buffer
    param -= np.multiply(grad, lr)


def _adam_update(param, grad, state, lr, betas, eps):
    """The Adam moment update shared by adam (L2 in the gradient) and adamw (decoupled decay)."""
    beta1, beta2 = betas
    step = _next_step(state)
    if "exp_avg" not in state:
        state["exp_avg"] = np.zeros_like(param)
        state["exp_avg_sq"] = np.zeros_like(param)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # torch's lerp_(grad, 1 - beta1): m + (1 - beta1) * (g - m), the same rounding as torch.
    scratch = np.subtract(grad, exp_avg)
    scratch *= 1 - beta1
    exp_avg += scratch
    np.multiply(grad, 1 - beta2, out=scratch)
    scratch *= grad
    exp_avg_sq *= beta2
    exp_avg_sq += scratch
    step_size = _cast(lr / (1 - beta1 ** step), param)
    bias_correction2_sqrt = _cast((1 - beta2 ** step) ** 0.5, param)
    denom = np.sqrt(exp_avg_sq, out=scratch)
    denom /= bias_correction2_sqrt
    denom += eps
    update = np.divide(exp_avg, denom, out=scratch)
    update *= step_size
    param -= update


def adam(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """torch.optim.Adam (amsgrad=False): weight decay is an L2 term in the gradient."""
    _adam_update(param, _with_weight_decay(param, grad, weight_decay), state, lr, betas, eps)


def adamw(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """torch.optim.AdamW: weight decay shrinks the parameter directly, outside the moments."""
    if weight_decay != 0:
        param *= 1 - lr * weight_decay
    _adam_update(param, grad, state, lr, betas, eps)


def rmsprop(param, grad, state, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False):
    """torch.optim.RMSprop; ``centered`` divides by the estimated variance instead of the 2nd moment."""
    _next_step(state)
    grad = _with_weight_decay(param, grad, weight_decay)
    if "square_avg" not in state:
        state["square_avg"] = np.zeros_like(param)
    square_avg = state["square_avg"]
    scratch = np.multiply(grad, 1 - alpha)
    scratch *= grad
    square_avg *= alpha
    square_avg += scratch
    if centered:
        grad_avg = state.setdefault("grad_avg", np.zeros_like(param))
        np.subtract(grad, grad_avg, out=scratch)
        scratch *= 1 - alpha
        grad_avg += scratch
        np.multiply(grad_avg, grad_avg, out=scratch)
        np.subtract(square_avg, scratch, out=scratch)
        avg = np.sqrt(scratch, out=scratch)
    else:
        avg = np.sqrt(square_avg, out=scratch)
    avg += eps
    scaled_grad = np.divide(grad, avg, out=scratch)
    if momentum > 0:
        buffer = state.setdefault("momentum_buffer", np.zeros_like(param))
        buffer *= momentum
        buffer += scaled_grad
        param -= np.multiply(buffer, lr, out=scratch)
    else:
        scaled_grad *= lr
        param -= scaled_grad


def adagrad(param, grad, state, *, lr, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
            eps=1e-10):
    """torch.optim.Adagrad: the step size decays as lr / (1 + (step - 1) * lr_decay)."""
    step = _next_step(state)
    grad = _with_weight_decay(param, grad, weight_decay)
    if "sum" not in state:
        state["sum"] = np.full_like(param, initial_accumulator_value)
    scratch = np.multiply(grad, grad)
    state["sum"] += scratch
    std = np.sqrt(state["sum"], out=scratch)
    std += eps
    update = np.divide(grad, std, out=scratch)
    update *= _cast(lr / (1 + (step - 1) * lr_decay), param)
    param -= update


RULES = {"sgd": sgd, "adam": adam, "adamw": adamw, "rmsprop": rmsprop, "adagrad": adagrad}


def apply_rows(rule, param, rows, row_grads, state, **hyper):
    """Update only ``param[rows]`` (lazy sparse update), as if each row were its own parameter.

    Every row keeps its own step count in ``state["step"]`` (int64, one per row of ``param``), so
    a row first touched at step 100 gets Adam's bias correction of *its* step 1, and its moments
    do not decay while it is untouched (the choice of torch's SparseAdam). Rows never touched
    have step 0; the rule initialises their state exactly as on a first dense step (e.g. SGD's
    momentum buffer = first gradient). ``rows`` must be unique (RowSparseGrad guarantees it).
    A key updated this way keeps a per-row step array: keep updating it through apply_rows
    (pass ``rows = arange(len(param))`` for a dense gradient).
    """
    xp = backend.array_module(param)
    rows = xp.asarray(rows, dtype=np.int64).reshape(-1)
    row_grads = row_grads.reshape((rows.shape[0],) + param.shape[1:])
    steps = state.get("step", 0)
    if getattr(steps, "ndim", 0) == 0:  # an int from dense updates: every row has that many
        steps = state["step"] = xp.full(param.shape[0], int(steps), dtype=np.int64)
    row_steps = steps[rows]
    for fresh in (True, False):
        group = row_steps == 0 if fresh else row_steps > 0
        if bool(group.any()):
            _apply_row_group(rule, param, rows[group], row_grads[group], state, hyper, fresh)


def _apply_row_group(rule, param, rows, row_grads, state, hyper, fresh):
    """Gather the rows' params and state, run the rule on them, scatter everything back.

    ``fresh`` rows were never updated: the rule starts them from an empty state, as a first step.
    """
    broadcast_shape = (rows.shape[0],) + (1,) * (param.ndim - 1)
    row_state = {}
    if not fresh:
        for name, value in state.items():
            # reshape: a server's dense updates may have made the state on the flattened key
            row_state[name] = value[rows].reshape(broadcast_shape) if name == "step" \
                else value.reshape(param.shape)[rows]
    row_params = param[rows]
    rule(row_params, row_grads, row_state, **hyper)
    param[rows] = row_params
    for name, value in row_state.items():
        if name == "step":
            state["step"][rows] = value if fresh else value.reshape(-1)
            continue
        if name not in state:
            state[name] = np.zeros_like(param)  # rows never touched are re-initialised by the rule
        state[name].reshape(param.shape)[rows] = value  # a view: writes into the state array
