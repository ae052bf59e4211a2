"""Tensor behaviour beyond single-op gradients: errors, operators, numpy interop, no_grad,
deep graphs, graph freeing and gradient-ready hooks."""
import numpy as np
import pytest

import disttrain as dt


def leaf(shape, seed=0, dtype=np.float64):
    return dt.tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype), requires_grad=True)


# --- construction and dtypes ----------------------------------------------------------------


def test_python_floats_become_float32_and_ints_int64():
    assert dt.tensor(1.5).dtype == np.float32
    assert dt.tensor([1.0, 2.0]).dtype == np.float32
    assert dt.tensor([1, 2]).dtype == np.int64
    assert dt.tensor(np.zeros(3)).dtype == np.float64  # an ndarray keeps its dtype


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="int64"):
        dt.tensor([1, 2], requires_grad=True)


def test_float32_and_float64_do_not_mix_and_the_error_names_both():
    a = dt.tensor(np.ones(3, np.float32), requires_grad=True)
    b = dt.tensor(np.ones(3, np.float64))
    for operation in (lambda: a + b, lambda: a * b, lambda: b - a, lambda: a @ b):
        with pytest.raises(TypeError) as error:
            operation()
        assert "float32" in str(error.value) and "float64" in str(error.value)


def test_python_numbers_take_the_tensor_dtype():
    x = dt.tensor(np.ones(2, np.float32))
    assert (x * 2.5).dtype == np.float32
    assert (1 - x).dtype == np.float32
    assert (x ** 2).dtype == np.float32


# --- errors ---------------------------------------------------------------------------------


def test_backward_on_non_scalar_without_grad_says_so():
    y = leaf((2, 3)) * 2
    with pytest.raises(RuntimeError, match=r"scalar.*\(2, 3\)"):
        y.backward()


def test_backward_on_non_scalar_with_grad_argument_works():
    x = leaf((2, 3))
    (x * 3).backward(np.ones((2, 3)))
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 3.0))


def test_backward_with_wrong_grad_shape_names_both_shapes():
    y = leaf((2, 3)) * 2
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        y.backward(np.ones((3, 2)))


def test_backward_without_any_grad_input_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (dt.tensor(np.ones(2)) * 2).sum().backward()


def test_matmul_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(32, 784\).*\(256, 10\)"):
        dt.tensor(np.ones((32, 784))) @ dt.tensor(np.ones((256, 10)))


# --- operators and numpy interop ------------------------------------------------------------


def test_python_operators_match_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 4)) + 0.5, rng.random((3, 4)) + 0.5
    m = rng.random((4, 2))
    ta, tb, tm = dt.tensor(a), dt.tensor(b), dt.tensor(m)
    cases = [(ta + tb, a + b), (ta - tb, a - b), (ta * tb, a * b), (ta / tb, a / b),
             (ta ** tb, a ** b), (ta ** 2, a ** 2), (ta @ tm, a @ m), (-ta, -a), (abs(-ta), a),
             (2 + ta, 2 + a), (2 - ta, 2 - a), (2 * ta, 2 * a), (2 / ta, 2 / a), (2 ** ta, 2 ** a),
             (ta[1:, ::2], a[1:, ::2]), (ta.T, a.T), (ta.sum(axis=0), a.sum(axis=0))]
    for got, expected in cases:
        assert isinstance(got, dt.Tensor)
        np.testing.assert_allclose(got.data, expected, rtol=1e-12)


def test_ndarray_on_the_left_defers_to_the_tensor():
    a = np.arange(3.0)
    t = leaf(3)
    for result in (a + t, a - t, a * t, a / (t * t + 1)):
        assert isinstance(result, dt.Tensor) and result.requires_grad


def test_comparisons_return_boolean_tensors_without_grad():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(5), rng.standard_normal(5)
    ta, tb = dt.tensor(a, requires_grad=True), dt.tensor(b)
    for got, expected in [(ta < tb, a < b), (ta <= tb, a <= b), (ta > tb, a > b), (ta >= tb, a >= b),
                          (ta == tb, a == b), (ta != tb, a != b), (ta > 0, a > 0)]:
        assert got.dtype == bool and not got.requires_grad
        np.testing.assert_array_equal(got.data, expected)


def test_boolean_tensor_indexes_a_tensor():
    x = leaf(6)
    picked = x[x > 0]
    np.testing.assert_array_equal(picked.data, x.data[x.data > 0])


def test_np_asarray_gives_the_values():
    data = np.arange(6.0).reshape(2, 3)
    t = dt.tensor(data, requires_grad=True) * 1
    np.testing.assert_array_equal(np.asarray(t), data)
    assert np.asarray(t, dtype=np.float32).dtype == np.float32
    assert dt.tensor(data).numpy() is not None and float(dt.tensor(np.array([2.5])).item()) == 2.5


# --- no_grad --------------------------------------------------------------------------------


def test_no_grad_records_nothing_and_restores_recording():
    x = leaf(3)
    with dt.no_grad():
        y = x * 2 + 1
    assert not y.requires_grad and y.is_leaf
    assert (x * 2).requires_grad


def test_no_grad_as_decorator():
    @dt.no_grad()
    def double(t):
        return t * 2

    assert not double(leaf(2)).requires_grad
    assert dt.is_grad_enabled()


def test_detach_cuts_the_graph():
    x = leaf(3)
    y = (x * 2).detach() * x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)  # d(c * x)/dx = c = 2x, not 4x


# --- the graph ------------------------------------------------------------------------------


def test_5000_step_unrolled_graph_backward_has_no_recursion_error():
    x = dt.tensor(np.array([1.0]), requires_grad=True)
    w = dt.tensor(np.array([0.9995]), requires_grad=True)
    h = x
    for _ in range(5000):
        h = h * w + 0.001
    h.sum().backward()
    # h = x w^n + c (1 + w + ... + w^(n-1)): dh/dx = w^n exactly.
    np.testing.assert_allclose(x.grad, w.data ** 5000, rtol=1e-9)
    n = 5000
    expected_dw = n * w.data ** (n - 1) + 0.001 * sum(k * w.data ** (k - 1) for k in range(1, n))
    np.testing.assert_allclose(w.grad, expected_dw, rtol=1e-9)


def test_graph_is_freed_after_backward_so_a_second_backward_adds_nothing():
    x = leaf(4)
    loss = (x * x).sum()
    loss.backward()
    first = x.grad.copy()
    np.testing.assert_allclose(first, 2 * x.data)
    loss.backward()  # the recorded graph is gone: nothing reaches x again
    np.testing.assert_array_equal(x.grad, first)


def test_retain_graph_keeps_it_and_gradients_accumulate():
    x = leaf(4)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)


def test_gradients_accumulate_across_separate_backwards():
    x = leaf(3)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, np.full(3, 5.0))


def test_a_leaf_used_many_times_gets_the_sum_of_its_paths():
    x = leaf(3)
    y = x * x + x.exp() + x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + np.exp(x.data) + 1)


# --- gradient-ready hooks -------------------------------------------------------------------


def test_hooks_fire_once_per_leaf_per_backward_with_the_final_gradient():
    a, b = leaf((3, 3), seed=1), leaf(3, seed=2)
    calls = []

    def hook(t):
        calls.append((t, t.grad.copy()))

    a.register_post_accumulate_grad_hook(hook)
    b.register_post_accumulate_grad_hook(hook)
    # a is reached by two paths of different depth; its hook must wait for both.
    hidden = (a @ b).tanh()
    loss = (hidden * b).sum() + (a * a).sum() + (a @ (a @ b)).sum()
    loss.backward()
    assert sorted(id(t) for t, _ in calls) == sorted([id(a), id(b)])
    for t, seen in calls:
        np.testing.assert_array_equal(seen, t.grad)


def test_hooks_fire_again_on_the_next_backward_and_can_be_removed():
    x = leaf(3)
    seen = []
    handle = x.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.copy()))
    (x * 2).sum().backward()
    (x * 2).sum().backward()
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], np.full(3, 4.0))
    handle.remove()
    (x * 2).sum().backward()
    assert len(seen) == 2


def test_hook_on_a_non_leaf_is_refused():
    with pytest.raises(RuntimeError, match="leaf"):
        (leaf(2) * 2).register_post_accumulate_grad_hook(lambda t: None)
