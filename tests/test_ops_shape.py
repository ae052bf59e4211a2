"""Gradient checks for ops that move elements: views, indexing (slices, repeated integer
indices, boolean masks), joining, splitting and padding."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import ops
from tests.gradcheck import gradcheck

rng = np.random.default_rng(3)


def randn(*shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(6, 4), (-1,), (2, -1, 3), (24,)])
def test_reshape_gradient(shape):
    gradcheck(lambda x: ops.reshape(x, shape), randn(2, 3, 4))


def test_reshape_gradient_of_a_strided_view_and_method_forms():
    gradcheck(lambda x: x.T.reshape(4, 3), randn(3, 4))
    gradcheck(lambda x: x[:, ::2].reshape(-1), randn(3, 4))
    gradcheck(lambda x: x.flatten(), randn(2, 2))


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (-1, 0, -2)])
def test_transpose_gradient(axes):
    out = gradcheck(lambda x: ops.transpose(x, axes), randn(2, 3, 4))
    assert out.shape == np.zeros((2, 3, 4)).transpose(axes).shape


def test_transpose_method_forms_and_bad_axes():
    gradcheck(lambda x: x.transpose(2, 0, 1) * x.transpose((2, 0, 1)), randn(2, 3, 4))
    with pytest.raises(ValueError, match="permutation"):
        ops.transpose(dt.tensor(np.ones((2, 3))), (0, 0))


@pytest.mark.parametrize("shape, target", [((3,), (2, 3)), ((3, 1), (3, 4)), ((1, 4), (2, 3, 4)), ((), (2, 2))])
def test_broadcast_to_gradient(shape, target):
    gradcheck(lambda x: ops.broadcast_to(x, target), randn(*shape))


@pytest.mark.parametrize("axis", [None, 1, -1, (1, 3)])
def test_squeeze_gradient(axis):
    out = gradcheck(lambda x: ops.squeeze(x, axis), randn(2, 1, 3, 1))
    assert out.shape == np.zeros((2, 1, 3, 1)).squeeze(axis).shape


@pytest.mark.parametrize("axis", [0, 1, -1, -3])
def test_expand_dims_gradient(axis):
    out = gradcheck(lambda x: ops.expand_dims(x, axis), randn(2, 3))
    assert out.shape == np.expand_dims(np.zeros((2, 3)), axis).shape


INDICES = [
    (slice(1, None), ),
    (slice(None, None, -2), slice(1, 3)),
    (Ellipsis, 1),
    (1, slice(None), None),
    np.array([0, 2, 2, 0, 3, 3, 3]),                    # repeated rows must add up
    (np.array([0, 1, 1]), np.array([2, 2, 2])),          # repeated elements
    (slice(None), np.array([[1, 1], [0, 1]])),
    -1,
]


@pytest.mark.parametrize("index", INDICES, ids=range(len(INDICES)))
def test_getitem_gradient(index):
    x = randn(4, 3)
    out = gradcheck(lambda t: t[index], x)
    np.testing.assert_array_equal(out.data, x[index])


def test_getitem_repeated_indices_accumulate_exactly():
    x = dt.tensor(np.zeros(4), requires_grad=True)
    x[np.array([1, 1, 1, 3])].sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 3, 0, 1])


def test_getitem_boolean_mask_gradient():
    mask = rng.random((4, 3)) < 0.5
    gradcheck(lambda t: t[mask], randn(4, 3))
    gradcheck(lambda t: t[dt.tensor(mask[:, 0])], randn(4, 3))
    gradcheck(lambda t: t.T[mask.T], randn(4, 3))


def test_getitem_with_integer_tensor_index():
    gradcheck(lambda t: t[dt.tensor(np.array([2, 0, 2]))], randn(3, 2))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_gradient(axis):
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for shape, size in zip(shapes, (1, 2, 3)):
        shape[axis] = size
    gradcheck(lambda a, b, c: ops.concat([a, b, c], axis=axis), *(randn(*s) for s in shapes))


def test_concat_gradient_of_strided_parts_and_dtype_error():
    gradcheck(lambda a, b: dt.concat([a.T, b[:, ::2]], axis=0), randn(3, 2), randn(4, 6))
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        dt.concat([dt.tensor(np.ones(2, np.float32)), dt.tensor(np.ones(2))])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stack_gradient(axis):
    out = gradcheck(lambda a, b: ops.stack([a, b], axis=axis), randn(2, 3), randn(2, 3))
    assert out.shape == np.stack([np.zeros((2, 3))] * 2, axis=axis).shape


@pytest.mark.parametrize("sections, axis", [(3, 0), ([1, 4], 1), (2, -1), ([2], 0)])
def test_split_gradient(sections, axis):
    def op(x):
        parts = ops.split(x, sections, axis=axis)
        # Weight each part differently so a mixed-up gradient cannot pass.
        return ops.concat([part * (k + 1) for k, part in enumerate(parts)], axis=axis)
    x = randn(6, 6)
    parts = ops.split(dt.tensor(x), sections, axis=axis)
    for got, expected in zip(parts, np.split(x, sections, axis=axis)):
        np.testing.assert_array_equal(got.data, expected)
    gradcheck(op, x)


def test_split_into_unequal_sections_is_an_error():
    with pytest.raises(ValueError, match="does not divide"):
        ops.split(dt.tensor(np.ones(5)), 2)


@pytest.mark.parametrize("pad_width", [1, ((1, 2), (0, 3)), ((0, 0), (2, 1))])
def test_pad_gradient(pad_width):
    x = randn(3, 2)
    out = gradcheck(lambda t: ops.pad(t, pad_width, value=0.5), x)
    np.testing.assert_array_equal(out.data, np.pad(x, pad_width, constant_values=0.5))


def test_pad_gradient_of_a_strided_view():
    gradcheck(lambda x: ops.pad(x.T, ((1, 0), (2, 2))), randn(3, 4))
