"""Sampler: DRaFT-K truncation, determinism, DDIM against the closed form for Gaussian data."""
import math

import pytest
import torch

from focusfix_core.denoisers import CFGDenoiser
from focusfix_core.sampler import check_steps, get_sigmas, sample, seed_noise
from focusfix_core.schedules import (get_sigmas_karras, scaled_linear_alphas_cumprod, sigma_to_t,
                                     sigmas_from_alphas_cumprod, t_to_sigma)


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
    sigmas = get_sigmas(model.sigmas, 4)
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
        get_sigmas(torch.linspace(0.1, 10, 100), 0)
    with pytest.raises(ValueError, match="sigmas must end with 0"):
        sample(GaussianDenoiser(), torch.zeros(1, 1, 2, 2), torch.tensor([2.0, 1.0]), cond())


def test_schedule_roundtrip_and_sd_range():
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod())
    assert sig[0] == pytest.approx(0.0292, abs=1e-3) and sig[-1] == pytest.approx(14.61, abs=0.01)
    t = torch.tensor([0.0, 10.5, 999.0])
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, sig), sig), t, atol=1e-3, rtol=1e-4)
    s = get_sigmas(sig, 10)
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
