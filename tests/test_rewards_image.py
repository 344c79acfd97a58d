"""Weight-free image rewards and composites: shapes, properties, gradients, errors."""
import kornia
import pytest
import torch

from focusfix_core.rewards import (
    BUILTIN_REWARDS,
    BrightnessReward,
    ColorTargetReward,
    MaskedReward,
    Reward,
    SharpnessReward,
    WeightedSum,
)
from focusfix_core.losses import NonFiniteScoreError
from focusfix_core.rewards.image import fit_region



def images(B=2, H=16, W=16, seed=0, dtype=torch.float32):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class _NoHeatmap(Reward):
    name = "no_heatmap"

    def score(self, I):
        return I.mean(dim=(1, 2, 3))


ALL = [SharpnessReward(), ColorTargetReward((1.0, 0.0, 0.0)), BrightnessReward(), BrightnessReward(target=0.4),
       ColorTargetReward((0.0, 0.0, 1.0), region=torch.ones(1, 1, 4, 4))]


@pytest.mark.parametrize("reward", ALL, ids=lambda r: r.name)
def test_shapes_and_heatmap(reward):
    I = images()
    assert reward(I).shape == (2,)
    h = reward.heatmap(I)
    assert reward.has_heatmap and h.shape == (2, 1, 16, 16) and (h >= 0).all()


@pytest.mark.parametrize("reward", ALL, ids=lambda r: r.name)
def test_gradcheck(reward):
    I = images(1, 6, 6, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_(True)
    r = reward.double()
    assert torch.autograd.gradcheck(lambda I: r(I), (I,))
    assert torch.autograd.gradcheck(lambda I: r.heatmap(I), (I,), atol=1e-5)


def test_sharpness_prefers_sharp_and_heatmap_marks_blur():
    I = images(1, 32, 32)
    blurred = kornia.filters.gaussian_blur2d(I, (7, 7), (2.0, 2.0))
    r = SharpnessReward()
    assert r(I) > r(blurred)
    half = torch.cat([I[..., :16], blurred[..., 16:]], dim=-1)  # left sharp, right blurred
    h = r.heatmap(half)
    assert h[..., 4:28, 20:28].mean() > h[..., 4:28, 4:12].mean()


def test_color_target():
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    r = ColorTargetReward((1.0, 0.0, 0.0))
    assert r(red).item() == pytest.approx(0.0, abs=1e-5)
    assert r.heatmap(red).max() < 1e-5
    blue = red.roll(2, dims=1)
    assert r(blue).item() == pytest.approx(-(2**0.5) / 3**0.5, abs=1e-5)


def test_color_target_region_only_scores_region():
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1  # top half, at a lower resolution than the images
    r = ColorTargetReward((0.0, 1.0, 0.0), region=region)
    I = images(2, 16, 16).requires_grad_(True)
    r(I).sum().backward()
    # bilinear 4 -> 16: rows < 8 are fully in the region, rows >= 10 fully out
    assert I.grad[..., 10:, :].abs().max() == 0 and I.grad[..., :8, :].abs().min() > 0
    assert r.heatmap(I.detach())[..., 10:, :].max() == 0


def test_brightness():
    dark, light = torch.full((1, 3, 4, 4), 0.2), torch.full((1, 3, 4, 4), 0.7)
    assert BrightnessReward()(light) > BrightnessReward()(dark)
    assert BrightnessReward(target=0.25)(dark) > BrightnessReward(target=0.25)(light)


def test_image_reward_errors():
    with pytest.raises(ValueError, match="rgb must be three values in \\[0,1\\]"):
        ColorTargetReward((2.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="region must be None or a mask"):
        ColorTargetReward((1.0, 0.0, 0.0), region=torch.ones(4, 4))
    with pytest.raises(ValueError, match="region must be \\[1\\|2,1,h,w\\]"):
        ColorTargetReward((1.0, 0.0, 0.0), region=torch.ones(3, 1, 4, 4))(images())
    with pytest.raises(ValueError, match="target"):
        BrightnessReward(target=1.5)
    with pytest.raises(ValueError, match="kernel_size"):
        SharpnessReward(kernel_size=4)


def test_weighted_sum():
    a, b = SharpnessReward(), BrightnessReward()
    I = images()
    r = WeightedSum([(a, 2.0), (b, 0.5)])
    torch.testing.assert_close(r(I), 2 * a(I) + 0.5 * b(I))
    assert r.has_heatmap
    torch.testing.assert_close(r.heatmap(I), (2 * a.heatmap(I) + 0.5 * b.heatmap(I)) / 2.5)
    assert not WeightedSum([(a, 1.0), (b, -1.0)]).has_heatmap  # negative weight flips "bad"
    no_h = WeightedSum([(a, 1.0), (_NoHeatmap(), 1.0)])
    assert not no_h.has_heatmap
    with pytest.raises(NotImplementedError, match="gradient saliency"):
        no_h.heatmap(I)
    assert r.describe()["terms"][1][1] == 0.5


def test_weighted_sum_errors():
    with pytest.raises(ValueError, match="non-empty"):
        WeightedSum([])
    with pytest.raises(TypeError, match="terms\\[0\\]\\[0\\] must be a Reward"):
        WeightedSum([(lambda I: I, 1.0)])
    with pytest.raises(TypeError, match="weight"):
        WeightedSum([(SharpnessReward(), float("nan"))])
    with pytest.raises(TypeError, match="terms must be a list"):
        WeightedSum(SharpnessReward())


def test_weighted_sum_refuses_all_zero_weights_and_leaves_out_a_zero_term():
    """All weights 0 would score every image 0 (no gradient, an empty mask); a 0-weight term is never run."""
    with pytest.raises(ValueError, match="weights must not all be 0, got \\[0.0, 0\\]"):
        WeightedSum([(SharpnessReward(), 0.0), (BrightnessReward(), 0)])
    never_run = _NoHeatmap()
    never_run.score = None  # calling it would fail
    r = WeightedSum([(SharpnessReward(), 2.0), (never_run, 0.0)])
    I = images()
    torch.testing.assert_close(r(I), 2 * SharpnessReward()(I))
    assert r.weights == [2.0] and len(r.rewards) == 1 and r.has_heatmap  # the left-out term has no say
    assert [t[1] for t in r.describe()["terms"]] == [2.0]


def test_masked_reward_only_sees_region():
    M = torch.zeros(1, 1, 8, 8)
    M[..., 2:6, 2:6] = 1
    r = MaskedReward(SharpnessReward(), M)  # 8x8 mask on 16x16 images: resized
    I = images(2, 16, 16).requires_grad_(True)
    r(I).sum().backward()
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[3:13, 3:13] = False
    assert I.grad[..., outside].abs().max() == 0 and I.grad.abs().sum() > 0
    assert r.has_heatmap and r.heatmap(I.detach())[..., outside].max() == 0


def test_masked_reward_fill_image():
    I0 = images(1, 16, 16, seed=3)
    M = torch.zeros(1, 1, 16, 16)
    r = MaskedReward(BrightnessReward(), M, fill=I0)  # empty region: the reward sees I0 only
    torch.testing.assert_close(r(images(2, 16, 16)), BrightnessReward()(I0).expand(2))
    with pytest.raises(ValueError, match="fill image must be"):
        r(images(2, 8, 8))
    assert not MaskedReward(_NoHeatmap(), M).has_heatmap


def test_masked_reward_errors():
    with pytest.raises(ValueError, match="mask M must be"):
        MaskedReward(SharpnessReward(), torch.ones(16, 16))
    with pytest.raises(ValueError, match="fill must be"):
        MaskedReward(SharpnessReward(), torch.ones(1, 1, 4, 4), fill=2.0)
    with pytest.raises(TypeError, match="reward must be a Reward"):
        MaskedReward(None, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="mask M must be \\[1\\|2,1,h,w\\]"):
        MaskedReward(SharpnessReward(), torch.ones(3, 1, 4, 4))(images())


@pytest.mark.parametrize("name", sorted(BUILTIN_REWARDS))
def test_builtins(name):
    r = BUILTIN_REWARDS[name]()
    I = images().requires_grad_(True)
    s = r(I)
    s.sum().backward()
    assert isinstance(r, Reward) and r.name == name and s.shape == (2,) and I.grad.abs().sum() > 0


# (the rewards modules' doctests run in test_doctests.py, with every other core module's)


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def impulse(side: int, at: int) -> torch.Tensor:
    """A black [1,3,side,side] image with one white pixel at (at, at)."""
    I = torch.zeros(1, 3, side, side)
    I[..., at, at] = 1.0
    return I


def test_sharpness_is_the_unbiased_variance_of_the_unnormalised_3x3_laplacian():
    # luma 1 at the centre of 5x5: Laplacian -8 there, 1 at its 8 neighbours, 0 at the 16 others (mean 0);
    # var (correction 1) = (64 + 8) / 24 = 3. (mean of squares: 72/25; a normalised kernel: 3/256)
    assert SharpnessReward()(impulse(5, 2)).item() == pytest.approx(3.0, rel=1e-6)


def test_sharpness_heatmap_blurs_the_energy_over_three_sigma_of_the_window():
    # the Laplacian energy of an impulse is non-zero within 1 px of it; blurred with sigma 1 (radius 3 sigma) it
    # reaches 4 px away: the map drops below 1 there. Without the blur, or a blur cut at 1 sigma, it stays 1.
    h = SharpnessReward(window=1.0).heatmap(impulse(16, 8))[0, 0, 8]
    assert h[5].item() == pytest.approx(0.63301, abs=1e-4) and h[4] < 0.99 and h[3] == 1.0
    torch.testing.assert_close(h[5:8], h[9:12].flip(0))  # symmetric about the impulse


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan")])
def test_sharpness_refuses_a_window_that_is_not_positive(window):
    with pytest.raises(ValueError, match="window"):
        SharpnessReward(window=window)


def test_sharpness_refuses_kernel_sizes_other_than_3_and_5():
    for k in (1, 7):
        with pytest.raises(ValueError, match="kernel_size must be 3 or 5"):
            SharpnessReward(kernel_size=k)


@pytest.mark.parametrize("channel, luma", [(0, 0.299), (1, 0.587), (2, 0.114)])
def test_brightness_is_rec601_luma_of_rgb(channel, luma):
    I = torch.zeros(1, 3, 4, 4)
    I[:, channel] = 1.0  # pure red, green, blue
    assert BrightnessReward()(I).item() == pytest.approx(luma, abs=1e-6)


def test_brightness_with_a_target_is_minus_the_absolute_distance():
    I = torch.full((1, 3, 4, 4), 0.2)
    assert BrightnessReward(target=0.25)(I).item() == pytest.approx(-0.05, abs=1e-6)
    assert BrightnessReward(target=0.7)(I).item() == pytest.approx(-0.5, abs=1e-6)


def test_brightness_heatmap_without_target_marks_dark_pixels():
    I = torch.zeros(1, 3, 4, 4)
    I[..., 2:, :] = 1.0  # top dark, bottom white
    h = BrightnessReward().heatmap(I)[0, 0]
    torch.testing.assert_close(h, torch.cat([torch.ones(2, 4), torch.zeros(2, 4)]))


def test_colour_target_with_a_region_is_the_mean_distance_inside_the_region():
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1  # top half
    I = torch.zeros(1, 3, 4, 4)
    I[:, 2, :2, :] = 1.0  # blue in the region, black below it
    r = ColorTargetReward((1.0, 0.0, 0.0), region=region)
    # blue vs red: sqrt(2)/sqrt(3) everywhere in the region; the black half outside does not count
    assert r(I).item() == pytest.approx(-(2 / 3) ** 0.5, abs=1e-5)


def test_fit_region_resizes_bilinearly():
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1
    col = fit_region(region, torch.zeros(1, 3, 16, 16))[0, 0, :, 0]
    # align_corners=False, 4 -> 16: rows 6..9 sample between source rows 1 and 2
    torch.testing.assert_close(col[5:11], torch.tensor([1.0, 0.875, 0.625, 0.375, 0.125, 0.0]))


class _Const(Reward):
    name = "const"

    def __init__(self, values):
        super().__init__()
        self.values = values

    def score(self, I):
        return torch.tensor(self.values, dtype=I.dtype)


def test_one_non_finite_score_in_a_batch_is_refused():
    with pytest.raises(NonFiniteScoreError, match="'const' returned a non-finite score"):
        _Const([1.0, float("nan")])(torch.rand(2, 3, 8, 8))


def test_a_weighted_sum_with_a_negative_weight_has_no_heatmap_even_when_the_total_is_positive():
    r = WeightedSum([(SharpnessReward(), 2.0), (BrightnessReward(), -1.0)])
    assert not r.has_heatmap
    with pytest.raises(NotImplementedError, match="gradient saliency"):
        r.heatmap(torch.rand(1, 3, 8, 8))


def test_a_masked_rewards_fill_image_gets_no_gradient():
    I0 = torch.rand(1, 3, 8, 8, requires_grad=True)
    M = torch.zeros(1, 1, 8, 8)
    M[..., :4, :] = 1
    r = MaskedReward(BrightnessReward(), M, fill=I0)
    r(torch.rand(1, 3, 8, 8, requires_grad=True)).sum().backward()
    assert I0.grad is None and not r.fill.requires_grad
