"""Property tests (hypothesis) for the composite rewards in rewards/composite.py: `WeightedSum` is linear in its
weights and in its members' scores and gradients, with a heatmap that is a convex combination of theirs;
`MaskedReward`'s score and gradient depend on the pixels inside M only."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from focusfix_core.rewards.base import Reward
from focusfix_core.rewards.composite import MaskedReward, WeightedSum
from focusfix_core.rewards.image import BrightnessReward, ColorTargetReward, SharpnessReward, fit_region

FAST = settings(max_examples=40, deadline=None)


class LinearReward(Reward):
    """sum(w * I): no heatmap, a gradient that is w everywhere."""

    name = "linear"

    def __init__(self, seed: int):
        super().__init__()
        self.register_buffer("w", torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(seed)))

    def score(self, I):
        return (self.w.to(I) * I).flatten(1).mean(1)


MEMBERS = st.sampled_from([
    lambda: SharpnessReward(3), lambda: SharpnessReward(5, window=2.0), lambda: BrightnessReward(),
    lambda: BrightnessReward(0.3), lambda: ColorTargetReward((1.0, 0.0, 0.0)),
    lambda: ColorTargetReward((0.2, 0.9, 0.4)),
    lambda: LinearReward(0), lambda: LinearReward(1)])
WEIGHT = st.floats(-10, 10, allow_nan=False).map(lambda w: 0.0 if abs(w) < 1e-3 else w) | st.sampled_from([0.0, 1.0])


@st.composite
def images(draw, B=st.integers(1, 3), side=st.integers(4, 12)):
    b, h, w = draw(B), draw(side), draw(side)
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))),
                      dtype=torch.float64)


@st.composite
def terms(draw):
    ts = [(draw(MEMBERS)(), draw(WEIGHT)) for _ in range(draw(st.integers(1, 4)))]
    assume(any(w != 0 for _, w in ts))
    return ts


def _grad(fn, I):
    x = I.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


# ------------------------------------------------------------------------------------------------ WeightedSum
@FAST
@given(ts=terms(), I=images())
def test_a_weighted_sum_scores_and_differentiates_as_the_weighted_sum_of_its_members(ts, I):
    r = WeightedSum(ts)
    want = sum(w * m(I) for m, w in ts)
    torch.testing.assert_close(r(I), want)
    torch.testing.assert_close(_grad(r, I), sum(w * _grad(m, I) for m, w in ts if w != 0))


@FAST
@given(ts=terms(), I=images(), c=st.floats(-100, 100).filter(lambda c: abs(c) > 1e-3))
def test_scaling_every_weight_scales_the_score_and_its_gradient(ts, I, c):
    r, rc = WeightedSum(ts), WeightedSum([(m, c * w) for m, w in ts])
    torch.testing.assert_close(rc(I), c * r(I))
    torch.testing.assert_close(_grad(rc, I), c * _grad(r, I))


@FAST
@given(ts=terms(), I=images(), zeros=st.lists(MEMBERS, min_size=1, max_size=2), at=st.integers(0, 4))
def test_a_zero_weight_term_changes_nothing(ts, I, zeros, at):
    """A term of weight 0 is left out: the same score, gradient and heatmap as without it."""
    with_zeros = list(ts)
    for z in zeros:
        with_zeros.insert(at % (len(with_zeros) + 1), (z(), 0.0))
    a, b = WeightedSum(ts), WeightedSum(with_zeros)
    assert torch.equal(a(I), b(I)) and torch.equal(_grad(a, I), _grad(b, I))
    assert a.has_heatmap == b.has_heatmap and len(b.rewards) == len([w for _, w in ts if w != 0])
    if a.has_heatmap:
        assert torch.equal(a.heatmap(I), b.heatmap(I))


@FAST
@given(ts=terms(), I=images(), c=st.floats(1e-3, 1e3))
def test_the_heatmap_is_a_convex_combination_of_the_members_and_ignores_the_weights_scale(ts, I, c):
    r = WeightedSum(ts)
    kept = [(m, w) for m, w in ts if w != 0]
    assert r.has_heatmap == (all(m.has_heatmap for m, _ in kept) and all(w >= 0 for _, w in kept))
    if not r.has_heatmap:
        with pytest.raises(NotImplementedError, match="no heatmap"):
            r.heatmap(I)
        return
    heat = r.heatmap(I)
    members = torch.stack([m.heatmap(I) for m, _ in kept])  # (n, B, 1, H, W)
    assert heat.shape == (len(I), 1, *I.shape[-2:])
    tol = 1e-12
    assert (heat >= members.amin(0) - tol).all() and (heat <= members.amax(0) + tol).all()
    torch.testing.assert_close(WeightedSum([(m, c * w) for m, w in ts]).heatmap(I), heat)


@FAST
@given(ts=terms(), i=st.integers(0, 3), bad=st.sampled_from([math.nan, math.inf, -math.inf, "1", None, True]))
def test_a_weight_that_is_not_a_finite_number_is_refused_by_position(ts, i, bad):
    i %= len(ts)
    ts[i] = (ts[i][0], bad)
    with pytest.raises(TypeError, match=rf"^terms\[{i}\]\[1\] \(weight\) must be a finite number"):
        WeightedSum(ts)


# ------------------------------------------------------------------------------------------------ MaskedReward
@st.composite
def masks(draw, I):
    """M [1|B,1,H,W]: binary or soft, on some pixels."""
    B, _, H, W = I.shape
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    M = (torch.rand(draw(st.sampled_from([1, B])), 1, H, W, generator=g) < draw(st.floats(0, 1))).float()
    if draw(st.booleans()):
        M = M * torch.rand(M.shape, generator=g)  # soft values inside
    return M


@FAST
@given(I=images(), member=MEMBERS, data=st.data(), fill=st.floats(0, 1) | st.just("image"))
def test_a_masked_reward_sees_the_pixels_inside_m_only(I, member, data, fill):
    """Changing the pixels where M = 0 changes neither the score nor the gradient, and the gradient there is 0."""
    M = data.draw(masks(I))
    if fill == "image":
        fill = torch.rand(data.draw(st.sampled_from([1, len(I)])), 3, *I.shape[-2:], dtype=torch.float64)
    r = MaskedReward(member(), M, fill)
    out = (fit_region(M, I) == 0).expand_as(I)
    other = torch.where(out, torch.rand(I.shape, generator=torch.Generator().manual_seed(7), dtype=I.dtype), I)
    torch.testing.assert_close(r(other), r(I), rtol=0, atol=1e-12)
    g = _grad(r, I)
    assert (g[out] == 0).all()
    torch.testing.assert_close(_grad(r, other), g, rtol=0, atol=1e-12)


@FAST
@given(I=images(), member=MEMBERS, fill=st.floats(0, 1))
def test_a_full_mask_is_the_member_and_an_empty_one_a_constant(I, member, fill):
    m = member()
    full = MaskedReward(m, torch.ones(1, 1, *I.shape[-2:]), fill)
    assert torch.equal(full(I), m(I))
    empty = MaskedReward(m, torch.zeros(1, 1, 4, 4), fill)  # any size: resized to the image
    grey = torch.full_like(I, fill)
    torch.testing.assert_close(empty(I), m(grey))  # (the grey level is kept in float32)
    assert torch.equal(empty(I), empty(torch.rand_like(I))) and (_grad(empty, I) == 0).all()


@FAST
@given(I=images(), member=MEMBERS, data=st.data())
def test_a_masked_rewards_gradient_is_m_times_the_members_at_the_masked_image(I, member, data):
    M = data.draw(masks(I))
    m = member()
    r = MaskedReward(m, M, 0.5)
    Mf = fit_region(M, I)
    torch.testing.assert_close(_grad(r, I), Mf * _grad(m, r.masked_image(I)))
    if m.has_heatmap:
        heat = r.heatmap(I)
        assert heat.shape == (len(I), 1, *I.shape[-2:]) and (heat[Mf == 0] == 0).all()


@FAST
@given(I=images(B=st.integers(2, 3)), member=MEMBERS, extra=st.integers(1, 3))
def test_a_fill_image_of_another_batch_or_size_is_refused(I, member, extra):
    B, _, H, W = I.shape
    M = torch.ones(1, 1, H, W)
    for fill in (torch.rand(B + extra, 3, H, W), torch.rand(1, 3, H + extra, W)):
        with pytest.raises(ValueError, match=r"fill image must be \[1\|"):
            MaskedReward(member(), M, fill)(I)
