"""Property tests (hypothesis) for focusfix_core.denoisers on toy networks: CFGDenoiser (scale 1 is the prompt's
prediction, the result is x0_u + scale * (x0_c - x0_u) for any scale, batch order does not matter, a negative
prompt of another token length changes nothing, one batched call, or two where the lengths do not batch cheaply) and the eps / v wrappers (the true eps or v
gives x0 back; a v-network built from an eps-network gives the eps wrapper's x0)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focusfix_core.attention import AttentionStore
from focusfix_core.denoisers import CFG_PAIR, CFG_UNCOND, CFGDenoiser, EpsDenoiser, VDenoiser, batchable

FAST = settings(max_examples=40, deadline=None)
D = 4  # context width


class ToyInner:
    """x0 = tanh(x * a(sigma)) + attention(x's channel means over the context tokens): rows independent, token
    repetition leaves it unchanged (softmax over n copies of each token). Counts its calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        ctx = cond["context"]                                         # [B,T,D]
        q = x.mean((2, 3))[:, :D] if x.shape[1] >= D else x.mean((2, 3)).repeat(1, D)[:, :D]  # [B,D]
        w = torch.softmax(torch.einsum("bd,btd->bt", q, ctx), dim=1)  # [B,T]
        att = torch.einsum("bt,btd->bd", w, ctx).sum(1)               # [B]
        return torch.tanh(x * (1 + sigma)[:, None, None, None]) + att[:, None, None, None]


@st.composite
def cfg_cases(draw):
    B, C, T = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    # the negative prompt may be longer (a prompt over 75 tokens), or of a length whose least common multiple with
    # T is large (17: a style model's extra tokens, 85 beside 77), where the two halves run apart
    Tu = draw(st.sampled_from([T, 2 * T, T + 1, 17]))
    uncond_batch = draw(st.sampled_from([1, B]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(B, C, 3, 3, generator=g, dtype=dtype)
    sigma = torch.rand(B, generator=g, dtype=dtype) * 10
    cond = {"context": torch.randn(B, T, D, generator=g, dtype=dtype)}
    uncond = {"context": torch.randn(uncond_batch, Tu, D, generator=g, dtype=dtype)}
    return x, sigma, cond, uncond


def _separately(x, sigma, cond, uncond):
    """(x0_c, x0_u) from one call each, batch B, the negative prompt repeated per row."""
    inner = ToyInner()
    B = x.shape[0]
    u = uncond if uncond["context"].shape[0] == B else {"context": uncond["context"].expand(B, -1, -1)}
    return inner(x, sigma, cond), inner(x, sigma, u)


def _tol(x):
    return dict(rtol=1e-5, atol=1e-5) if x.dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@FAST
@given(case=cfg_cases())
def test_scale_1_is_the_prompts_prediction_in_one_call_without_the_negative_prompt(case):
    x, sigma, cond, uncond = case
    inner = ToyInner()
    out = CFGDenoiser(inner, uncond, 1.0)(x, sigma, cond)
    assert inner.calls == [x.shape[0]]
    assert torch.equal(out, ToyInner()(x, sigma, cond))


@FAST
@given(case=cfg_cases(), scale=st.floats(-3, 15, allow_nan=False).filter(lambda s: s != 1.0))
def test_cfg_is_the_unconditional_plus_scale_times_the_difference_in_one_batched_call(case, scale):
    x, sigma, cond, uncond = case
    inner = ToyInner()
    out = CFGDenoiser(inner, uncond, scale)(x, sigma, cond)
    T, Tu = cond["context"].shape[1], uncond["context"].shape[1]
    one = math.lcm(T, Tu) <= 4 * min(T, Tu)
    assert batchable(cond, uncond) == one
    assert inner.calls == ([2 * x.shape[0]] if one else [x.shape[0]] * 2)  # cond and uncond in one call, or apart
    c, u = _separately(x, sigma, cond, uncond)
    torch.testing.assert_close(out, u + scale * (c - u), **_tol(x))
    assert out.shape == x.shape and out.dtype == x.dtype


@FAST
@given(case=cfg_cases(), s1=st.floats(-3, 15, allow_nan=False), s2=st.floats(-3, 15, allow_nan=False))
def test_cfg_is_affine_in_the_scale(case, s1, s2):
    x, sigma, cond, uncond = case
    f = {s: CFGDenoiser(ToyInner(), uncond, s)(x, sigma, cond) for s in (0.0, s1, s2)}
    # f(s) - f(0) = s * (c - u): the same direction at every scale
    torch.testing.assert_close(s2 * (f[s1] - f[0.0]), s1 * (f[s2] - f[0.0]), **_tol(x))


@FAST
@given(case=cfg_cases(), scale=st.floats(-3, 15, allow_nan=False), data=st.data())
def test_batch_order_does_not_matter(case, scale, data):
    x, sigma, cond, uncond = case
    B = x.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(B))), dtype=torch.long)
    u_perm = uncond if uncond["context"].shape[0] == 1 else {"context": uncond["context"][perm]}
    out = CFGDenoiser(ToyInner(), uncond, scale)(x, sigma, cond)
    out_p = CFGDenoiser(ToyInner(), u_perm, scale)(x[perm], sigma[perm], {"context": cond["context"][perm]})
    torch.testing.assert_close(out_p, out[perm], **_tol(x))


@FAST
@given(case=cfg_cases(), scale=st.floats(-3, 15, allow_nan=False))
def test_the_inner_call_marks_the_pair_and_keeps_each_rows_prompt(case, scale):
    x, sigma, cond, uncond = case
    seen = {}

    def inner(xx, ss, cc):
        seen.update(x=xx, sigma=ss, cond=cc)
        return ToyInner()(xx, ss, cc)

    calls = []
    CFGDenoiser(lambda *a: calls.append(a) or inner(*a), uncond, scale if scale != 1.0 else 2.0)(x, sigma, cond)
    B = x.shape[0]
    if not batchable(cond, uncond):  # apart: the prompt's call as given, then the negative prompt's, marked
        (xc, sc, cc), (xu, su, cu) = calls
        assert torch.equal(xc, x) and torch.equal(xu, x) and torch.equal(sc, sigma) and torch.equal(su, sigma)
        assert cc is cond and cu[CFG_UNCOND].shape == (B, 0) and CFG_PAIR not in cu
        assert cu["context"].shape == (B, *uncond["context"].shape[1:])
        return
    assert len(calls) == 1 and seen["cond"][CFG_PAIR].shape == (2 * B, 0)
    assert torch.equal(seen["x"], torch.cat([x, x])) and torch.equal(seen["sigma"], torch.cat([sigma, sigma]))
    ctx = seen["cond"]["context"]
    T, n = cond["context"].shape[1], ctx.shape[1]
    assert n == math.lcm(T, uncond["context"].shape[1])
    assert torch.equal(ctx[:B], cond["context"].repeat(1, n // T, 1))  # the prompt's rows first


def test_attention_stores_keep_the_prompts_maps_when_the_halves_run_apart():
    """85 tokens beside 77 ran every CFG call on 6545 (their least common multiple); run apart, the negative
    prompt's call adds no map: the store holds the prompt's maps, as from a batched call."""
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 4, 2, 2, generator=g), torch.tensor([3.0])
    Wq, Wk = torch.randn(4, 8, generator=g), torch.randn(D, 8, generator=g)

    def inner(xx, ss, cc, store):
        q = xx.flatten(2).transpose(1, 2) @ Wq                          # [B, 4 pixels, 8]
        store.add(q, cc["context"] @ Wk, heads=2, hw=(2, 2))
        return xx * 0.5

    for T, T_neg in ((85, 77), (77, 154)):  # apart (lcm 6545), batched (lcm 154)
        cond = {"context": torch.randn(1, T, D, generator=g)}
        uncond = {"context": torch.randn(1, T_neg, D, generator=g)}
        store = AttentionStore([[[1], [2]]], resolution=2, keep_grad=False,
                               context_lengths=[cond["context"].shape[1]])
        CFGDenoiser(lambda a, b, c: inner(a, b, c, store), uncond, 7.5)(x, sigma, cond)
        alone = AttentionStore([[[1], [2]]], resolution=2, keep_grad=False)
        inner(x, sigma, cond, alone)
        assert store.n_layers == 1
        torch.testing.assert_close(store.maps(), alone.maps())


# Fixed, was BUG 8: CFGDenoiser's docstring says uncond has batch 1 or B; any other batch is not checked, and the
# error comes from deep inside the inner network (with this toy: RuntimeError "einsum(): subscript b has size 9 for
# operand 1 which does not broadcast with previously seen size 6"), not a ValueError naming `uncond` (STYLE rule 6).
# Minimal input: uncond {"context": [2,3,4]}, x [3,C,h,w], cond {"context": [3,3,4]}, scale 2.
@pytest.mark.parametrize("B, U", [(3, 2), (1, 2), (2, 4)])
def test_an_uncond_of_another_batch_is_refused_naming_it(B, U):
    den = CFGDenoiser(ToyInner(), {"context": torch.randn(U, 3, D)}, 2.0)
    with pytest.raises(ValueError, match="uncond"):
        den(torch.randn(B, 2, 3, 3), torch.ones(B), {"context": torch.randn(B, 3, D)})


# --------------------------------------------------------------------------------------------- eps / v wrappers
@st.composite
def noisy(draw):
    B, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x0 = torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor(draw(st.lists(st.floats(0, 80), min_size=B, max_size=B)), dtype=torch.float64)
    return x0, eps, sigma


SIGMAS = torch.linspace(0.03, 14.6, 50, dtype=torch.float64)


@FAST
@given(case=noisy())
def test_the_true_eps_or_v_gives_x0_back(case):
    """x = x0 + sigma * eps: an eps-network that outputs eps, and a v-network that outputs
    v = alpha * eps - s * x0 (alpha = 1/sqrt(1+sigma^2), s = sigma * alpha), both give x0."""
    x0, eps, sigma = case
    s4 = sigma[:, None, None, None]
    alpha = 1 / (1 + s4**2).sqrt()
    x = x0 + s4 * eps
    v = alpha * eps - s4 * alpha * x0
    got_eps = EpsDenoiser(lambda x_in, t, c: c["eps"], SIGMAS)(x, sigma, {"eps": eps})
    got_v = VDenoiser(lambda x_in, t, c: c["v"], SIGMAS)(x, sigma, {"v": v})
    torch.testing.assert_close(got_eps, x0, rtol=1e-9, atol=1e-9 * (1 + float(sigma.max())))
    torch.testing.assert_close(got_v, x0, rtol=1e-9, atol=1e-9 * (1 + float(sigma.max())))


@FAST
@given(case=noisy())
def test_the_networks_input_is_the_vp_scaled_x_and_a_timestep_in_range(case):
    x0, eps, sigma = case
    x = x0 + sigma[:, None, None, None] * eps
    seen = {}

    def net(x_in, t, c):
        seen.update(x_in=x_in, t=t)
        return torch.zeros_like(x_in)

    for wrapper in (EpsDenoiser, VDenoiser):
        wrapper(net, SIGMAS)(x, sigma, {})
        torch.testing.assert_close(seen["x_in"], x / (1 + sigma[:, None, None, None] ** 2).sqrt())
        assert seen["t"].shape == sigma.shape
        assert bool(((seen["t"] >= 0) & (seen["t"] <= len(SIGMAS) - 1)).all())


@FAST
@given(case=noisy(), w=st.floats(-2, 2, allow_nan=False))
def test_a_v_network_built_from_an_eps_network_gives_the_same_x0(case, w):
    """For any eps-network f, g = alpha * f - s * x0_hat with x0_hat = (x_in - s * f) / alpha is the same model
    in v-prediction (sigma passed in cond): VDenoiser(g) == EpsDenoiser(f)."""
    x0, eps, sigma = case
    x = x0 + sigma[:, None, None, None] * eps

    def f(x_in, t, c):
        return torch.tanh(w * x_in) + 0.1 * x_in

    def g(x_in, t, c):
        s4 = c["sigma"][:, None, None, None]
        alpha = 1 / (1 + s4**2).sqrt()
        e = f(x_in, t, c)
        x0_hat = (x_in - s4 * alpha * e) / alpha
        return alpha * e - s4 * alpha * x0_hat

    a = EpsDenoiser(f, SIGMAS)(x, sigma, {"sigma": sigma})
    b = VDenoiser(g, SIGMAS)(x, sigma, {"sigma": sigma})
    torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-7 * (1 + float(sigma.max()) ** 2))


@FAST
@given(case=noisy(), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_the_wrappers_keep_the_latents_dtype(case, dtype):
    x0, eps, sigma = case
    x = (x0 + sigma[:, None, None, None] * eps).to(dtype)
    for wrapper in (EpsDenoiser, VDenoiser):
        out = wrapper(lambda x_in, t, c: torch.zeros_like(x_in), SIGMAS.float())(x, sigma.float(), {})
        assert out.dtype == dtype and out.shape == x.shape
