"""rnnkit.optim, rnnkit.schedules and rnnkit.clip against scalar transcriptions of PyTorch's
pseudo-code, hand-computed values and (when installed) torch itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rnnkit.clip import clip_grad_norm, clip_grad_value
from rnnkit.module import Module
from rnnkit.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from rnnkit.schedules import CosineWarmup, ExponentialLR, ReduceLROnPlateau, StepLR

STEPS = 5
SIZE = 17  # 3*4 + 5 scalars in Toy


class Inner(Module):
    def __init__(self, rng: np.random.Generator, dtype=np.float64):
        super().__init__()
        self.add_param("bias", rng.standard_normal(5).astype(dtype))


class Toy(Module):
    """A (3, 4) weight and a nested (5,) bias: 17 parameters."""

    def __init__(self, rng: np.random.Generator, dtype=np.float64):
        super().__init__()
        self.add_param("weight", rng.standard_normal((3, 4)).astype(dtype))
        self.inner = Inner(rng, dtype)


def flat(arrays):
    return np.concatenate([a.ravel() for a in arrays])


def set_grads(grads, values):
    """Write the flat vector ``values`` into the gradient arrays, in order."""
    start = 0
    for g in grads:
        g[...] = values[start : start + g.size].reshape(g.shape)
        start += g.size


def gradient_plan():
    """g_t = a_t * param + b_t elementwise for up to 8 steps, with magnitudes that rise and fall
    (so AMSGrad matters)."""
    rng = np.random.default_rng(7)
    a = rng.uniform(0.5, 2.0, (8, SIZE))
    b = rng.standard_normal((8, SIZE)) * np.array([3.0, 1.0, 0.2, 2.0, 0.1, 1.5, 0.5, 1.0])[:, None]
    return a, b


def run_rnnkit(cls, hp, steps=STEPS, dtype=np.float64, start=0, model=None, opt=None):
    a, b = gradient_plan()
    model = model or Toy(np.random.default_rng(0), dtype)
    opt = opt or cls(model, **hp)
    for t in range(start, steps):
        set_grads(model.grads.values(), a[t] * flat(model.params.values()) + b[t])
        opt.step()
    return model, opt


# ------------------------------------------------------------------ scalar references (torch's pseudo-code)


def ref_sgd(theta, grad_fns, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    buf = 0.0
    for t, gfn in enumerate(grad_fns, 1):
        g = gfn(theta)
        if weight_decay:
            g = g + weight_decay * theta
        if momentum:
            buf = g if t == 1 else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        theta = theta - lr * g
    return theta


def ref_adam(
    theta, grad_fns, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False
):
    b1, b2 = betas
    m = v = v_max = 0.0
    for t, gfn in enumerate(grad_fns, 1):
        g = gfn(theta)
        if decoupled:
            theta = theta - lr * weight_decay * theta
        elif weight_decay:
            g = g + weight_decay * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        if amsgrad:
            v_max = max(v_max, v)
            v_hat = v_max / (1 - b2**t)
        else:
            v_hat = v / (1 - b2**t)
        theta = theta - lr * m_hat / (math.sqrt(v_hat) + eps)
    return theta


def ref_adamw(theta, grad_fns, weight_decay=1e-2, **hp):
    return ref_adam(theta, grad_fns, weight_decay=weight_decay, decoupled=True, **hp)


def ref_rmsprop(
    theta, grad_fns, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False
):
    v = g_avg = buf = 0.0
    for gfn in grad_fns:
        g = gfn(theta)
        if weight_decay:
            g = g + weight_decay * theta
        v = alpha * v + (1 - alpha) * g * g
        v_tilde = v
        if centered:
            g_avg = alpha * g_avg + (1 - alpha) * g
            v_tilde = v - g_avg * g_avg
        if momentum > 0:
            buf = momentum * buf + g / (math.sqrt(v_tilde) + eps)
            theta = theta - lr * buf
        else:
            theta = theta - lr * g / (math.sqrt(v_tilde) + eps)
    return theta


def ref_adagrad(
    theta, grad_fns, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10
):
    s = initial_accumulator_value
    for t, gfn in enumerate(grad_fns, 1):
        g = gfn(theta)
        clr = lr / (1 + (t - 1) * lr_decay)
        if weight_decay:
            g = g + weight_decay * theta
        s = s + g * g
        theta = theta - clr * g / (math.sqrt(s) + eps)
    return theta


REFERENCES = {SGD: ref_sgd, Adam: ref_adam, AdamW: ref_adamw, RMSprop: ref_rmsprop, Adagrad: ref_adagrad}

CONFIGS = [
    (SGD, {"lr": 0.1}),
    (SGD, {"lr": 0.05, "weight_decay": 0.2}),
    (SGD, {"lr": 0.1, "momentum": 0.9}),
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (SGD, {"lr": 0.1, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    (Adam, {"lr": 0.1}),
    (Adam, {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-3}),
    (Adam, {"lr": 0.1, "weight_decay": 0.1}),
    (Adam, {"lr": 0.1, "amsgrad": True}),
    (Adam, {"lr": 0.1, "betas": (0.5, 0.6), "amsgrad": True, "weight_decay": 0.1}),
    (AdamW, {"lr": 0.1}),
    (AdamW, {"lr": 0.1, "weight_decay": 0.5}),
    (AdamW, {"lr": 0.1, "betas": (0.5, 0.6), "weight_decay": 0.1, "amsgrad": True}),
    (RMSprop, {"lr": 0.01}),
    (RMSprop, {"lr": 0.01, "alpha": 0.9, "eps": 1e-3}),
    (RMSprop, {"lr": 0.01, "centered": True}),
    (RMSprop, {"lr": 0.01, "momentum": 0.9}),
    (RMSprop, {"lr": 0.01, "alpha": 0.8, "centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    (Adagrad, {"lr": 0.1}),
    (Adagrad, {"lr": 0.1, "lr_decay": 0.5}),
    (Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.3}),
    (Adagrad, {"lr": 0.1, "lr_decay": 0.1, "weight_decay": 0.1, "eps": 1e-3}),
]
IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in hp.items())}" for cls, hp in CONFIGS]


@pytest.mark.parametrize(("cls", "hp"), CONFIGS, ids=IDS)
def test_matches_scalar_reference(cls, hp):
    model, _ = run_rnnkit(cls, hp)
    a, b = gradient_plan()
    theta0 = flat(Toy(np.random.default_rng(0)).params.values())
    expected = [
        REFERENCES[cls](
            float(theta0[j]),
            [lambda th, t=t, j=j: a[t, j] * th + b[t, j] for t in range(STEPS)],
            **hp,
        )
        for j in range(SIZE)
    ]
    np.testing.assert_allclose(flat(model.params.values()), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("cls", "hp"), CONFIGS, ids=IDS)
def test_matches_torch(cls, hp):
    torch = pytest.importorskip("torch")
    model, opt = run_rnnkit(cls, hp)
    a, b = gradient_plan()
    start = Toy(np.random.default_rng(0))
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in start.params.values()]
    topt = getattr(torch.optim, cls.__name__)(tparams, **hp)
    for t in range(STEPS):
        values = a[t] * flat(p.detach().numpy() for p in tparams) + b[t]
        grads = [np.empty(p.shape) for p in tparams]
        set_grads(grads, values)
        for p, g in zip(tparams, grads, strict=True):
            p.grad = torch.tensor(g)
        topt.step()
    for ours, theirs in zip(model.params.values(), tparams, strict=True):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
    ours_state = opt.state_dict()["state"]
    for name, theirs in zip(model.params, tparams, strict=True):
        for key, arr in ours_state[name].items():
            np.testing.assert_allclose(arr, topt.state[theirs][key].numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("cls", "hp"), CONFIGS, ids=IDS)
def test_state_dict_resume_is_identical(cls, hp):
    straight, _ = run_rnnkit(cls, hp, steps=6)
    first, opt = run_rnnkit(cls, hp, steps=3)
    opt.lr = hp["lr"] * 0.5  # a schedule changed it: resuming restores it
    saved, weights = opt.state_dict(), first.state_dict()
    run_rnnkit(cls, hp, steps=5, start=3, model=first, opt=opt)  # what was saved is a copy
    resumed = Toy(np.random.default_rng(99))
    resumed.load_state_dict(weights)
    opt2 = cls(resumed, **hp)
    opt2.load_state_dict(saved)
    assert opt2.lr == hp["lr"] * 0.5 and opt2.step_count == 3
    opt2.lr = hp["lr"]
    run_rnnkit(cls, hp, steps=6, start=3, model=resumed, opt=opt2)
    for x, y in zip(straight.params.values(), resumed.params.values(), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("cls", "hp"), CONFIGS[::3], ids=IDS[::3])
def test_float32_in_place(cls, hp):
    model = Toy(np.random.default_rng(0), np.float32)
    arrays = list(model.params.values())
    model32, opt = run_rnnkit(cls, hp, dtype=np.float32, model=model)
    model64, _ = run_rnnkit(cls, hp)
    for before, (name, after) in zip(arrays, model32.params.items(), strict=True):
        assert after is before and after.dtype == np.float32
        np.testing.assert_allclose(after, model64.params[name], rtol=1e-4, atol=1e-5)
    assert all(s.dtype == np.float32 for st in opt.state_dict()["state"].values() for s in st.values())


def test_pairs_and_module_agree():
    model, _ = run_rnnkit(Adam, {"lr": 0.1})
    twin = Toy(np.random.default_rng(0))
    pairs = list(zip(twin.params.values(), twin.grads.values(), strict=True))
    run_rnnkit(Adam, {"lr": 0.1}, model=twin, opt=Adam(pairs, lr=0.1))
    for x, y in zip(model.params.values(), twin.params.values(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert set(Adam(pairs).state_dict()["state"]) == {"0", "1"}
    assert set(Adam(twin).state_dict()["state"]) == {"weight", "inner.bias"}


def test_lr_is_mutable_and_zero_grad():
    model = Toy(np.random.default_rng(0))
    opt = SGD(model, lr=0.1)
    before = flat(model.params.values())
    set_grads(model.grads.values(), np.ones(SIZE))
    opt.lr = 0.0
    opt.step()
    np.testing.assert_array_equal(flat(model.params.values()), before)
    opt.lr = 0.5
    opt.step()
    np.testing.assert_allclose(flat(model.params.values()), before - 0.5)
    opt.zero_grad()
    assert all(np.all(g == 0) for g in model.grads.values())
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -0.1


def test_repr():
    model = Toy(np.random.default_rng(0))
    assert (
        repr(Adam(model)) == "Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False)"
    )
    assert repr(AdamW(model)).startswith("AdamW(lr=0.001,") and "weight_decay=0.01" in repr(AdamW(model))
    assert repr(SGD(model, lr=0.1, momentum=0.9)) == (
        "SGD(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)"
    )


@pytest.mark.parametrize(
    ("cls", "hp", "exc", "name"),
    [
        (SGD, {"lr": -1.0}, ValueError, "lr"),
        (SGD, {"lr": math.nan}, ValueError, "lr"),
        (SGD, {"lr": "0.1"}, TypeError, "lr"),
        (SGD, {"lr": 0.1, "momentum": -0.1}, ValueError, "momentum"),
        (SGD, {"lr": 0.1, "dampening": 1.5}, ValueError, "dampening"),
        (SGD, {"lr": 0.1, "nesterov": True}, ValueError, "nesterov"),
        (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, ValueError, "nesterov"),
        (SGD, {"lr": 0.1, "weight_decay": -1.0}, ValueError, "weight_decay"),
        (Adam, {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]"),
        (Adam, {"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
        (Adam, {"betas": 0.9}, TypeError, "betas"),
        (Adam, {"eps": -1e-8}, ValueError, "eps"),
        (AdamW, {"weight_decay": -1.0}, ValueError, "weight_decay"),
        (RMSprop, {"alpha": 1.5}, ValueError, "alpha"),
        (RMSprop, {"momentum": -1.0}, ValueError, "momentum"),
        (Adagrad, {"lr_decay": -1.0}, ValueError, "lr_decay"),
        (Adagrad, {"initial_accumulator_value": -1.0}, ValueError, "initial_accumulator_value"),
        (Adagrad, {"eps": -1.0}, ValueError, "eps"),
    ],
)
def test_bad_hyperparameters(cls, hp, exc, name):
    with pytest.raises(exc, match=name):
        cls(Toy(np.random.default_rng(0)), **hp)


def test_bad_params():
    p = np.zeros((2, 3))
    with pytest.raises(ValueError, match="empty"):
        Adam([])
    with pytest.raises(ValueError, match="empty"):
        Adam(Module())
    with pytest.raises(TypeError, match="params"):
        Adam(p)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        Adam([p, p])
    with pytest.raises(TypeError, match=r"params\[0\]"):
        Adam([(np.zeros(3, int), np.zeros(3, int))])
    with pytest.raises(ValueError, match=r"gradient of params\[1\]"):
        Adam([(p, np.zeros_like(p)), (np.zeros(3), np.zeros(4))])
    with pytest.raises(ValueError, match="gradient"):
        Adam([(p, np.zeros((2, 3), np.float32))])
    with pytest.raises(ValueError, match="more than once"):
        Adam([(p, np.zeros_like(p)), (p, np.zeros_like(p))])
    p.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        Adam([(p, np.zeros_like(p))])


def test_load_state_dict_refuses_mismatches():
    model = Toy(np.random.default_rng(0))
    opt = Adam(model)
    with pytest.raises(ValueError, match="SGD"):
        opt.load_state_dict(SGD(model, lr=0.1).state_dict())
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.load_state_dict(Adam(model, amsgrad=True).state_dict())
    other = Adam([(np.zeros((3, 4)), np.zeros((3, 4))), (np.zeros(5), np.zeros(5))])
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(other.state_dict())
    bad = opt.state_dict()
    bad["state"]["weight"]["exp_avg"] = np.zeros((4, 3))
    bad["step_count"] = 9
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    assert opt.step_count == 0
    with pytest.raises(TypeError, match="state_dict"):
        opt.load_state_dict({"step_count": 1})


# ------------------------------------------------------------------ clipping


def grads_with_norm(rng):
    grads = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(7)]
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    return grads, norm


def test_clip_grad_norm_scales_above_max(rng):
    grads, norm = grads_with_norm(rng)
    expected = [g * (1.0 / (norm + 1e-6)) for g in grads]
    assert clip_grad_norm(grads, 1.0) == pytest.approx(norm, rel=1e-12)
    for g, e in zip(grads, expected, strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-6)
    assert math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)) == pytest.approx(
        1.0, rel=1e-5
    )


def test_clip_grad_norm_leaves_small_gradients(rng):
    grads, norm = grads_with_norm(rng)
    copies = [g.copy() for g in grads]
    assert clip_grad_norm(grads, norm * 2) == pytest.approx(norm, rel=1e-12)
    for g, c in zip(grads, copies, strict=True):
        np.testing.assert_array_equal(g, c)


def test_clip_grad_norm_on_module_and_single_array():
    model = Toy(np.random.default_rng(0))
    set_grads(model.grads.values(), np.full(SIZE, 2.0))
    assert clip_grad_norm(model, 1.0) == pytest.approx(2.0 * math.sqrt(SIZE), rel=1e-14)
    np.testing.assert_allclose(flat(model.grads.values()), 2.0 / (2.0 * math.sqrt(SIZE) + 1e-6))
    g = np.array([3.0, 4.0])
    assert clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g, [3 / (5 + 1e-6), 4 / (5 + 1e-6)], rtol=1e-14)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_clip_grad_norm_nonfinite(bad, rng):
    grads, _ = grads_with_norm(rng)
    grads[1][2] = bad
    copies = [g.copy() for g in grads]
    with pytest.warns(RuntimeWarning, match="learning rate"):
        norm = clip_grad_norm(grads, 1.0)
    assert not math.isfinite(norm)
    for g, c in zip(grads, copies, strict=True):
        np.testing.assert_array_equal(g, c)
    with pytest.raises(FloatingPointError, match="learning rate"):
        clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
    for g, c in zip(grads, copies, strict=True):
        np.testing.assert_array_equal(g, c)


def test_clip_grad_value(rng):
    grads, _ = grads_with_norm(rng)
    expected = [np.clip(g, -0.5, 0.5) for g in grads]
    clip_grad_value(grads, 0.5)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    assert np.abs(flat(grads)).max() == 0.5


def test_clip_bad_arguments():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([np.ones(3)], -1.0)
    with pytest.raises(ValueError, match="value"):
        clip_grad_value([np.ones(3)], -1.0)
    with pytest.raises(TypeError, match=r"grads_or_module\[1\]"):
        clip_grad_norm([np.ones(3), np.ones(3, int)], 1.0)
    with pytest.raises(TypeError, match="grads_or_module"):
        clip_grad_norm(3.0, 1.0)


def test_clip_grad_norm_matches_torch(rng):
    torch = pytest.importorskip("torch")
    grads = [rng.standard_normal((3, 4)), rng.standard_normal(7) * 3]
    tparams = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, g in zip(tparams, grads, strict=True):
        p.grad = torch.tensor(g)
    theirs = float(torch.nn.utils.clip_grad_norm_(tparams, 2.0))
    assert clip_grad_norm(grads, 2.0) == pytest.approx(theirs, rel=1e-14)
    for g, p in zip(grads, tparams, strict=True):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-14)


# ------------------------------------------------------------------ schedules


def lrs_after(schedule, n, metrics=None):
    out = []
    for i in range(n):
        schedule.step(None if metrics is None else metrics[i])
        out.append(schedule.lr)
    return out


def sgd(lr=0.1):
    return SGD([(np.zeros(2), np.zeros(2))], lr=lr)


def test_step_and_exponential_by_hand():
    opt = sgd()
    sched = StepLR(opt, step_size=3, gamma=0.5)
    assert sched.interval == "epoch" and sched.lr == 0.1
    np.testing.assert_allclose(
        lrs_after(sched, 10), [0.1 * 0.5 ** (k // 3) for k in range(1, 11)], rtol=1e-15
    )
    sched = ExponentialLR(sgd(), gamma=0.9, interval="step")
    assert sched.interval == "step"
    np.testing.assert_allclose(lrs_after(sched, 10), [0.1 * 0.9**k for k in range(1, 11)], rtol=1e-14)


def test_cosine_warmup_by_hand():
    opt = sgd(1.0)
    sched = CosineWarmup(opt, warmup_steps=4, total_steps=12, min_lr=0.1)
    assert sched.interval == "step" and opt.lr == 0.25  # the first update already moves
    lrs = lrs_after(sched, 20)
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(0.75)
    assert lrs[2] == pytest.approx(1.0) and lrs[3] == pytest.approx(1.0)
    assert lrs[7] == pytest.approx(0.55)  # halfway through the cosine: min + (base - min)/2
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[11] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:3]) > 0) and np.all(np.diff(lrs[3:12]) < 0)
    no_warmup = sgd(1.0)
    CosineWarmup(no_warmup, warmup_steps=0, total_steps=10)
    assert no_warmup.lr == 1.0


def test_reduce_on_plateau_by_hand():
    opt = sgd(1.0)
    sched = ReduceLROnPlateau(opt, patience=1, factor=0.5)
    metrics = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85]
    assert lrs_after(sched, 8, metrics) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    sched = ReduceLROnPlateau(sgd(1.0), patience=0, factor=0.5, cooldown=2, min_lr=0.2)
    # bad steps reduce at once, except during the two cooldown steps; never below min_lr
    assert lrs_after(sched, 8, [1.0] * 8) == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
    sched = ReduceLROnPlateau(sgd(1.0), mode="max", patience=0, threshold=0.1, threshold_mode="abs")
    assert lrs_after(sched, 4, [0.5, 0.65, 0.7, 0.85]) == [1.0, 1.0, 0.1, 0.1]
    with pytest.raises(TypeError, match="metric"):
        sched.step()


TORCH_SCHEDULES = [
    ("StepLR", {"step_size": 4, "gamma": 0.5}),
    ("StepLR", {"step_size": 1, "gamma": 0.3}),
    ("ExponentialLR", {"gamma": 0.87}),
    ("ReduceLROnPlateau", {"patience": 2, "factor": 0.5}),
    ("ReduceLROnPlateau", {"patience": 1, "factor": 0.3, "cooldown": 2, "min_lr": 1e-3}),
    ("ReduceLROnPlateau", {"mode": "max", "patience": 1, "threshold": 0.05}),
    ("ReduceLROnPlateau", {"patience": 0, "threshold": 0.02, "threshold_mode": "abs"}),
    ("ReduceLROnPlateau", {"mode": "max", "patience": 1, "threshold": 0.01, "threshold_mode": "abs"}),
]


@pytest.mark.parametrize(("name", "kwargs"), TORCH_SCHEDULES)
def test_schedules_equal_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    metrics = list(1.0 / np.arange(1, 31) + rng.uniform(0, 0.08, 30))
    if kwargs.get("mode") == "max":
        metrics = [1.0 - m for m in metrics]
    plateau = name == "ReduceLROnPlateau"
    sched = {"StepLR": StepLR, "ExponentialLR": ExponentialLR, "ReduceLROnPlateau": ReduceLROnPlateau}[name](
        sgd(0.1), **kwargs
    )
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
    ours, theirs = [], []
    for m in metrics:
        topt.step()
        if plateau:
            tsched.step(m)
            sched.step(m)
        else:
            tsched.step()
            sched.step()
        ours.append(sched.lr)
        theirs.append(topt.param_groups[0]["lr"])
    assert ours == theirs
    assert len(set(ours)) > 2  # the schedule did act


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: StepLR(opt, 3, 0.5),
        lambda opt: ExponentialLR(opt, 0.9),
        lambda opt: CosineWarmup(opt, 3, 12, min_lr=0.01),
        lambda opt: ReduceLROnPlateau(opt, patience=1, factor=0.5, cooldown=1),
    ],
)
def test_schedule_state_dict_resume(make):
    metrics = [1.0, 0.9, 0.95, 0.95, 0.96, 0.7, 0.8, 0.8, 0.8, 0.8, 0.9, 0.9, 0.9, 0.9]
    straight = lrs_after(make(sgd()), 14, metrics)
    first = make(sgd())
    head = lrs_after(first, 6, metrics)
    saved = first.state_dict()
    resumed = make(sgd(0.5))  # another starting lr: the saved state wins
    resumed.load_state_dict(saved)
    assert resumed.lr == head[-1]
    assert head + lrs_after(resumed, 8, metrics[6:]) == straight
    with pytest.raises(ValueError, match="state"):
        resumed.load_state_dict({"last_step": 1})


def test_schedule_bad_arguments():
    with pytest.raises(TypeError, match="optimizer"):
        StepLR(object(), 3)  # type: ignore[arg-type]
    bad = [
        (lambda: StepLR(sgd(), 0), ValueError, "step_size"),
        (lambda: StepLR(sgd(), 2, gamma=0.0), ValueError, "gamma"),
        (lambda: StepLR(sgd(), 2, interval="batch"), ValueError, "interval"),
        (lambda: ExponentialLR(sgd(), -0.5), ValueError, "gamma"),
        (lambda: CosineWarmup(sgd(), 5, 5), ValueError, "total_steps"),
        (lambda: CosineWarmup(sgd(), -1, 5), ValueError, "warmup_steps"),
        (lambda: CosineWarmup(sgd(0.1), 1, 5, min_lr=0.2), ValueError, "min_lr"),
        (lambda: ReduceLROnPlateau(sgd(), factor=1.0), ValueError, "factor"),
        (lambda: ReduceLROnPlateau(sgd(), mode="lowest"), ValueError, "mode"),
        (lambda: ReduceLROnPlateau(sgd(), threshold_mode="pct"), ValueError, "threshold_mode"),
        (lambda: ReduceLROnPlateau(sgd(), patience=-1), ValueError, "patience"),
        (lambda: ReduceLROnPlateau(sgd(), min_lr=-1.0), ValueError, "min_lr"),
    ]
    for call, exc, name in bad:
        with pytest.raises(exc, match=name):
            call()
