"""conv2d and pooling: gradient checks over stride/padding/dilation/groups combinations,
forward values against a direct loop, shape errors, and (if torch imports) PyTorch."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.ops import avg_pool2d, conv2d, max_pool2d, relu
from tests.gradcheck import gradcheck

rng = np.random.default_rng(4)


def randn(*shape):
    return rng.standard_normal(shape)


def distinct(*shape):
    """No ties inside any pooling window, and gaps wider than the finite-difference step."""
    values = np.arange(np.prod(shape), dtype=np.float64) * 0.1
    return rng.permutation(values).reshape(shape)


def direct_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """The definition, one output element at a time (slow; reference only)."""
    n, c, h, w = x.shape
    out_c, group_c, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, out_c, out_h, out_w))
    per_group = out_c // groups
    for o in range(out_c):
        first = (o // per_group) * group_c
        for i in range(out_h):
            for j in range(out_w):
                window = xp[:, first:first + group_c, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                            j * sw:j * sw + dw * (kw - 1) + 1:dw]
                out[:, o, i, j] = (window * weight[o]).sum(axis=(1, 2, 3))
    return out + (0 if bias is None else bias[:, None, None])


CONV_CASES = [
    dict(),
    dict(stride=2),
    dict(padding=1),
    dict(padding=(2, 0)),
    dict(dilation=2),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(groups=2),
    dict(groups=4, stride=2, padding=1),
    dict(groups=2, dilation=(2, 1), padding=2, stride=3),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv2d_gradient_and_value(case):
    groups = case.get("groups", 1)
    x, weight, bias = randn(2, 4, 7, 6), randn(8, 4 // groups, 3, 2), randn(8)
    out = gradcheck(lambda *a: conv2d(*a, **case), x, weight, bias)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    expected = direct_conv2d(x, weight, bias, pair(case.get("stride", 1)), pair(case.get("padding", 0)),
                             pair(case.get("dilation", 1)), groups)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-12)


def test_conv2d_without_bias_on_a_strided_input():
    # x[:, :, ::2] and a channel-swapped view are strided: the window view must use real strides.
    gradcheck(lambda x, w: conv2d(x[:, :, ::2].transpose(1, 0, 2, 3), w, padding=1), randn(3, 2, 10, 5), randn(4, 3, 3, 3))


def test_conv2d_gradient_when_only_weights_require_it():
    x = randn(2, 3, 5, 5)
    gradcheck(lambda w, b: conv2d(dt.tensor(x), w, b, stride=2), randn(4, 3, 3, 3), randn(4))


def test_conv2d_chained_with_pooling_keeps_gradients_right():
    # conv2d's output is (C, N)-ordered in memory; pooling and the next conv must handle that.
    def net(x, w1, w2):
        h = max_pool2d(relu(conv2d(x, w1, padding=1)), 2)
        return avg_pool2d(conv2d(h, w2), 2, stride=1)
    x = randn(2, 2, 8, 8)
    x[np.abs(x) < 0.05] = 0.5
    gradcheck(net, x, randn(3, 2, 3, 3), randn(4, 3, 2, 2), atol=1e-5)


def test_conv2d_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as error:
        conv2d(dt.tensor(np.ones((2, 3, 8, 8))), dt.tensor(np.ones((4, 2, 3, 3))))
    assert "(2, 3, 8, 8)" in str(error.value) and "(4, 2, 3, 3)" in str(error.value)
    with pytest.raises(ValueError, match="groups=2"):
        conv2d(dt.tensor(np.ones((2, 4, 8, 8))), dt.tensor(np.ones((3, 2, 3, 3))), groups=2)
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*kernel"):
        conv2d(dt.tensor(np.ones((1, 1, 2, 2))), dt.tensor(np.ones((1, 1, 3, 3))))
    with pytest.raises(ValueError, match="NCHW"):
        conv2d(dt.tensor(np.ones((3, 8, 8))), dt.tensor(np.ones((1, 3, 3, 3))))
    with pytest.raises(ValueError, match="bias"):
        conv2d(dt.tensor(np.ones((1, 3, 8, 8))), dt.tensor(np.ones((2, 3, 3, 3))), dt.tensor(np.ones(3)))


def test_conv2d_dtype_mix_names_both_dtypes():
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        conv2d(dt.tensor(np.ones((1, 1, 4, 4), np.float32)), dt.tensor(np.ones((1, 1, 3, 3))))


POOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1)),
    dict(kernel_size=(3, 1), stride=(2, 1)),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
def test_max_pool2d_gradient_and_value(case):
    x = distinct(2, 3, 7, 6)
    out = gradcheck(lambda t: max_pool2d(t, **case), x)
    windows = _reference_windows(x, case, pad_value=-np.inf)
    np.testing.assert_array_equal(out.data, windows.max(axis=(-2, -1)))


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool2d_gradient_and_value(case, count_include_pad):
    x = randn(2, 3, 7, 6)
    out = gradcheck(lambda t: avg_pool2d(t, count_include_pad=count_include_pad, **case), x)
    sums = _reference_windows(x, case, pad_value=0).sum(axis=(-2, -1))
    counts = _reference_windows(np.ones_like(x), case, pad_value=0).sum(axis=(-2, -1))
    kernel = case["kernel_size"]
    area = kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]
    np.testing.assert_allclose(out.data, sums / (area if count_include_pad else counts), rtol=1e-12)


def test_pooling_gradient_on_strided_input():
    gradcheck(lambda t: max_pool2d(t[:, :, ::2], 2), distinct(2, 2, 8, 4))
    gradcheck(lambda t: avg_pool2d(t.transpose(1, 0, 2, 3), 3, stride=2), randn(2, 3, 7, 7))


def test_max_pool2d_gives_a_tied_window_gradient_to_its_first_maximum():
    x = dt.tensor(np.array([[[[1.0, 3.0], [3.0, 3.0]]]]), requires_grad=True)
    max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(x.grad, [[[[0, 1], [0, 0]]]])


def test_pooling_rejects_padding_over_half_the_kernel():
    with pytest.raises(ValueError, match="half"):
        max_pool2d(dt.tensor(np.ones((1, 1, 4, 4))), 2, padding=2)


def _reference_windows(x, case, pad_value):
    """Windows by explicit slicing per output position (reference only)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (kh, kw) = pair(case["kernel_size"])
    (sh, sw) = pair(case.get("stride", case["kernel_size"]))
    (ph, pw) = pair(case.get("padding", 0))
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    out_h, out_w = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    windows = np.empty(x.shape[:2] + (out_h, out_w, kh, kw))
    for i in range(out_h):
        for j in range(out_w):
            windows[:, :, i, j] = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
    return windows


# --- PyTorch cross-checks (only where torch is installed) -----------------------------------


@pytest.mark.parametrize("case", CONV_CASES[:6] + [dict(groups=2, stride=2, padding=1)], ids=str)
def test_conv2d_matches_torch(case):
    torch = pytest.importorskip("torch")
    groups = case.get("groups", 1)
    x, weight, bias = randn(3, 4, 9, 8), randn(6, 4 // groups, 3, 3), randn(6)
    g = randn(*conv2d(dt.tensor(x), dt.tensor(weight), **case).shape)
    ours = [dt.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    (conv2d(*ours, **case) * g).sum().backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    out = torch.nn.functional.conv2d(*theirs, **case)
    (out * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(conv2d(*[t.detach() for t in ours], **case).data, out.detach().numpy(), atol=1e-12)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
def test_pooling_matches_torch(case):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    x[0, 0, :4, :4] = 1.0  # a tied block: torch picks the first maximum too
    for ours_fn, theirs_fn in ((max_pool2d, torch.nn.functional.max_pool2d),
                               (avg_pool2d, torch.nn.functional.avg_pool2d)):
        ours = dt.tensor(x, requires_grad=True)
        out = ours_fn(ours, **case)
        g = rng.standard_normal(out.shape).astype(np.float32)
        (out * g).sum().backward()
        theirs = torch.tensor(x, requires_grad=True)
        expected = theirs_fn(theirs, **case)
        (expected * torch.tensor(g)).sum().backward()
        np.testing.assert_allclose(out.data, expected.detach().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-5, atol=1e-6)
