"""The module protocol itself: live parameter arrays, dotted names, modes, state, recorded
constructor arguments."""

from __future__ import annotations

import numpy as np
import pytest
import rnnkit
from rnnkit.module import REGISTRY, Module, class_name


class Scaled(Module):
    """A user module: one parameter, one buffer and a child layer."""

    def __init__(self, size: int, *, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = scale
        self.add_param("gain", np.ones(size))
        self.add_buffer("count", np.zeros(1))
        self.inner = rnnkit.Linear(size, size, dtype=np.float64, seed=0)


def test_params_are_live_and_assignment_copies_in_place():
    m = Scaled(3)
    gain = m.params["gain"]
    opt = rnnkit.optim.SGD(m, lr=1.0)
    m.params["gain"] = [5.0, 6.0, 7.0]
    m.params["gain"] *= 0.5
    assert m.params["gain"] is gain
    np.testing.assert_array_equal(gain, [2.5, 3.0, 3.5])
    m.grads["gain"][...] = 1.0
    opt.step()  # the optimizer holds the same array
    np.testing.assert_array_equal(m.params["gain"], [1.5, 2.0, 2.5])
    with pytest.raises(KeyError, match="gain"):
        m.params["gian"] = np.ones(3)
    with pytest.raises(ValueError, match="shape"):
        m.params["gain"] = np.ones(4)


def test_dotted_names_modes_and_zero_grad():
    m = Scaled(2)
    assert list(m.params) == ["gain", "inner.weight", "inner.bias"]
    assert list(m.grads) == list(m.params)
    assert list(m.buffers) == ["count"]
    assert [name for name, _ in m.named_modules()] == ["", "inner"]
    m.eval()
    assert not m.training and not m.inner.training
    m.train()
    assert m.training and m.inner.training
    for g in m.grads.values():
        g[...] = 3.0
    m.zero_grad()
    assert all(not g.any() for g in m.grads.values())
    assert m.num_parameters() == 2 + 4 + 2
    assert "total: 8 trainable parameters" in m.summary()


def test_refused_state_changes_nothing():
    m = Scaled(2)
    before = m.state_dict()
    state = dict(before)
    state["gain"] = np.full(2, 9.0)  # fine
    state["inner.weight"] = np.zeros((3, 3))  # wrong shape: the whole load is refused
    with pytest.raises(ValueError, match="inner.weight"):
        m.load_state_dict(state)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    state["inner.weight"] = np.zeros((2, 2))
    state["count"] = np.array([4.0])
    m.load_state_dict(state)
    assert m.params["gain"][0] == 9.0 and m.buffers["count"][0] == 4.0


def test_constructor_arguments_are_recorded_for_load(tmp_path):
    m = Scaled(3, scale=0.5)
    assert m._init_args == (3,) and m._init_kwargs == {"scale": 0.5}
    assert REGISTRY[class_name(Scaled)] is Scaled
    m.params["gain"] = [1.0, 2.0, 3.0]
    m.save(tmp_path / "scaled.rnnkit")
    loaded = rnnkit.load(tmp_path / "scaled.rnnkit")
    assert isinstance(loaded, Scaled) and loaded.scale == 0.5
    np.testing.assert_array_equal(loaded.params["gain"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(loaded.params["inner.weight"], m.params["inner.weight"])
