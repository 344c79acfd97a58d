"""Sampler: DRaFT-K truncation, determinism, DDIM against the closed form for Gaussian data."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from focusfix_core.denoisers import CFGDenoiser
from focusfix_core.sampler import (CompiledWhenNoGrad, check_sigmas, check_steps, checkpointed_modules, sample,
                                   seed_noise)
from focusfix_core.schedules import (get_sigmas_karras, get_sigmas_uniform, scaled_linear_alphas_cumprod, sigma_to_t,
                                     sigmas_from_alphas_cumprod, t_to_sigma)


REPO = Path(__file__).resolve().parents[1]


class GaussianDenoiser(torch.nn.Module):
    """Exact E[x0 | x] for x0 ~ N(mu, s^2 I): mu + s^2/(s^2+sigma^2) (x - mu). `p` scales mu (a learnable knob)."""

    def __init__(self, mu=0.5, s=0.7):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(1.0))
        self.mu, self.s = mu, s
        self.grad_calls = 0
        self.calls = 0

    def forward(self, x, sigma, cond):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        sig = sigma[:, None, None, None]
        mu = self.mu * self.p * cond["context"].mean(dim=(1, 2))[:, None, None, None]
        return mu + self.s**2 / (self.s**2 + sig**2) * (x - mu)


def cond():
    return {"context": torch.ones(2, 1, 1)}


def test_ddim_matches_discrete_closed_form_and_ode():
    den, mu, s = GaussianDenoiser(), 0.5, 0.7
    sigmas = get_sigmas_karras(200, 0.002, 20.0)
    x = seed_noise([1, 2], (1, 4, 4)) * sigmas[0]
    with torch.no_grad():
        out = sample(den, x, sigmas, cond())
    # each Euler step multiplies (x - mu) by (s^2 + sigma*sigma') / (s^2 + sigma^2)
    factor = 1.0
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        factor *= (s**2 + a * b) / (s**2 + a**2)
    torch.testing.assert_close(out, mu + (x - mu) * factor, rtol=1e-5, atol=1e-5)
    # and the probability-flow ODE's exact solution: (x - mu) * s / sqrt(s^2 + sigma_max^2)
    exact = mu + (x - mu) * s / math.sqrt(s**2 + float(sigmas[0]) ** 2)
    assert (out - exact).abs().max() < 0.02


def test_k0_builds_no_graph():
    den = GaussianDenoiser()
    sigmas = get_sigmas_karras(5, 0.1, 10.0)
    out = sample(den, torch.randn(2, 1, 4, 4) * 10, sigmas, cond(), K=0)
    assert not out.requires_grad and out.grad_fn is None
    assert den.grad_calls == 0


@pytest.mark.parametrize("K", [1, 3])
def test_grad_last_k_counts_differentiated_calls(K):
    den = GaussianDenoiser()
    sigmas = get_sigmas_karras(6, 0.1, 10.0)
    out = sample(den, torch.randn(2, 1, 4, 4) * 10, sigmas, cond(), K=K, checkpoint=False)
    assert den.grad_calls == K and den.calls == 6
    out.sum().backward()
    assert den.p.grad is not None and den.p.grad.abs() > 0


def test_k1_gradient_equals_last_step_only():
    """With K=1 the gradient is the last call's partial derivative, with its input treated as constant."""
    den = GaussianDenoiser()
    sigmas = get_sigmas_karras(4, 0.1, 10.0)
    x = torch.randn(2, 1, 3, 3) * 10
    out = sample(den, x, sigmas, cond(), K=1, checkpoint=False)
    out.sum().backward()
    # last step sigma -> 0 returns x0 = mu*p + c*(x_prev - mu*p): d/dp = mu*(1-c) per element
    c = den.s**2 / (den.s**2 + float(sigmas[-2]) ** 2)
    assert den.p.grad.item() == pytest.approx(den.mu * (1 - c) * out.numel(), rel=1e-5)


def test_checkpointing_gives_same_gradient():
    grads = []
    for ckpt in (False, True):
        den = GaussianDenoiser()
        out = sample(den, torch.ones(2, 1, 3, 3) * 3, get_sigmas_karras(5, 0.1, 10.0), cond(), K=3, checkpoint=ckpt)
        out.pow(2).sum().backward()
        grads.append(den.p.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_block_checkpointing_gives_same_gradient_and_restores_forward():
    """Block-wise checkpointing (TinyModel's resnets/transformers) changes memory, not the math: the LoRA's
    gradient equals the one without checkpointing; the blocks recompute in backward; their forward is restored."""
    from focusfix_core.lora import LoRA
    from focusfix_core.sampler import checkpointed_modules
    from focusfix_core.tiny.model import TinyConfig, TinyModel
    model = TinyModel.random(0, TinyConfig(image_size=16))
    blocks = model.checkpoint_modules()
    assert len(blocks) >= 8 and all("forward" not in b.__dict__ for b in blocks)
    lora = LoRA.attach(model.net, "attn", rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a in lora.adapters:
            a.up.normal_(generator=torch.Generator().manual_seed(1)).mul_(0.1)
    with torch.no_grad():
        c, u = model.encode_prompts(["a red circle", "a blue square"]), model.encode_prompts([""])
    den = CFGDenoiser(model.denoise, u, 3.0)
    sigmas = get_sigmas_uniform(model.sigmas, 4)
    x = seed_noise([0, 1], (3, 16, 16)) * sigmas[0]
    inner = next(m for n, m in model.net.named_modules() if n.endswith("attn2.to_q"))  # inside a checkpointed block
    calls = []
    handle = inner.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    grads, outs, grad_calls = [], [], []
    for ckpt, modules in ((False, ()), (False, blocks), (True, ())):
        calls.clear()
        lora.zero_grad(set_to_none=True)
        with checkpointed_modules(modules):
            out = sample(den, x, sigmas, c, K=2, checkpoint=ckpt)
        out.square().mean().backward()  # outside the context: the recompute uses the captured forwards
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
        outs.append(out.detach())
        grad_calls.append(sum(calls))
        if modules:
            assert all("forward" not in b.__dict__ for b in blocks)  # restored on exit
    handle.remove()
    assert grad_calls[0] == 2 and grad_calls[1] == 4  # K = 2 differentiated calls; block-wise: each recomputed
    for g, o in zip(grads[1:], outs[1:]):
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0
    with checkpointed_modules(blocks[:1]), torch.no_grad():  # no grad: plain forward, no checkpoint wrapper work
        model.net(x, torch.zeros(2), c)


def test_same_seed_same_image_and_batch_independent():
    den = GaussianDenoiser()
    sigmas = get_sigmas_karras(5, 0.1, 10.0)
    a = sample(den, seed_noise([3, 4], (1, 4, 4)) * sigmas[0], sigmas, cond())
    b = sample(den, seed_noise([3, 4], (1, 4, 4)) * sigmas[0], sigmas, cond())
    c = seed_noise([4], (1, 4, 4))
    assert torch.equal(a, b)
    assert torch.equal(seed_noise([3, 4], (1, 4, 4))[1:], c)


def test_draft_lv_copies_shape_and_gradient():
    den = GaussianDenoiser()
    g = torch.Generator().manual_seed(0)
    out = sample(den, torch.randn(2, 1, 3, 3), get_sigmas_karras(5, 0.1, 10.0), cond(), K=1, lv_copies=3, generator=g)
    assert out.shape == (6, 1, 3, 3)
    out.sum().backward()
    assert den.p.grad.abs() > 0


def test_draft_lv_differentiates_only_its_copies():
    den, grad_calls = GaussianDenoiser(), []

    def recording(x, sigma, c):
        grad_calls.append(torch.is_grad_enabled())
        return den(x, sigma, c)
    sample(recording, torch.randn(2, 1, 3, 3), get_sigmas_karras(5, 0.1, 10.0), cond(), K=1, lv_copies=3,
           generator=torch.Generator().manual_seed(0))
    assert grad_calls == [False] * 5 + [True]  # the loop's graph would be discarded by the re-noising
    with pytest.raises(ValueError, match=r"set K to 1 \(now 2\)"):
        sample(den, torch.randn(2, 1, 3, 3), get_sigmas_karras(5, 0.1, 10.0), cond(), K=2, lv_copies=3)


def test_cfg_denoiser_batches_once_and_guides():
    den = GaussianDenoiser()
    cfgd = CFGDenoiser(den, {"context": torch.zeros(1, 1, 1)}, 3.0)
    x, sig = torch.randn(2, 1, 3, 3), torch.full((2,), 2.0)
    out = cfgd(x, sig, {"context": torch.ones(2, 1, 1)})
    assert den.calls == 1
    c = den(x, sig, {"context": torch.ones(2, 1, 1)})
    u = den(x, sig, {"context": torch.zeros(2, 1, 1)})
    torch.testing.assert_close(out, u + 3.0 * (c - u))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="K"):
        check_steps(4, 5)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas_uniform(torch.linspace(0.1, 10, 100), 0)
    with pytest.raises(ValueError, match="sigmas must end with 0"):
        sample(GaussianDenoiser(), torch.zeros(1, 1, 2, 2), torch.tensor([2.0, 1.0]), cond())


def test_schedule_roundtrip_and_sd_range():
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod())
    assert sig[0] == pytest.approx(0.0292, abs=1e-3) and sig[-1] == pytest.approx(14.61, abs=0.01)
    t = torch.tensor([0.0, 10.5, 999.0])
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, sig), sig), t, atol=1e-3, rtol=1e-4)
    s = get_sigmas_uniform(sig, 10)
    assert len(s) == 11 and s[-1] == 0 and bool((s[:-1].diff() < 0).all())


def test_cfg_denoiser_batches_a_marked_pair_and_hands_guidance_both_predictions():
    from focusfix_core.denoisers import CFG_PAIR
    seen = []

    def inner(x, sigma, cond):
        seen.append((len(x), CFG_PAIR in cond, cond.get(CFG_PAIR)))
        return x * cond["context"].mean(dim=(1, 2))[:, None, None, None]

    c, u = {"context": torch.full((2, 1, 1), 2.0)}, {"context": torch.full((1, 1, 1), 0.5)}
    x, sigma = torch.randn(2, 1, 4, 4), torch.ones(2)
    plain = CFGDenoiser(inner, u, 3.0)(x, sigma, c)
    torch.testing.assert_close(plain, 0.5 * x + 3.0 * (2.0 - 0.5) * x)
    assert seen[-1][:2] == (4, True) and seen[-1][2].shape == (4, 0)  # one call, marked: [prompt rows; negative rows]
    got = []

    def guidance(x_, sigma_, x0_c, x0_u, scale):
        got.append((x0_c, x0_u, scale))
        return x0_c if x0_u is None else x0_c - x0_u
    out = CFGDenoiser(inner, u, 3.0, guidance)(x, sigma, c)
    torch.testing.assert_close(got[0][0], 2.0 * x)
    torch.testing.assert_close(got[0][1], 0.5 * x)
    torch.testing.assert_close(out, 1.5 * x)
    # scale 1: the negative prompt is not evaluated, the call is not a pair, guidance gets None for it
    seen.clear()
    out = CFGDenoiser(inner, u, 1.0, guidance)(x, sigma, c)
    assert seen == [(2, False, None)] and got[-1][1] is None and got[-1][2] == 1.0
    # ... unless the guidance needs it (ComfyUI: a patch that set disable_cfg1_optimization)
    seen.clear()
    guidance.needs_uncond = True
    out = CFGDenoiser(inner, u, 1.0, guidance)(x, sigma, c)
    assert seen[0][:2] == (4, True) and got[-1][2] == 1.0
    torch.testing.assert_close(got[-1][1], 0.5 * x)
    torch.testing.assert_close(out, 1.5 * x)


# -- samplers and schedulers by KSampler's names ------------------------------------------------------------
def _dpmpp_2m_reference(den, x, sigmas, c):
    """DPM-Solver++(2M) written in log-sigma time t = -log sigma, as the paper states it (Lu et al. 2022)."""
    old, ts = None, [-math.log(s) if s > 0 else math.inf for s in sigmas.tolist()]
    for i in range(len(sigmas) - 1):
        x0 = den(x, sigmas[i] * torch.ones(len(x)), c)
        h = ts[i + 1] - ts[i]
        if old is None or sigmas[i + 1] == 0:
            d = x0
        else:
            r = (ts[i] - ts[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old
        x = math.exp(-h) * x - math.expm1(-h) * d
        old = x0
    return x


def test_dpmpp_2m_follows_the_solver_and_is_second_order():
    """The same x as the solver written in log-sigma time; on Gaussian data (exact ODE solution known) doubling
    the steps divides its error by more than 3 (second order), DDIM's by about 2 (first order)."""
    den, mu, s = GaussianDenoiser(), 0.5, 0.7
    errors = {"ddim": [], "dpmpp_2m": []}
    for n in (16, 32):
        sigmas = get_sigmas_karras(n, 0.03, 14.6)
        x = seed_noise([1, 2], (1, 4, 4)) * sigmas[0]
        exact = mu + (x - mu) * s / math.sqrt(s**2 + float(sigmas[0]) ** 2)
        with torch.no_grad():
            out = {name: sample(den, x, sigmas, cond(), sampler_name=name) for name in ("ddim", "euler", "dpmpp_2m")}
            torch.testing.assert_close(out["dpmpp_2m"], _dpmpp_2m_reference(den, x, sigmas, cond()), rtol=1e-5,
                                       atol=1e-5)
        assert torch.equal(out["ddim"], out["euler"])  # one step rule, two names (as in ComfyUI)
        for name in errors:
            errors[name].append(float((out[name] - exact).abs().max()))
    ratio = {name: e[0] / e[1] for name, e in errors.items()}
    assert 1.6 < ratio["ddim"] < 2.5 and ratio["dpmpp_2m"] > 3, (errors, ratio)
    assert errors["dpmpp_2m"][1] < errors["ddim"][1] / 5


@pytest.mark.parametrize("K", [1, 3])
def test_dpmpp_2m_differentiates_the_last_k_calls(K):
    """DRaFT-K is the same with the multistep sampler: K differentiated calls, and at K=3 the gradient also
    flows through the previous call's x0 that the step extrapolates from (it differs from K=1's)."""
    grads = []
    for k in (1, K):
        den = GaussianDenoiser()
        out = sample(den, torch.ones(2, 1, 3, 3) * 5, get_sigmas_karras(6, 0.1, 10.0), cond(), K=k, checkpoint=False,
                     sampler_name="dpmpp_2m")
        assert den.grad_calls == k and den.calls == 6
        out.sum().backward()
        grads.append(float(den.p.grad))
    assert grads[0] != 0
    if K > 1:
        assert abs(grads[1] - grads[0]) > 1e-3 * abs(grads[0])


def test_dpmpp_2m_survives_a_repeated_sigma():
    """A schedule with a repeated sigma (h = 0) takes a first-order step there instead of dividing by zero."""
    sigmas = torch.tensor([10.0, 4.0, 4.0, 1.0, 0.0])
    out = sample(GaussianDenoiser(), torch.ones(2, 1, 3, 3) * 10, sigmas, cond(), sampler_name="dpmpp_2m")
    assert torch.isfinite(out).all()


def test_core_schedulers_by_name():
    from focusfix_core.schedules import SCHEDULERS, scheduler_sigmas
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod()).float()
    seen = {}
    for name in SCHEDULERS:
        s = scheduler_sigmas(name, sig, 12)
        assert s.shape == (13,) and s[-1] == 0 and bool((s[:-1].diff() < 0).all()), name
        assert float(s[0]) == pytest.approx(float(sig[-1]), rel=1e-4), name  # every one starts at sigma_max
        seen[name] = s
    assert float(seen["karras"][-2]) == pytest.approx(float(sig[0]), rel=1e-4)       # and ends at sigma_min
    assert float(seen["exponential"][-2]) == pytest.approx(float(sig[0]), rel=1e-4)
    assert float(seen["sgm_uniform"][-2]) > float(seen["normal"][-2])               # stops one even step early
    assert float(seen["simple"][1]) == pytest.approx(float(sig[len(sig) - 1 - int(1000 / 12)]))
    with pytest.raises(ValueError, match=r"unknown scheduler 'beta'.*normal"):
        scheduler_sigmas("beta", sig, 12)


def test_sampling_sigmas_prefers_the_models_own_and_checks_them():
    from focusfix_core.sampler import check_sigmas, sampling_sigmas

    class Own:
        sigmas = torch.linspace(0.1, 10, 100)

        def sampling_sigmas(self, steps, scheduler):
            return torch.tensor([10.0, 5.0, 0.0]) if scheduler == "mine" else torch.tensor([10.0, 0.0, 5.0])

    assert sampling_sigmas(Own(), 2, "mine").tolist() == [10.0, 5.0, 0.0]
    with pytest.raises(ValueError, match="'odd' scheduler's sigmas must be positive and end at 0"):
        sampling_sigmas(Own(), 2, "odd")
    with pytest.raises(ValueError, match="must not increase"):
        check_sigmas([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="at least 2 values"):
        check_sigmas([0.0])
    with pytest.raises(ValueError, match="finite"):
        check_sigmas([math.nan, 0.0])
    with pytest.raises(ValueError, match="SplitSigmas"):
        check_sigmas([14.6, 3.0, 1.0])
    with pytest.raises(ValueError, match=r"unknown sampler_name 'euler_ancestral'.*dpmpp_2m"):
        sample(GaussianDenoiser(), torch.zeros(2, 1, 2, 2), torch.tensor([2.0, 0.0]), cond(),
               sampler_name="euler_ancestral")


# ---------------------------------------------------------------- review: mutation-testing gaps S7-S10
def _comfy_normal_reference(sig, steps):
    """ComfyUI's `normal_scheduler` (comfy/samplers.py) re-derived in float64: timesteps
    linspace(timestep(sigma_max) = T-1, timestep(sigma_min) = 0, steps), each sigma(t) log-linear between the
    neighbouring training sigmas (comfy/model_sampling.py `sigma`), then a 0 appended."""
    log_s = sig.double().log()
    out = []
    for t in torch.linspace(len(sig) - 1, 0, steps, dtype=torch.float64).tolist():
        lo = math.floor(t)
        hi, w = min(lo + 1, len(sig) - 1), t - lo
        out.append(math.exp((1 - w) * float(log_s[lo]) + w * float(log_s[hi])))
    return torch.tensor(out + [0.0], dtype=torch.float64)


@pytest.mark.parametrize("steps", [1, 2, 12, 30])
def test_normal_schedule_is_comfyuis_and_ends_at_sigma_min(steps):
    """KSampler's "normal": starts at sigma_max, its last nonzero sigma is sigma_min (t = 0), then 0."""
    from focusfix_core.schedules import scheduler_sigmas

    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod()).float()
    s = scheduler_sigmas("normal", sig, steps)
    assert s.shape == (steps + 1,) and s[-1] == 0
    assert float(s[0]) == pytest.approx(float(sig[-1]), rel=1e-5)
    if steps > 1:
        assert float(s[-2]) == pytest.approx(float(sig[0]), rel=1e-5)  # sigma_min = 0.0292 (sig[1] = 0.0413)
    torch.testing.assert_close(s.double(), _comfy_normal_reference(sig, steps), rtol=1e-5, atol=0)


@pytest.mark.parametrize("seed", [0, 123, 2**40 + 7])
def test_seed_noise_is_the_noise_ksampler_draws_for_the_seed(seed):
    """ComfyUI's prepare_noise (comfy/sample.py): torch.manual_seed(seed), then torch.randn of the latent's
    [1,C,h,w] shape on the CPU. The same seed must give KSampler's noise, so KSampler redraws I0."""
    shape = (4, 8, 8)
    ref = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(seed_noise([seed], shape)[0], ref)


def test_seed_noise_batch_draws_each_seed_on_its_own():
    """Row b is KSampler's noise for seeds[b] at batch size 1, whatever the other seeds (a repeated seed repeats
    its row)."""
    shape = (3, 5, 6)
    seeds = [7, 0, 123, 7]
    out = seed_noise(seeds, shape)
    assert out.shape == (4, *shape)
    for row, s in zip(out, seeds):
        assert torch.equal(row, torch.randn((1, *shape), generator=torch.Generator().manual_seed(s))[0])


class _RecordingNet:
    """A stub network: records what it is fed, returns a fixed prediction (eps or v)."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def __call__(self, x_in, t, c):
        self.seen.append((x_in.detach().clone(), t.detach().clone(), c))
        return self.out


def _scalings_case():
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod()).float()
    # 0.34 and 3.33: halfway in log sigma between training sigmas 100 and 101 (t = 100.5), training sigma 700 (t = 700)
    sigma = torch.stack([(sig[100] * sig[101]).sqrt(), sig[700]])
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    return sig, sigma, x, pred, {"context": torch.ones(2, 1, 1)}


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_denoiser_scalings_feed_c_in_x_and_the_timestep(kind):
    """k-diffusion's external.py scalings: the network gets c_in * x with c_in = 1/sqrt(sigma^2 + 1) and
    t = sigma_to_t(sigma); eps: x0 = x - sigma * eps; v: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v."""
    from focusfix_core.denoisers import EpsDenoiser, VDenoiser

    sig, sigma, x, pred, c = _scalings_case()
    net = _RecordingNet(pred)
    x0 = (EpsDenoiser if kind == "eps" else VDenoiser)(net, sig)(x, sigma, c)
    ((x_in, t, c_seen),) = net.seen
    s = sigma.double()[:, None, None, None]
    torch.testing.assert_close(x_in.double(), x.double() / (s**2 + 1).sqrt(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t, sigma_to_t(sigma, sig))
    torch.testing.assert_close(t, torch.tensor([100.5, 700.0]), rtol=0, atol=1e-2)
    assert c_seen is c
    if kind == "eps":
        ref = x.double() - s * pred.double()
    else:
        ref = x.double() / (s**2 + 1) - s / (s**2 + 1).sqrt() * pred.double()
    torch.testing.assert_close(x0.double(), ref, rtol=1e-6, atol=1e-6)


def test_draft_lv_renoises_the_final_sample_at_the_last_nonzero_sigma():
    """DRaFT-LV's one differentiated call: the loop's final sample, repeated per copy, plus sigmas[-2] times the
    generator's noise, denoised at sigma = sigmas[-2] (the last nonzero sigma)."""
    from focusfix_core.denoisers import repeat_cond

    den, calls = GaussianDenoiser(), []
    sigmas = get_sigmas_karras(5, 0.1, 10.0)
    x = seed_noise([1, 2], (1, 3, 3)) * sigmas[0]

    def recording(x_, sigma, c):
        calls.append((x_.detach().clone(), sigma.detach().clone()))
        return den(x_, sigma, c)

    with torch.no_grad():
        final = sample(den, x, sigmas, cond())
    out = sample(recording, x, sigmas, cond(), K=1, lv_copies=3, generator=torch.Generator().manual_seed(7))
    assert len(calls) == 6 and out.shape == (6, 1, 3, 3)
    x_in, sigma = calls[-1]
    assert torch.equal(sigma, sigmas[-2].expand(6))
    noise = torch.randn((6, 1, 3, 3), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x_in, final.repeat_interleave(3, dim=0) + sigmas[-2] * noise)
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), den(x_in, sigma, repeat_cond(cond(), 3)))


def test_a_scheduler_with_no_one_step_schedule_says_to_give_more_steps():
    """ComfyUI's kl_optimal divides by steps - 1: at steps 1 its sigmas are [nan, 0]. The error says what to
    change, not only that the sigmas are not finite (fuzz review)."""
    from focusfix_core.sampler import sampling_sigmas

    class KLOptimalLike:
        def sampling_sigmas(self, steps, scheduler):
            return torch.tensor([float("nan"), 0.0]) if steps == 1 else torch.linspace(14.6, 0.0, steps + 1)

    with pytest.raises(ValueError, match=r"'kl_optimal' scheduler's sigmas must be finite.*with steps 1: give steps 2"):
        sampling_sigmas(KLOptimalLike(), 1, "kl_optimal")
    assert len(sampling_sigmas(KLOptimalLike(), 2, "kl_optimal")) == 3


# -- the compiled sampler (`CompiledWhenNoGrad`) on a CUDA machine: the allocator, a failing first run ---------------
ASYNC_ERROR = ("cudaMallocAsync does not yet support checkPoolLiveAllocations. If you need it, please file an issue "
               "describing your use case.")


def _compiled(mode, run):
    """A CompiledWhenNoGrad over GaussianDenoiser whose 'compiled' callable is `run` (x, sigma, cond) -> (x0, traced),
    with the compiler's calls recorded."""
    from focusfix_core.sampler import CompiledWhenNoGrad

    den, made = GaussianDenoiser(), []

    def compiler(probed, mode):
        made.append(mode)
        return lambda x, sigma, c: run(probed, x, sigma, c)

    return CompiledWhenNoGrad(den, mode, compiler), den, made


def _inputs():
    return torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.full((2,), 3.0), cond()


def test_cuda_graphs_are_blocked_under_cudamallocasync_on_cuda_only_6(monkeypatch):
    """ComfyUI's main.py sets PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync on most GPUs, where CUDA-graph modes
    fail at their first run: reduce-overhead and max-autotune on a CUDA device are refused there, with the reason,
    and nothing else is (default mode, a CPU device, the native allocator, a torch without CUDA)."""
    from focusfix_core import sampler

    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert sampler.cuda_allocator_backend() == "cudaMallocAsync"
    for mode in ("reduce-overhead", "max-autotune"):
        why = sampler.cuda_graphs_blocked(mode, torch.device("cuda", 0))
        assert why.startswith("cudaMallocAsync allocator:") and mode in why and "--disable-cuda-malloc" in why
    assert sampler.cuda_graphs_blocked("default", "cuda") is None
    assert sampler.cuda_graphs_blocked("reduce-overhead", "cpu") is None
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "native")
    assert sampler.cuda_graphs_blocked("reduce-overhead", "cuda") is None

    def cpu_only_build():  # torch 2.13+cpu: torch._C has no _cuda_getAllocatorBackend
        raise AttributeError("module 'torch._C' has no attribute '_cuda_getAllocatorBackend'")

    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", cpu_only_build)
    assert sampler.cuda_allocator_backend() is None and sampler.cuda_graphs_blocked("reduce-overhead", "cuda") is None


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build has no CUDA allocator to read")
def test_the_allocator_is_read_from_comfyuis_variable_without_a_gpu_6(tmp_path):
    """On a CUDA build of torch (the GPU machines' 2.11+cu130), the backend ComfyUI's cuda_malloc.py sets is read
    from PYTORCH_CUDA_ALLOC_CONF as it is, with no GPU and without initializing CUDA."""
    import os
    import subprocess
    import sys

    code = ("import torch; from focusfix_core.sampler import cuda_allocator_backend as b, cuda_graphs_blocked as g; "
            "print(b(), g('reduce-overhead', 'cuda') is not None, g('default', 'cuda'), torch.cuda.is_initialized())")
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=REPO)
    assert got.stdout.split() == ["cudaMallocAsync", "True", "None", "False"], got.stderr[-2000:]
    env.pop("PYTORCH_CUDA_ALLOC_CONF")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=REPO)
    assert got.stdout.split() == ["native", "False", "None", "False"], got.stderr[-2000:]


def test_cuda_graphs_under_cudamallocasync_sample_eagerly_and_say_why_6(monkeypatch, caplog):
    """A CUDA-graph mode under cudaMallocAsync never runs its compiled code (it would raise a RuntimeError and stop
    the run): every graph-free call runs eagerly, with the results of the plain denoiser, and `failure` and one
    warning name the allocator. The device asked about is the input's."""
    from focusfix_core import sampler

    asked = []

    def blocked(mode, device):
        asked.append((mode, torch.device(device)))
        return "cudaMallocAsync allocator: compile mode 'reduce-overhead' runs CUDA graphs (stand-in)"

    monkeypatch.setattr(sampler, "cuda_graphs_blocked", blocked)
    ran = []
    wrapped, den, made = _compiled("reduce-overhead", lambda probed, *a: ran.append(1) or probed(*a))
    x, sigma, c = _inputs()
    with caplog.at_level("WARNING", logger="focusfix_core.sampler"), torch.no_grad():
        outs = [wrapped(x, sigma, c) for _ in range(3)]
    assert asked == [("reduce-overhead", torch.device("cpu"))]  # once, at the first graph-free call
    assert ran == [] and wrapped.compiled is None
    assert wrapped.failure.startswith("cudaMallocAsync allocator:")
    assert (wrapped.compiled_calls, wrapped.eager_calls) == (0, 3)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cudaMallocAsync" in warnings[0], warnings
    with torch.no_grad():
        for out in outs:
            torch.testing.assert_close(out, den(x, sigma, c))


def test_a_runtime_error_at_the_compiled_run_falls_back_to_eager_6(caplog):
    """CUDA graphs that fail at their first run (cudaMallocAsync's RuntimeError, not a dynamo exception) no longer
    stop the training run: that call and every later one run eagerly, `failure` says why as for a compile
    failure ("Type: message", 300 characters at most), and the warning comes once."""
    ran = []

    def run(probed, x, sigma, c):
        ran.append(1)
        raise RuntimeError(ASYNC_ERROR)

    wrapped, den, _ = _compiled("reduce-overhead", run)
    x, sigma, c = _inputs()
    with caplog.at_level("WARNING", logger="focusfix_core.sampler"), torch.no_grad():
        first, second = wrapped(x, sigma, c), wrapped(x, sigma, c)
        expected = den(x, sigma, c)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert ran == [1] and wrapped.compiled is None and (wrapped.compiled_calls, wrapped.eager_calls) == (0, 2)
    assert wrapped.failure == f"RuntimeError: {ASYNC_ERROR}"[:len("RuntimeError: ") + 300]
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1


def test_a_model_error_in_the_compiled_run_is_still_raised_6():
    """A RuntimeError of the model itself (a shape, out of memory) is not hidden by the fallback: the eager call
    that follows raises it again."""
    from focusfix_core.sampler import CompiledWhenNoGrad

    def broken(x, sigma, c):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (stand-in)")

    wrapped = CompiledWhenNoGrad(broken, "default", lambda probed, mode: probed)
    with torch.no_grad(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        wrapped(*_inputs())


def test_release_pinned_memory_reaches_the_host_cache_on_torch_2_11_6(monkeypatch):
    """torch 2.5-2.11 (the GPU machines' build) have no torch.accelerator.empty_host_cache: the cached pinned memory
    is then given back through torch._C._host_emptyCache, only once CUDA is initialized."""
    from focusfix_core.lora import release_pinned_memory

    calls = []
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        monkeypatch.delattr(accelerator, "empty_host_cache", raising=False)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append("host"), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    initialized = [False]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized[0])
    release_pinned_memory()
    assert calls == []  # CUDA never started: nothing was pinned, and no CUDA context is made for it
    initialized[0] = True
    release_pinned_memory()
    assert calls == ["host"]
    if accelerator is not None:  # where torch has the public call, it is the one used
        monkeypatch.setattr(accelerator, "empty_host_cache", lambda: calls.append("accelerator"), raising=False)
        release_pinned_memory()
        assert calls == ["host", "accelerator"]


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
class Shrink(nn.Module):
    """x0 = x / (1 + sigma^2): a closed-form denoiser."""

    def forward(self, x, sigma, cond):
        return x / (1 + sigma[:, None, None, None] ** 2)


def test_check_steps_refuses_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        check_steps(0, 0)
    with pytest.raises(ValueError, match="steps"):
        sample(Shrink(), torch.zeros(1, 1, 2, 2), torch.tensor([0.0]), {})


def test_check_sigmas_refuses_a_zero_before_the_last():
    """[2, 0, 0] does not increase and ends at 0, but its second step would divide by sigma 0."""
    with pytest.raises(ValueError, match="positive"):
        check_sigmas(torch.tensor([2.0, 0.0, 0.0]))


def test_checkpointed_modules_gives_back_an_instance_forward():
    """A forward someone set on the instance before is restored on exit; a class forward stays the class's."""
    plain, custom = nn.Linear(2, 2), nn.Linear(2, 2)
    own = lambda x: x * 0  # noqa: E731
    custom.forward = own
    with checkpointed_modules([plain, custom]):
        assert custom.forward is not own
    assert custom.forward is own
    assert "forward" not in plain.__dict__


def _fake_compiler(flags, static=None):
    """A stand-in for torch.compile: runs the probed call, returns (x0, the next traced flag). With `static`, every
    output is written into one buffer, as a CUDA graph's replay does."""
    flags = list(flags)

    def compiler(probed, mode):
        def run(x, sigma, cond):
            out, _ = probed(x, sigma, cond)
            if static is not None:
                buf = static.setdefault("out", torch.empty_like(out))
                buf.copy_(out)
                out = buf
            return out, flags.pop(0)

        return run

    return compiler


def test_reduce_overhead_outputs_survive_the_next_replay():
    """Under CUDA graphs ("reduce-overhead") the compiled output lives in the graph's memory: a returned x0 must not
    change when the next call replays the graph."""
    den = Shrink()
    wrapped = CompiledWhenNoGrad(den, "reduce-overhead", _fake_compiler([True, True], static={}))
    x1, x2, sigma = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 5.0), torch.tensor([1.0])
    with torch.no_grad():
        first = wrapped(x1, sigma, {})
        wrapped(x2, sigma, {})
    torch.testing.assert_close(first, den(x1, sigma, {}))


def test_scaled_linear_refuses_one_timestep():
    with pytest.raises(ValueError, match="n must be >= 2"):
        scaled_linear_alphas_cumprod(1)


def test_sigmas_from_alphas_cumprod_refuses_values_above_one():
    """abar > 1 would give sqrt of a negative (NaN sigmas)."""
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sigmas_from_alphas_cumprod(torch.tensor([0.5, 1.5]))


def test_t_to_sigma_clamps_t_to_the_training_range():
    sigmas = torch.tensor([0.1, 1.0, 10.0])
    got = t_to_sigma(torch.tensor([-1.0, 0.0, 2.0, 3.5]), sigmas)
    torch.testing.assert_close(got, torch.tensor([0.1, 0.1, 10.0, 10.0]))


def test_karras_default_rho_is_7():
    """Karras et al.'s rho = 7 (as ComfyUI and k-diffusion): the middle of 3 steps is the mean of the 7th roots."""
    s = get_sigmas_karras(3, 0.1, 10.0)
    expected = ((10.0 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
    assert float(s[1]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("lo, hi", [(10.0, 1.0), (1.0, 1.0), (0.1, math.inf)])
def test_karras_refuses_a_range_that_is_not_0_lt_min_lt_max(lo, hi):
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        get_sigmas_karras(4, lo, hi)
