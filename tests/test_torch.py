"""Agreement with PyTorch (skipped when torch is not installed): weights loaded from torch.nn.RNN /
LSTM / GRU, outputs, final states and gradients of the same loss, with and without packed sequences."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import CELLS, make_layer, split_state

torch = pytest.importorskip("torch")

B, T, IN, H = 4, 6, 5, 3  # H: the default hidden size
TOL = dict(rtol=1e-10, atol=1e-10)


def torch_module(cell, hidden):
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    if cell.startswith("rnn_"):
        return torch.nn.RNN(IN, hidden, nonlinearity=cell[4:], **kwargs)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](IN, hidden, **kwargs)


def loaded_pair(cell, dtype, hidden=H):
    torch.manual_seed(0)
    m = torch_module(cell, hidden)
    m = m.double() if dtype == np.float64 else m.float()
    layer = make_layer(cell, IN, hidden, 2, bidirectional=True, dtype=dtype, seed=123)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    assert set(sd) == set(layer.params)
    layer.load_state_dict(sd)
    return m, layer


def run_torch(m, cell, x, h0, c0, lengths, wy, wh, wc):
    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True) if c0 is not None else None
    state = (h0t, c0t) if cell == "lstm" else h0t
    if lengths is None:
        y, out = m(xt, state)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths, dtype=torch.int64), batch_first=True, enforce_sorted=False
        )
        py, out = m(packed, state)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(py, batch_first=True, total_length=x.shape[1])
    hn, cn = out if cell == "lstm" else (out, None)
    total = (y * torch.tensor(wy)).sum() + (hn * torch.tensor(wh)).sum()
    if cn is not None:
        total = total + (cn * torch.tensor(wc)).sum()
    m.zero_grad()
    total.backward()
    res = {
        "y": y.detach().numpy(),
        "hn": hn.detach().numpy(),
        "dx": xt.grad.numpy(),
        "dh0": h0t.grad.numpy(),
    }
    if cn is not None:
        res |= {"cn": cn.detach().numpy(), "dc0": c0t.grad.numpy()}
    res |= {f"grad {k}": p.grad.numpy() for k, p in m.named_parameters()}
    return res


def run_rnnkit(layer, x, h0, c0, lengths, wy, wh, wc):
    layer.zero_grad()
    state = (h0, c0) if c0 is not None else h0
    y, out = layer(x, state=state, lengths=lengths)
    hn, cn = split_state(out)
    dx, ds = layer.backward(wy, (wh, wc) if c0 is not None else wh)
    dh0, dc0 = split_state(ds)
    res = {"y": y, "hn": hn, "dx": dx, "dh0": dh0}
    if cn is not None:
        res |= {"cn": cn, "dc0": dc0}
    res |= {f"grad {k}": v.copy() for k, v in layer.grads.items()}
    return res


@pytest.mark.parametrize("hidden", [H, 20, 200])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch(cell, packed, hidden):
    rng = np.random.default_rng(71)
    m, layer = loaded_pair(cell, np.float64, hidden)
    x = rng.standard_normal((B, T, IN))
    h0 = rng.standard_normal((4, B, hidden))
    c0 = rng.standard_normal((4, B, hidden)) if cell == "lstm" else None
    lengths = np.array([3, T, 1, 4]) if packed else None
    wy = rng.standard_normal((B, T, 2 * hidden))
    wh = rng.standard_normal((4, B, hidden))
    wc = rng.standard_normal((4, B, hidden)) if cell == "lstm" else None
    want = run_torch(m, cell, x, h0, c0, lengths, wy, wh, wc)
    got = run_rnnkit(layer, x, h0, c0, lengths, wy, wh, wc)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], err_msg=name, **TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_float32_forward(cell):
    rng = np.random.default_rng(72)
    m, layer = loaded_pair(cell, np.float32)
    x = rng.standard_normal((B, T, IN)).astype(np.float32)
    with torch.no_grad():
        y, out = m(torch.tensor(x))
    hn = out[0] if cell == "lstm" else out
    layer.eval()
    got_y, got_state = layer(x)
    got_hn, _ = split_state(got_state)
    np.testing.assert_allclose(got_y, y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_hn, hn.numpy(), rtol=1e-5, atol=1e-5)


def test_load_torch_tensors_directly():
    torch.manual_seed(1)
    m = torch.nn.GRU(IN, H, num_layers=2, bidirectional=True, batch_first=True).double()
    layer = make_layer("gru", IN, H, 2, bidirectional=True, dtype=np.float64)
    layer.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(layer.params[k], v.numpy())
