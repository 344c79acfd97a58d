"""Property tests (hypothesis) for focusfix_core.schedules: every scheduler's sigmas, and timestep <-> sigma."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focusfix_core.sampler import check_sigmas
from focusfix_core.schedules import (
    SCHEDULERS,
    get_sigmas_exponential,
    get_sigmas_karras,
    scaled_linear_alphas_cumprod,
    scheduler_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
)

FAST = settings(max_examples=120, deadline=None)


@st.composite
def training_sigmas(draw, max_n=1000):
    """A model's ascending training sigmas: a scaled-linear DDPM schedule of random length and betas, in the
    dtype a model may hold it."""
    n = draw(st.integers(2, max_n))
    beta_start = draw(st.floats(1e-4, 2e-3))
    beta_end = draw(st.floats(5e-3, 0.03))
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod(n, beta_start, beta_end))
    return sig.to(draw(st.sampled_from([torch.float32, torch.float64])))


@FAST
@given(sig=training_sigmas(), name=st.sampled_from(SCHEDULERS), steps=st.integers(1, 1200))
def test_every_scheduler_gives_a_full_non_increasing_finite_schedule(sig, name, steps):
    """[steps + 1] sigmas from sigma_max down to 0, finite, positive until the last, never increasing: what the
    sampler accepts (check_sigmas), for any step count (also more steps than training timesteps)."""
    s = scheduler_sigmas(name, sig, steps)
    assert s.shape == (steps + 1,)
    assert bool(torch.isfinite(s).all()) and float(s[-1]) == 0.0 and bool((s[:-1] > 0).all())
    assert bool((s[1:] <= s[:-1]).all()), s
    check_sigmas(s)
    assert float(s[0]) == pytest.approx(float(sig[-1]), rel=1e-4)
    assert float(s[:-1].min()) >= float(sig[0]) * (1 - 1e-4)  # never below the model's smallest sigma
    if steps > 1 and name in ("karras", "exponential", "normal"):
        assert float(s[-2]) == pytest.approx(float(sig[0]), rel=1e-4)


@FAST
@given(steps=st.integers(1, 2000), lo=st.floats(1e-3, 1.0), ratio=st.floats(1.001, 1e4),
       rho=st.floats(1.0, 10.0), kind=st.sampled_from(["karras", "exponential"]))
def test_karras_and_exponential_run_from_sigma_max_to_sigma_min(steps, lo, ratio, rho, kind):
    hi = lo * ratio
    s = get_sigmas_karras(steps, lo, hi, rho) if kind == "karras" else get_sigmas_exponential(steps, lo, hi)
    assert s.shape == (steps + 1,) and float(s[-1]) == 0.0
    assert bool(torch.isfinite(s).all()) and bool((s[1:] <= s[:-1]).all())
    assert float(s[0]) == pytest.approx(hi, rel=1e-4)
    if steps > 1 and kind == "exponential":
        assert float(s[-2]) == pytest.approx(lo, rel=1e-4)
    elif steps > 1:  # float32, as k-diffusion and ComfyUI: hi^(1/rho) + (lo^(1/rho) - hi^(1/rho)) cancels
        root = lambda v: v ** (1 / rho)  # noqa: E731
        assert abs(root(float(s[-2])) - root(lo)) <= 1e-6 * root(hi)


@FAST
@given(sig=training_sigmas(), u=st.lists(st.floats(0, 1), min_size=1, max_size=16))
def test_t_to_sigma_then_back_is_the_identity(sig, u):
    T = len(sig)
    t = torch.tensor(u) * (T - 1)
    s = t_to_sigma(t, sig)
    assert bool(torch.isfinite(s).all())
    torch.testing.assert_close(sigma_to_t(s, sig), t, atol=2e-3, rtol=1e-4)


@FAST
@given(sig=training_sigmas(), u=st.lists(st.floats(0, 1), min_size=1, max_size=16))
def test_sigma_to_t_then_back_is_the_identity(sig, u):
    """Any sigma in the model's range maps to a timestep in [0, T-1] that maps back to it."""
    lo, hi = math.log(float(sig[0])), math.log(float(sig[-1]))
    sigma = torch.tensor([math.exp(lo + v * (hi - lo)) for v in u])
    t = sigma_to_t(sigma, sig)
    assert t.shape == sigma.shape and bool(((t >= 0) & (t <= len(sig) - 1)).all())
    torch.testing.assert_close(t_to_sigma(t, sig), sigma, rtol=1e-4, atol=0)


@FAST
@given(sig=training_sigmas(), u=st.lists(st.floats(-3, 3), min_size=2, max_size=32))
def test_sigma_to_t_is_monotone_and_clamped_to_the_training_range(sig, u):
    """Larger sigma -> no smaller timestep; below sigma_min -> 0, above sigma_max -> T-1 (also sigma = 0)."""
    lo, hi = math.log(float(sig[0])), math.log(float(sig[-1]))
    sigma = torch.tensor(sorted(math.exp(lo + v * (hi - lo)) for v in u) + [0.0])
    t = sigma_to_t(sigma, sig)
    assert bool(torch.isfinite(t).all())
    assert bool((t[1:-1] >= t[:-2]).all()), t
    assert bool(((t >= 0) & (t <= len(sig) - 1)).all())
    # sigma = 0 (every schedule's last) and sigmas below the range: t = 0, up to float32 rounding of log(sigma)
    # (a float64 table: t ~ 5e-7 at 0; t ~ T-1 - 3e-5 at sigma_max), as in the round trips
    assert float(t[-1]) == pytest.approx(0, abs=2e-3)
    below = sigma[:-1] <= sig[0].float()
    above = sigma[:-1] >= sig[-1].float()
    assert bool((t[:-1][below] <= 2e-3).all()) and bool((t[:-1][above] >= len(sig) - 1 - 2e-3).all())


@FAST
@given(sig=training_sigmas(), i=st.integers(0, 10**6))
def test_each_training_sigma_is_its_own_timestep(sig, i):
    i = i % len(sig)
    t = sigma_to_t(sig[i : i + 1].float(), sig)
    assert float(t) == pytest.approx(i, abs=2e-3)
