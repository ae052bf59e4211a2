"""dt.save / dt.load: nested round trip, dtypes, foreign safetensors readers, corrupt files."""
import json
import struct

import numpy as np
import pytest

import disttrain as dt
from disttrain import checkpoint, optim

DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]


def _state():
    rng = np.random.default_rng(0)
    return {
        "model": {"features.0.weight": rng.standard_normal((4, 3)).astype(np.float32),
                  "features.0.bias": np.zeros(4, np.float32)},
        "optimizer": {"state": {0: {"step": 7, "exp_avg": np.ones((4, 3), np.float32)}},
                      "param_groups": [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0, 1]}]},
        "step": 123,
        "extra": {"name": "mnist", "seed": None, "done": False, "history": [1.5, 2.5],
                  "arrays": [np.arange(3), {"nested": np.eye(2)}], "empty": {}},
    }


def _assert_same(loaded, expected):
    if isinstance(expected, dict):
        assert list(loaded) == list(expected)  # key types (int vs str) and order survive
        for key in expected:
            _assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert isinstance(loaded, list) and len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            _assert_same(a, b)
    elif isinstance(expected, np.ndarray):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        np.testing.assert_array_equal(loaded, expected)
    else:
        assert loaded == expected and type(loaded) is type(expected)


def test_round_trip_rebuilds_nested_state_with_metadata(tmp_path):
    state = _state()
    checkpoint.save(state, tmp_path / "ckpt.safetensors")
    _assert_same(checkpoint.load(tmp_path / "ckpt.safetensors"), state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_every_supported_dtype_and_shape_round_trips(tmp_path, dtype, shape):
    array = (np.arange(int(np.prod(shape))) % 7).reshape(shape).astype(dtype)
    checkpoint.save({"x": array}, tmp_path / "a.safetensors")
    _assert_same(checkpoint.load(tmp_path / "a.safetensors"), {"x": array})


def test_big_endian_and_non_contiguous_arrays_are_stored_as_little_endian_values(tmp_path):
    state = {"big": np.arange(6, dtype=">f8"), "strided": np.arange(12.0).reshape(3, 4).T}
    checkpoint.save(state, tmp_path / "b.safetensors")
    loaded = checkpoint.load(tmp_path / "b.safetensors")
    np.testing.assert_array_equal(loaded["big"], np.arange(6.0))
    np.testing.assert_array_equal(loaded["strided"], state["strided"])


def test_loaded_arrays_are_writable(tmp_path):
    checkpoint.save({"w": np.zeros(3)}, tmp_path / "w.safetensors")
    loaded = checkpoint.load(tmp_path / "w.safetensors")["w"]
    loaded += 1  # optimizers update arrays in place
    np.testing.assert_array_equal(loaded, 1.0)


def test_tensors_are_saved_as_their_arrays(tmp_path):
    weight = dt.tensor(np.arange(4, dtype=np.float32), requires_grad=True)
    checkpoint.save({"weight": weight}, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(checkpoint.load(tmp_path / "t.safetensors")["weight"], weight.data)


def test_file_is_readable_by_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = _state()
    checkpoint.save(state, tmp_path / "c.safetensors")
    foreign = safetensors_numpy.load_file(str(tmp_path / "c.safetensors"))
    np.testing.assert_array_equal(foreign["model.features.0.weight"], state["model"]["features.0.weight"])
    np.testing.assert_array_equal(foreign["optimizer.state.0.exp_avg"], 1.0)
    assert sorted(foreign) == ["extra.arrays.0", "extra.arrays.1.nested", "model.features.0.bias",
                               "model.features.0.weight", "optimizer.state.0.exp_avg"]


def test_file_written_by_the_safetensors_package_loads_as_flat_dict(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {"a.weight": np.ones((2, 2), np.float16), "b": np.arange(5, dtype=np.int64)}
    safetensors_numpy.save_file(arrays, str(tmp_path / "d.safetensors"))
    _assert_same(checkpoint.load(tmp_path / "d.safetensors"), arrays)


def test_non_array_values_are_json_in_header_metadata(tmp_path):
    checkpoint.save({"step": 5, "extra": {"tag": "run-1"}, "w": np.zeros(1)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    assert size % 8 == 0
    metadata = json.loads(data[8:8 + size])["__metadata__"]
    assert json.loads(metadata["step"]) == 5 and json.loads(metadata["extra.tag"]) == "run-1"
    assert all(isinstance(value, str) for value in metadata.values())


def test_optimizer_state_survives_checkpoint_and_resumes_identically(tmp_path):
    grads = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    straight = dt.tensor(np.ones(3, np.float32), requires_grad=True)
    straight_opt = optim.Adam([straight], lr=0.1)
    for grad in grads:
        straight.grad = grad
        straight_opt.step()
    first = dt.tensor(np.ones(3, np.float32), requires_grad=True)
    first_opt = optim.Adam([first], lr=0.1)
    for grad in grads[:2]:
        first.grad = grad
        first_opt.step()
    checkpoint.save({"model": {"w": first}, "optimizer": first_opt.state_dict()}, tmp_path / "r.safetensors")
    loaded = checkpoint.load(tmp_path / "r.safetensors")
    resumed = dt.tensor(loaded["model"]["w"], requires_grad=True)
    resumed_opt = optim.Adam([resumed], lr=0.5)
    resumed_opt.load_state_dict(loaded["optimizer"])
    for grad in grads[2:]:
        resumed.grad = grad
        resumed_opt.step()
    np.testing.assert_array_equal(resumed.data, straight.data)


def test_save_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save({"v": np.zeros(2)}, path)
    with pytest.raises(TypeError, match="complex128"):
        checkpoint.save({"v": np.zeros(2, np.complex128)}, path)  # fails before writing
    checkpoint.save({"v": np.ones(2)}, path)
    np.testing.assert_array_equal(checkpoint.load(path)["v"], 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_keys_that_collide_once_flattened_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="'a.b'"):
        checkpoint.save({"a.b": np.zeros(1), "a": {"b": np.zeros(1)}}, tmp_path / "x.safetensors")


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[:5], "too short"),
    (lambda data: data[:-3], "truncated"),
    (lambda data: data[:8] + b"\xff" * 4 + data[12:], "corrupt header"),
    (lambda data: struct.pack("<Q", 10**12) + data[8:], "declares a 1000000000000-byte header"),
    (lambda data: data + b"extra", "data section has"),
], ids=["shorter-than-length", "truncated-tensor", "bad-utf8-header", "huge-header-length", "trailing-bytes"])
def test_corrupt_or_truncated_file_raises_checkpoint_error(tmp_path, damage, message):
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(_state(), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(path)
