"""An independent, plain NumPy (float64) reference of rnnkit's recurrent layers.

Written straight from PyTorch's equations, one sequence and one time step at a time, for clarity
rather than speed. It takes a layer's ``params`` dict (PyTorch's names and shapes) and infers the
number of layers, the directions and the hidden size from it. Not a test module (no ``test_``
prefix); the tests import it.
"""

from __future__ import annotations

import numpy as np

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def cell_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step of one sequence: x (I,), h and c (H,). Returns (h', c') (c' None unless LSTM)."""
    if cell in ("rnn_tanh", "rnn_relu"):
        pre = w_ih @ x + b_ih + w_hh @ h + b_hh
        return (np.tanh(pre) if cell == "rnn_tanh" else np.maximum(pre, 0.0)), None
    if cell == "lstm":
        gates = w_ih @ x + b_ih + w_hh @ h + b_hh
        gi, gf, gg, go = gates.reshape(4, -1)  # PyTorch's gate order i, f, g, o
        i, f, g, o = sigmoid(gi), sigmoid(gf), np.tanh(gg), sigmoid(go)
        c_new = f * c + i * g
        return o * np.tanh(c_new), c_new
    if cell == "gru":
        gx = w_ih @ x + b_ih
        gh = w_hh @ h + b_hh
        xr, xz, xn = gx.reshape(3, -1)  # PyTorch's gate order r, z, n
        hr, hz, hn = gh.reshape(3, -1)
        r = sigmoid(xr + hr)
        z = sigmoid(xz + hz)
        n = np.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h, None
    raise ValueError(f"unknown cell {cell!r}")


def structure(params):
    """(num_layers, num_directions, hidden_size) of a params dict."""
    num_layers = 0
    while f"weight_ih_l{num_layers}" in params:
        num_layers += 1
    nd = 2 if "weight_ih_l0_reverse" in params else 1
    hidden = np.asarray(params["weight_hh_l0"]).shape[1]
    return num_layers, nd, hidden


def direction_params(params, layer, direction):
    sfx = "_reverse" if direction == 1 else ""
    w_ih = np.asarray(params[f"weight_ih_l{layer}{sfx}"], dtype=np.float64)
    w_hh = np.asarray(params[f"weight_hh_l{layer}{sfx}"], dtype=np.float64)
    zeros = np.zeros(w_hh.shape[0])
    b_ih = np.asarray(params.get(f"bias_ih_l{layer}{sfx}", zeros), dtype=np.float64)
    b_hh = np.asarray(params.get(f"bias_hh_l{layer}{sfx}", zeros), dtype=np.float64)
    return w_ih, w_hh, b_ih, b_hh


def reference_forward(cell, params, x, h0=None, c0=None, lengths=None, batch_first=True, masks=None):
    """Forward of a (stacked, possibly bidirectional) layer, in float64.

    Args:
        cell: "rnn_tanh", "rnn_relu", "lstm" or "gru".
        params: PyTorch-named parameters (weight_ih_l0, ..., *_reverse).
        x: (B, T, I) if batch_first else (T, B, I).
        h0, c0: (num_layers * num_directions, B, H) or None for zeros (c0 only for LSTM).
        lengths: B lengths in 1..T, or None (all T).
        masks: optional list of num_layers - 1 arrays shaped like each non-last layer's output
            (in x's layout), multiplied into that output before the next layer (dropout).

    Returns:
        (y, hn, cn): y shaped like x with num_directions * H features, zero past each sequence's
        length; hn and cn (num_layers * num_directions, B, H); cn is None unless LSTM.
    """
    num_layers, nd, hidden = structure(params)
    x = np.asarray(x, dtype=np.float64)
    if not batch_first:
        x = x.transpose(1, 0, 2)
    batch, seq_len = x.shape[0], x.shape[1]
    lens = [seq_len] * batch if lengths is None else [int(v) for v in lengths]
    has_c = cell == "lstm"
    h0 = np.zeros((num_layers * nd, batch, hidden)) if h0 is None else np.asarray(h0, np.float64)
    if has_c:
        c0 = np.zeros((num_layers * nd, batch, hidden)) if c0 is None else np.asarray(c0, np.float64)
    hn = np.zeros((num_layers * nd, batch, hidden))
    cn = np.zeros((num_layers * nd, batch, hidden)) if has_c else None

    inp = x
    for layer in range(num_layers):
        out = np.zeros((batch, seq_len, nd * hidden))
        for direction in range(nd):
            w = direction_params(params, layer, direction)
            k = layer * nd + direction
            for b in range(batch):
                h = h0[k, b].copy()
                c = c0[k, b].copy() if has_c else None
                steps = range(lens[b]) if direction == 0 else reversed(range(lens[b]))
                for t in steps:
                    h, c = cell_step(cell, inp[b, t], h, c, *w)
                    out[b, t, direction * hidden : (direction + 1) * hidden] = h
                hn[k, b] = h
                if has_c:
                    cn[k, b] = c
        if masks is not None and layer < num_layers - 1:
            m = np.asarray(masks[layer], dtype=np.float64)
            out = out * (m if batch_first else m.transpose(1, 0, 2))
        inp = out
    y = inp if batch_first else inp.transpose(1, 0, 2).copy()
    return y, hn, cn


def loss_weights(rng, y_shape, state_shape, lstm):
    """Random fixed weights (Wy, Wh, Wc) for the scalar loss of :func:`loss`."""
    wy = rng.standard_normal(y_shape)
    wh = rng.standard_normal(state_shape)
    wc = rng.standard_normal(state_shape) if lstm else None
    return wy, wh, wc


def loss(y, hn, cn, wy, wh, wc):
    """L = sum(y * Wy) + sum(hn * Wh) (+ sum(cn * Wc))."""
    total = float(np.sum(y * wy) + np.sum(hn * wh))
    if cn is not None:
        total += float(np.sum(cn * wc))
    return total


def numerical_gradient(f, a, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every entry of ``a`` (in place)."""
    grad = np.zeros(a.shape)
    flat = a.reshape(-1)
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2.0 * eps)
    return grad


def rel_error(a, b):
    """Norm-based relative error ||a - b|| / max(||a||, ||b||, tiny)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(b), 1e-12)
    return float(np.linalg.norm(a - b) / denom)
