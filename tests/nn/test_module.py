"""Module, Parameter, Sequential, ModuleList: registration, naming, state dicts, modes."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2))
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(3, 2, bias=False)])
        self.scale = nn.Parameter(np.ones(1, np.float32))

    def forward(self, x):
        x = self.features(x).reshape(x.shape[0], -1)
        for head in self.heads:
            x = head(x)
        return x * self.scale


def test_named_parameters_are_dotted_paths_in_registration_order():
    names = [name for name, _ in Block().named_parameters()]
    assert names == ["scale", "features.0.weight", "features.0.bias", "features.2.weight",
                     "features.2.bias", "heads.0.weight", "heads.0.bias", "heads.1.weight"]


def test_buffers_are_in_state_dict_but_not_in_named_parameters():
    block = Block()
    parameters = dict(block.named_parameters())
    state = block.state_dict()
    buffers = ["features.2.running_mean", "features.2.running_var", "features.2.num_batches_tracked"]
    for name in buffers:
        assert name in state and name not in parameters
    assert [name for name, _ in block.named_buffers()] == buffers
    assert list(state) == ["scale", "features.0.weight", "features.0.bias", "features.2.weight",
                           "features.2.bias", *buffers, "heads.0.weight", "heads.0.bias", "heads.1.weight"]


def test_parameters_are_leaves_that_require_grad():
    for parameter in Block().parameters():
        assert isinstance(parameter, nn.Parameter)
        assert parameter.requires_grad and parameter.is_leaf and parameter.dtype == np.float32


def test_shared_parameter_is_listed_once():
    linear = nn.Linear(2, 2)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    assert len(list(model.modules())) == 3  # Sequential, Linear, ReLU: the shared Linear once


def test_named_modules_and_children():
    block = Block()
    assert [name for name, _ in block.named_modules()] == [
        "", "features", "features.0", "features.1", "features.2", "heads", "heads.0", "heads.1"]
    assert [type(child).__name__ for child in block.children()] == ["Sequential", "ModuleList"]


def test_state_dict_holds_copies():
    linear = nn.Linear(3, 2)
    state = linear.state_dict()
    state["weight"][...] = 7
    assert not np.any(linear.weight.data == 7)
    assert isinstance(state["weight"], np.ndarray)


def test_state_dict_round_trip_reproduces_outputs():
    dt.random.manual_seed(1)
    source, target = Block(), Block()
    x = dt.randn(2, 1, 4, 4, rng=np.random.default_rng(0))
    source(x)  # one training-mode call moves the running statistics
    source.eval()
    target.eval()
    assert not np.allclose(source(x).data, target(x).data)
    target.load_state_dict(source.state_dict())
    np.testing.assert_array_equal(source(x).data, target(x).data)
    for name, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[name], value, err_msg=name)


def test_load_state_dict_keeps_the_parameter_objects_and_dtype():
    linear = nn.Linear(2, 2)
    weight = linear.weight
    linear.load_state_dict({"weight": np.ones((2, 2), np.float64), "bias": np.zeros(2)})
    assert linear.weight is weight and weight.dtype == np.float32
    np.testing.assert_array_equal(weight.data, np.ones((2, 2)))


def test_load_state_dict_strict_names_missing_and_unexpected_keys():
    block = Block()
    state = block.state_dict()
    del state["heads.0.bias"]
    state["heads.2.weight"] = np.zeros(3)
    with pytest.raises(KeyError) as error:
        block.load_state_dict(state)
    assert "missing keys: heads.0.bias" in str(error.value)
    assert "unexpected keys: heads.2.weight" in str(error.value)


def test_load_state_dict_non_strict_reports_and_loads_the_rest():
    linear = nn.Linear(2, 2)
    missing, unexpected = linear.load_state_dict({"weight": np.full((2, 2), 3.0), "extra": np.ones(1)},
                                                 strict=False)
    assert missing == ["bias"] and unexpected == ["extra"]
    np.testing.assert_array_equal(linear.weight.data, np.full((2, 2), 3.0))


def test_load_state_dict_shape_mismatch_names_key_and_shapes_and_changes_nothing():
    linear = nn.Linear(3, 2)
    before = linear.state_dict()
    state = {"weight": np.zeros((3, 2)), "bias": np.ones(2)}
    with pytest.raises(ValueError, match=r"weight: checkpoint has shape \(3, 2\), the model has \(2, 3\)"):
        linear.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(linear.bias.data, before["bias"])  # nothing half-loaded


def test_train_and_eval_reach_every_submodule_and_change_dropout_and_batchnorm():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    assert model.training and all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    x = dt.randn(8, 4, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(model(x).data, model(x).data)  # deterministic in eval
    running_mean = model[2].running_mean.numpy().copy()
    model(x)
    np.testing.assert_array_equal(model[2].running_mean.data, running_mean)  # eval leaves stats alone
    model.train()
    assert all(m.training for m in model.modules())
    dt.random.manual_seed(0)
    first = model(x).data
    assert not np.array_equal(first, model(x).data)  # a fresh dropout mask per call
    assert not np.array_equal(model[2].running_mean.data, running_mean)


def test_zero_grad_clears_gradients():
    linear = nn.Linear(3, 2)
    linear(dt.randn(4, 3)).sum().backward()
    assert linear.weight.grad is not None
    linear.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(linear.weight.grad, 0)
    linear.zero_grad()
    assert linear.weight.grad is None and linear.bias.grad is None


def test_assigning_none_and_wrong_types():
    linear = nn.Linear(3, 2)
    linear.bias = None
    assert [name for name, _ in linear.named_parameters()] == ["weight"]
    assert linear(dt.randn(1, 3)).shape == (1, 2)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        linear.weight = dt.tensor(np.zeros((2, 3), np.float32))
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(TypeError, match="sub-module '0'"):
        model.__setattr__("0", 3)


def test_reassigning_a_name_moves_it_between_registries():
    module = nn.Module()
    module.thing = nn.Parameter(np.zeros(2, np.float32))
    module.thing = nn.Linear(1, 1)
    assert [name for name, _ in module.named_parameters()] == ["thing.weight", "thing.bias"]
    del module.thing
    assert list(module.named_parameters()) == []


def test_parameter_before_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.weight = nn.Parameter(np.zeros(1, np.float32))
            super().__init__()

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Broken()


def test_missing_attribute_error_names_the_module():
    with pytest.raises(AttributeError, match="'Linear' object has no attribute 'weights'"):
        nn.Linear(1, 1).weights


def test_sequential_indexing_slicing_and_iteration():
    layers = [nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)]
    model = nn.Sequential(*layers)
    assert len(model) == 3 and model[0] is layers[0] and model[-1] is layers[2]
    assert list(model) == layers
    head = model[:2]
    assert isinstance(head, nn.Sequential) and list(head) == layers[:2]
    with pytest.raises(IndexError, match="index 3 is out of range for 3 modules"):
        model[3]
    x = dt.randn(5, 2)
    np.testing.assert_allclose(model(x).data, layers[2](layers[1](layers[0](x))).data)


def test_sequential_from_ordered_dict_uses_its_names():
    from collections import OrderedDict
    model = nn.Sequential(OrderedDict([("hidden", nn.Linear(2, 2)), ("act", nn.Tanh())]))
    assert [name for name, _ in model.named_parameters()] == ["hidden.weight", "hidden.bias"]


def test_module_list_registers_appended_and_inserted_modules():
    modules = nn.ModuleList([nn.Linear(1, 1)])
    modules.append(nn.Linear(1, 2))
    modules.insert(0, nn.Linear(2, 1, bias=False))
    assert [name for name, _ in modules.named_parameters()] == [
        "0.weight", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert modules[0].out_features == 1 and len(modules) == 3


def test_astype_converts_parameters_and_float_buffers_only():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double()
    for name, value in model.state_dict().items():
        expected = np.int64 if name.endswith("num_batches_tracked") else np.float64
        assert value.dtype == expected, name
    assert model(dt.tensor(np.ones((3, 2)))).dtype == np.float64
    assert model.float()[0].weight.dtype == np.float32


def test_call_runs_forward_and_repr_shows_the_tree():
    block = Block()
    text = repr(block)
    assert text.startswith("Block(\n  (features): Sequential(\n    (0): Conv2d(1, 2, kernel_size=(3, 3)")
    assert "(heads): ModuleList(" in text and "(1): Linear(in_features=3, out_features=2, bias=False)" in text
    assert block(dt.randn(2, 1, 4, 4)).shape == (2, 2)
    with pytest.raises(NotImplementedError, match="Module does not define forward"):
        nn.Module()(1)


def test_deepcopy_and_pickle_give_independent_modules_with_equal_weights():
    import copy
    import pickle
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone[0].weight is not model[0].weight
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[name], value, err_msg=name)
        clone[0].weight.data[...] = 0
        assert np.any(model[0].weight.data != 0)
