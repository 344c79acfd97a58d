"""Property tests (hypothesis) for `sampler.sample` with a tiny nonlinear denoiser: K (DRaFT-K) changes only where
gradients flow, never the image; the gradient at K is the derivative of the trajectory whose last K steps alone see
the parameters; the image of a seed does not depend on its batch; DPM-Solver++(2M)'s weights vanish at the first
and last steps."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from focusfix_core.sampler import SAMPLERS, _multistep_weights, check_sigmas, sample, seed_noise

FAST = settings(max_examples=30, deadline=None)


class Tiny(nn.Module):
    """x0 = a * tanh(c_in * x) + b + mean(context): per sample, nonlinear in x, with parameters a and b [C]."""

    def __init__(self, C: int, seed: int, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(1 + 0.3 * torch.randn(C, generator=g, dtype=dtype))
        self.b = nn.Parameter(0.3 * torch.randn(C, generator=g, dtype=dtype))
        self.calls = []

    def forward(self, x, sigma, cond):
        self.calls.append(torch.is_grad_enabled())
        c_in = (1 + sigma**2).rsqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        shift = cond["context"].mean((1, 2)).view(-1, 1, 1, 1)
        return self.a.view(1, -1, 1, 1) * torch.tanh(c_in * x) + self.b.view(1, -1, 1, 1) + shift


@st.composite
def schedules(draw, max_steps=6):
    """[N+1] sigmas: positive, non-increasing (repeats allowed), ending at 0."""
    n = draw(st.integers(1, max_steps))
    top = draw(st.floats(0.5, 80))
    s = sorted(draw(st.lists(st.floats(0.02, 1), min_size=n, max_size=n)), reverse=True)
    if n > 2 and draw(st.booleans()):
        s[1] = s[0]  # a repeated sigma
    sig = torch.tensor([top * v for v in s] + [0.0], dtype=torch.float64)
    check_sigmas(sig)
    return sig


@st.composite
def setups(draw, B=st.integers(1, 3)):
    sig = draw(schedules())
    b, C, h, w = draw(B), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seeds = draw(st.lists(st.integers(0, 2**63 - 1), min_size=b, max_size=b))
    x = seed_noise(seeds, (C, h, w), dtype=torch.float64) * sig[0]
    cond = {"context": torch.randn(b, 3, 2, generator=torch.Generator().manual_seed(seeds[0]), dtype=torch.float64)}
    return Tiny(C, draw(st.integers(0, 2**31))), x, sig, cond, seeds


@FAST
@given(setup=setups(), sampler=st.sampled_from(SAMPLERS), checkpoint=st.booleans())
def test_k_never_changes_the_image_only_where_gradients_flow(setup, sampler, checkpoint):
    """Every K in 0..N gives the very same image; exactly the last K denoiser calls run with grad, and K = 0 builds
    no graph at all."""
    net, x, sig, cond, _ = setup
    n = len(sig) - 1
    images = []
    for K in range(n + 1):
        net.calls.clear()
        out = sample(net, x, sig, cond, K=K, sampler_name=sampler, checkpoint=checkpoint)
        assert out.shape == x.shape and out.requires_grad == (K > 0)
        # exactly the last K calls with grad (non-reentrant checkpointing recomputes only in backward)
        assert net.calls == [i >= n - K for i in range(n)]
        images.append(out.detach())
    assert all(torch.equal(im, images[0]) for im in images)
    with torch.no_grad():  # grad off: no graph whatever K
        assert not sample(net, x, sig, cond, K=n, sampler_name=sampler, checkpoint=checkpoint).requires_grad


@FAST
@given(setup=setups(), sampler=st.sampled_from(SAMPLERS))
def test_the_image_is_the_last_denoised_estimate(setup, sampler):
    """The last step goes to sigma 0, so the sample is the last x0 the sampler formed (the callback's `denoised`
    for euler/ddim; DPM-Solver++(2M) takes a first-order last step, as k-diffusion does)."""
    net, x, sig, cond, _ = setup
    seen = []
    out = sample(net, x, sig, cond, sampler_name=sampler, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(len(sig) - 1))
    assert torch.equal(out, seen[-1]["denoised"]) and torch.equal(out, seen[-1]["x"])
    assert all(torch.equal(s["sigma"], sig[s["i"]]) and torch.equal(s["sigma_next"], sig[s["i"] + 1]) for s in seen)


@FAST
@given(sig=schedules(), sampler=st.sampled_from(SAMPLERS), c=st.floats(-3, 3), seed=st.integers(0, 2**31))
def test_a_denoiser_that_always_says_c_gives_c(sig, sampler, c, seed):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sig[0]
    out = sample(lambda x, s, cond: torch.full_like(x, c), x, sig, {}, sampler_name=sampler)
    torch.testing.assert_close(out, torch.full_like(x, c), rtol=0, atol=1e-12)


@FAST
@given(setup=setups(B=st.integers(2, 4)), sampler=st.sampled_from(SAMPLERS), data=st.data())
def test_a_seeds_image_does_not_depend_on_its_batch(setup, sampler, data):
    """One generator per seed: a seed's noise, and so its image, are the same alone or anywhere in a batch."""
    net, x, sig, cond, seeds = setup
    batch = sample(net, x, sig, cond, sampler_name=sampler)
    for i in data.draw(st.lists(st.integers(0, len(seeds) - 1), min_size=1, max_size=2, unique=True)):
        alone = seed_noise([seeds[i]], x.shape[1:], dtype=x.dtype)
        assert torch.equal(alone[0] * sig[0], x[i])
        one = sample(net, alone * sig[0], sig, {"context": cond["context"][i:i + 1]}, sampler_name=sampler)
        assert torch.equal(one[0], batch[i])


@FAST
@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5), shape=st.lists(st.integers(1, 3), min_size=1,
       max_size=3), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))
def test_seed_noise_is_one_standard_draw_per_seed(seeds, shape, dtype):
    z = seed_noise(seeds, shape, dtype=dtype)
    assert z.shape == (len(seeds), *shape) and z.dtype == dtype
    for i, s in enumerate(seeds):
        assert torch.equal(z[i], seed_noise([s], shape, dtype=dtype)[0])
        assert torch.equal(z[i], torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(dtype))


def _truncated(net: Tiny, x, sig, cond, K, sampler, a, b):
    """The trajectory whose last K calls use parameters (a, b) and the others the net's own: what DRaFT-K's
    gradient is the derivative of."""
    n = len(sig) - 1
    own = (net.a.detach().clone(), net.b.detach().clone())
    step = [0]

    def denoiser(x, sigma, cond):
        use = (a, b) if step[0] >= n - K else own
        step[0] += 1
        with torch.no_grad():
            net.a.copy_(use[0])
            net.b.copy_(use[1])
        return net(x, sigma, cond)

    with torch.no_grad():
        out = sample(denoiser, x, sig, cond, sampler_name=sampler)
        net.a.copy_(own[0])
        net.b.copy_(own[1])
    return out


@FAST
@given(setup=setups(B=st.integers(1, 2)), sampler=st.sampled_from(SAMPLERS), data=st.data())
def test_the_gradient_at_k_is_that_of_the_last_k_steps(setup, sampler, data):
    """DRaFT-K: d loss / d params with K differentiated steps equals the finite-difference derivative of the
    trajectory in which only the last K denoiser calls see a change of the parameters (float64, central
    differences); K = N is the full gradient. Checkpointing gives the same gradient."""
    net, x, sig, cond, _ = setup
    n = len(sig) - 1
    K = data.draw(st.integers(1, n))
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    grads = []
    for checkpoint in (True, False):
        net.zero_grad()
        (weight * sample(net, x, sig, cond, K=K, sampler_name=sampler, checkpoint=checkpoint)).sum().backward()
        grads.append((net.a.grad.clone(), net.b.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])
    eps = 1e-6
    for which in ("a", "b"):
        for c in range(len(net.a)):
            d = torch.zeros_like(net.a)
            d[c] = eps
            a0, b0 = net.a.detach(), net.b.detach()
            args = [(a0 + d, b0), (a0 - d, b0)] if which == "a" else [(a0, b0 + d), (a0, b0 - d)]
            plus, minus = (float((weight * _truncated(net, x, sig, cond, K, sampler, *ab)).sum()) for ab in args)
            fd = (plus - minus) / (2 * eps)
            got = float(grads[0][0 if which == "a" else 1][c])
            assert got == pytest.approx(fd, rel=1e-5, abs=1e-6), (which, c, K, n)


@FAST
@given(sig=schedules(max_steps=10))
def test_dpmpp_2m_weights_are_finite_and_vanish_at_the_first_and_last_steps(sig):
    w = _multistep_weights(sig)
    assert w.shape == (len(sig) - 1,) and torch.isfinite(w).all() and (w >= 0).all()
    assert float(w[0]) == 0 and float(w[-1]) == 0
    h = (sig[:-1] / sig[1:]).log()
    for i in range(1, len(w) - 1):  # w_i = h_i / (2 h_{i-1}) where both steps move
        if h[i] > 0 and h[i - 1] > 0:
            assert float(w[i]) == pytest.approx(float(h[i] / (2 * h[i - 1])), rel=1e-12)
        else:
            assert float(w[i]) == 0


@FAST
@given(sig=schedules(), K=st.integers(-3, 12), lv=st.integers(-2, 3))
def test_bad_k_and_lv_copies_are_refused_by_name(sig, K, lv):
    n = len(sig) - 1
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    den = lambda x, s, c: x * 0  # noqa: E731
    if not 0 <= K <= n:
        with pytest.raises(ValueError, match=rf"^K \(now {K}\) must be between 0 and steps \(now {n}\)"):
            sample(den, x, sig, {}, K=K, lv_copies=max(lv, 0))
    elif lv < 0:
        with pytest.raises(ValueError, match=rf"^lv_copies must be >= 0, got {lv}"):
            sample(den, x, sig, {}, K=K, lv_copies=lv)
    elif lv > 0 and K != 1:
        with pytest.raises(ValueError, match=rf"DRaFT-LV \(lv_copies > 0\) .*: set K to 1 \(now {K}\)$"):
            sample(den, x, sig, {}, K=K, lv_copies=lv)
    else:
        out = sample(den, x, sig, {}, K=K, lv_copies=lv)
        assert out.shape == (max(lv, 1), 1, 2, 2)
    with pytest.raises(ValueError, match="sigmas must end with 0"):
        sample(den, x, torch.cat([sig[:-1], sig[-2:-1] / 2]), {}, K=0)
    with pytest.raises(ValueError, match=r"unknown sampler_name 'euler_a'"):
        sample(den, x, sig, {}, sampler_name="euler_a")
