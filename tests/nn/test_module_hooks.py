"""Module.register_forward_pre_hook: called with the module and the positional arguments
before every forward, in registration order, until its handle is removed."""
import numpy as np

import disttrain as dt
from disttrain import nn


def test_pre_hooks_run_before_forward_in_order_until_removed():
    layer = nn.Linear(3, 2)
    seen = []
    first = layer.register_forward_pre_hook(lambda module, args: seen.append(("first", module, args)))
    layer.register_forward_pre_hook(lambda module, args: seen.append(("second", module, args)))
    x = dt.tensor(np.ones((1, 3), np.float32))
    layer(x)
    assert [(name, module) for name, module, _ in seen] == [("first", layer), ("second", layer)]
    assert all(args == (x,) for _, _, args in seen)
    first.remove()
    seen.clear()
    layer(x)
    assert [name for name, _, _ in seen] == ["second"]


def test_a_pre_hook_sees_the_state_forward_will_use():
    layer = nn.Linear(2, 1, bias=False)
    layer.register_forward_pre_hook(lambda module, args: module.weight.data.fill(2.0))
    out = layer(dt.tensor(np.ones((1, 2), np.float32)))
    np.testing.assert_array_equal(out.data, [[4.0]])
