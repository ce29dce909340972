"""Fit the float32 tanh of `src/simd.rs`: tanh(x) ~ x P(x^2) / Q(x^2) on [0, 9.5].

P has degree 6 and Q degree 3 in z = x^2, with P[0] = Q[0] = 1 (so that small x come out
exact). The fit minimises the largest relative error: a linearised least-squares problem
(x P - tanh(x) Q = 0, divided by the previous iteration's Q), its weights updated from the
errors (Lawson's iteration) so that the least-squares solution tends to the minimax one.

    python tools/fit_tanh.py   # prints TANH_P and TANH_Q as float32, and the fit's error
"""

import numpy as np

CLAMP = 9.5  # past 9.01, tanh rounds to 1 in float32; at 9.5 the float32 evaluation gives 1 exactly
P_DEG, Q_DEG = 6, 3


def fit() -> tuple[np.ndarray, np.ndarray, float]:
    x = np.sort(np.concatenate([np.linspace(0, CLAMP, 20000)[1:], np.geomspace(1e-4, 0.5, 2000)]))
    u = x * x / CLAMP**2  # z scaled to [0, 1], for a well-conditioned system
    t = np.tanh(x)
    weights = np.ones_like(x)
    q_prev = np.ones_like(x)
    err = np.zeros_like(x)
    p = q = np.ones(1)
    for it in range(80):
        cols = [x * u**k for k in range(1, P_DEG + 1)] + [-t * u**k for k in range(1, Q_DEG + 1)]
        scale = np.sqrt(weights) / (t * q_prev)
        a = np.stack(cols, 1) * scale[:, None]
        sol = np.linalg.lstsq(a, (t - x) * scale, rcond=None)[0]
        p = np.concatenate([[1.0], sol[:P_DEG]])
        q = np.concatenate([[1.0], sol[P_DEG:]])
        pv = np.polynomial.polynomial.polyval(u, p)
        qv = np.polynomial.polynomial.polyval(u, q)
        err = (x * pv / qv - t) / t
        q_prev = qv
        if it >= 5:
            weights = np.maximum(weights * np.abs(err), 1e-15)
            weights /= weights.sum()
    # Back from u to z = x^2.
    p_z = p / CLAMP ** (2 * np.arange(P_DEG + 1))
    q_z = q / CLAMP ** (2 * np.arange(Q_DEG + 1))
    return p_z.astype(np.float32), q_z.astype(np.float32), float(np.abs(err).max())


if __name__ == "__main__":
    p32, q32, worst = fit()
    print("TANH_P =", [np.format_float_scientific(c, unique=True) for c in p32])
    print("TANH_Q =", [np.format_float_scientific(c, unique=True) for c in q32])
    print(f"largest relative error of the fit (float64): {worst:.3e} = {worst / 2**-24:.3f} x 2^-24")
