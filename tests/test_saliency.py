"""Tests for focusfix_core.saliency: gradient saliency, heatmap -> mask, mask checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from focusfix_core.rewards.base import Reward
from focusfix_core.saliency import (
    THRESHOLD_MODES,
    check_mask,
    gradient_saliency,
    heatmap_to_mask,
    mask_coverage,
    mask_from_reward,
    score_and_saliency,
)

SQ = (slice(4, 12), slice(2, 10))  # the square the reward looks at, in a 16x16 image


class SquareRed(Reward):
    """Depends (almost) only on the red channel inside SQ; has a parameter to check no .grad leaks."""

    name = "square_red"

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(4.0))

    def score(self, I):
        red = I[:, 0, SQ[0], SQ[1]].mean((1, 2))
        return torch.sigmoid(self.gain * red) + 0.01 * I.mean((1, 2, 3))


class HeatReward(SquareRed):
    """Same, with a heatmap at half resolution that marks the square."""

    has_heatmap = True

    def heatmap(self, I):
        H = torch.zeros(I.shape[0], 1, I.shape[2] // 2, I.shape[3] // 2)
        H[:, :, 2:6, 1:5] = 1.0
        return H


def _square(B=1, H=16, W=16, dtype=torch.float32):
    """M: [B,1,H,W], 1 on SQ."""
    M = torch.zeros(B, 1, H, W, dtype=dtype)
    M[..., SQ[0], SQ[1]] = 1
    return M


# ---------------------------------------------------------------- gradient_saliency
@pytest.mark.parametrize("method", ["grad", "smoothgrad", "grad_x_input"])
def test_saliency_mass_in_square(method):
    reward = SquareRed()
    I = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    S = gradient_saliency(reward, I, method=method, n_samples=4, generator=torch.Generator().manual_seed(1))
    assert S.shape == (2, 1, 16, 16) and (S >= 0).all() and not S.requires_grad
    inside = (S * _square()).flatten(1).sum(1) / S.flatten(1).sum(1)
    assert (inside >= 0.9).all(), inside
    assert reward.gain.grad is None


def test_saliency_under_no_grad_and_inference_mode():
    reward, I = SquareRed(), torch.rand(1, 3, 16, 16)
    ref = gradient_saliency(reward, I)
    with torch.no_grad():
        torch.testing.assert_close(gradient_saliency(reward, I), ref)
    with torch.inference_mode():
        I_inf = I.clone()
        torch.testing.assert_close(gradient_saliency(reward, I_inf), ref)


def test_smoothgrad_generator_reproducible():
    reward, I = SquareRed(), torch.rand(1, 3, 16, 16)
    a, b = (gradient_saliency(reward, I, "smoothgrad", 3, 0.2, torch.Generator().manual_seed(7)) for _ in range(2))
    torch.testing.assert_close(a, b)


def test_saliency_errors():
    with pytest.raises(ValueError, match="grad_x_input"):
        gradient_saliency(SquareRed(), torch.rand(1, 3, 8, 8), method="integrated")
    with pytest.raises(TypeError, match="images I"):
        gradient_saliency(SquareRed(), None)
    with pytest.raises(ValueError, match=r"scores \[B\]"):
        gradient_saliency(lambda x: x.sum(), torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------- heatmap_to_mask
@pytest.mark.parametrize("mode", THRESHOLD_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_shape_dtype_range(mode, dtype):
    H = _square(2, dtype=dtype) * 3 + 0.1 * torch.rand(2, 1, 16, 16, dtype=dtype)
    for heat in (H, H[:, 0]):  # [B,1,H,W] or [B,H,W] in, [B,1,H,W] out
        M = heatmap_to_mask(heat, blur_sigma=1.0, threshold_mode=mode, threshold=0.25, feather=1.0)
        assert M.shape == (2, 1, 16, 16) and M.dtype == dtype
        assert M.min() >= 0 and M.max() <= 1 and torch.isfinite(M).all()


@pytest.mark.parametrize("mode", THRESHOLD_MODES)
def test_mask_constant_heatmap_is_empty(mode):
    for value in (0.0, 2.5):
        M = heatmap_to_mask(torch.full((1, 8, 8), value), threshold_mode=mode, threshold=0.3)
        assert torch.equal(M, torch.zeros(1, 1, 8, 8))


def test_mask_value_recovers_square():
    M = heatmap_to_mask(_square() * 5, blur_sigma=0.0, threshold=0.5)
    torch.testing.assert_close(M, _square())


def test_mask_otsu_bimodal():
    g = torch.Generator().manual_seed(3)
    H = 0.2 + 0.05 * torch.randn(2, 1, 16, 16, generator=g)  # background mode
    H = torch.where(_square(2).bool(), 0.8 + 0.05 * torch.randn(2, 1, 16, 16, generator=g), H).clamp_min(0)
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="otsu")
    torch.testing.assert_close(M, _square(2))


def test_mask_top_percent_fraction():
    H = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(4))
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="top_percent", threshold=0.1)
    torch.testing.assert_close(mask_coverage(M), torch.full((2,), 0.1), atol=0.01, rtol=0)
    sparse = torch.zeros(1, 10, 10)
    sparse[0, 0, 0] = 1  # 99 tied zeros must not enter a 50% mask
    assert heatmap_to_mask(sparse, 0.0, "top_percent", 0.5).sum() == 1
    assert heatmap_to_mask(sparse, 0.0, "top_percent", 1.0).sum() == 100


def test_mask_dilation_grows_and_feather_softens():
    H = torch.zeros(1, 16, 16)
    H[0, 8, 8] = 1
    base = heatmap_to_mask(H, blur_sigma=0.0)
    grown = heatmap_to_mask(H, blur_sigma=0.0, dilation=2)
    assert base.sum() == 1 and grown.sum() == 13  # a disk of radius 2
    assert (grown >= base).all()
    soft = heatmap_to_mask(H, blur_sigma=0.0, dilation=2, feather=1.0)
    assert ((soft > 0) & (soft < 1)).any() and soft.max() <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold_mode="mean"), "value.*top_percent.*otsu"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold_mode="top_percent", threshold=0.0), "threshold"),
        (dict(dilation=-1), "dilation"),
    ],
)
def test_mask_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        heatmap_to_mask(torch.rand(1, 8, 8), **kwargs)


def test_mask_negative_heatmap():
    with pytest.raises(ValueError, match="heatmap H"):
        heatmap_to_mask(-torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="heatmap H"):
        heatmap_to_mask(torch.rand(1, 2, 8, 8))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(THRESHOLD_MODES), st.floats(0.05, 1.0), st.integers(0, 2), st.integers(0, 2**16))
def test_mask_property_binary_and_in_range(mode, threshold, dilation, seed):
    H = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(seed))
    M = heatmap_to_mask(H, blur_sigma=1.0, threshold_mode=mode, threshold=threshold, dilation=dilation)
    assert ((M == 0) | (M == 1)).all()  # no feather: binary


# ---------------------------------------------------------------- mask_from_reward
def test_mask_from_reward_sources():
    I = torch.rand(1, 3, 16, 16) * 0.8 + 0.1
    from_heat = mask_from_reward(HeatReward(), I, blur_sigma=0.0)  # auto: heatmap, resized to 16x16
    torch.testing.assert_close(from_heat, _square())
    from_grad = mask_from_reward(SquareRed(), I, blur_sigma=0.0, threshold=0.2)  # auto: saliency
    assert (from_grad * (1 - _square())).sum() == 0 and from_grad.sum() > 0
    forced = mask_from_reward(HeatReward(), I, mask_source="saliency", blur_sigma=0.0, threshold=0.2)
    torch.testing.assert_close(forced, from_grad)
    with pytest.raises(ValueError, match="mask_source='heatmap' but reward .* has no heatmap: use mask_source="):
        mask_from_reward(SquareRed(), I, mask_source="heatmap")
    with pytest.raises(ValueError, match="mask_source must be one of"):
        mask_from_reward(SquareRed(), I, mask_source="clip")
    with pytest.raises(ValueError, match="saliency_method must be one of"):
        mask_from_reward(SquareRed(), I, saliency_method="integrated")
    # saliency_method reaches gradient_saliency: |dr/dI * I| drops the square's darkest red pixels
    x_input = mask_from_reward(SquareRed(), I, saliency_method="grad_x_input", blur_sigma=0.0, threshold=0.2)
    assert (x_input * (1 - _square())).sum() == 0 and 0 < x_input.sum() < from_grad.sum()


# ---------------------------------------------------------------- coverage / warnings
def test_coverage_and_warnings():
    M = torch.stack([torch.zeros(8, 8), torch.ones(8, 8), _square(1, 8, 8)[0, 0] * 0.7])
    M[2, 0, 0] = float("nan")
    cov = mask_coverage(M[:, None])
    assert torch.isfinite(cov).all()
    torch.testing.assert_close(cov[:2], torch.tensor([0.0, 1.0]))
    w = check_mask(M, name="M(I0)")
    assert any("M(I0)[0]" in s and "the whole image is held fixed" in s for s in w)
    assert any("M(I0)[1]" in s and "plain DRaFT" in s for s in w)
    assert any("M(I0)[2]" in s and "NaN" in s for s in w)
    assert check_mask(_square()) == []
    assert mask_coverage(torch.zeros(2, 0, 0)).tolist() == [0.0, 0.0]


def test_check_mask_warns_of_the_kinds_asked_for():
    """The trainer refuses only empty and non-finite painted masks: it asks for those kinds (it matched the
    messages' words before, which a rewording would have silently broken: review health-6)."""
    M = torch.stack([torch.zeros(4, 4), torch.ones(4, 4), torch.full((4, 4), 0.3), torch.full((4, 4), float("nan"))])
    assert [w.split(" ")[1] for w in check_mask(M, "M")] == ["is", "is", "is", "has"]
    assert check_mask(M, "M", kinds=("nonfinite", "empty")) == [
        "M[0] is empty (every value 0): the whole image is held fixed", "M[3] has NaN or inf values"]
    assert [w[:4] for w in check_mask(M, "M", kinds=("full", "faint"))] == ["M[1]", "M[2]"]
    with pytest.raises(ValueError, match=r"kinds must be among .*got \['epmty'\]"):
        check_mask(M, kinds=("epmty",))


def test_tiny_magnitude_heatmap_still_gives_a_mask():
    """Regression: saliency of a big random reward is ~1e-7 everywhere; it must not count as constant."""
    H = torch.zeros(1, 32, 32)
    H[0, 8:16, 8:16] = 3e-7
    H = H + 1e-9
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="top_percent", threshold=0.1)
    assert M.sum() > 0 and M[0, 0, 8:16, 8:16].mean() > 0.9


# ---------------------------------------------------------------- bad images are named as images (review std, 10)
@pytest.mark.parametrize("I, match", [(torch.full((1, 3, 16, 16), float("nan")), "images I must be finite"),
                                      (torch.rand(0, 3, 16, 16), "images I must hold at least one image")])
def test_bad_images_are_blamed_on_the_images_review10(I, match):
    """A NaN image was reported as "heatmap H must be finite" (an internal map); an empty batch was an IndexError."""
    with pytest.raises(ValueError, match=match):
        gradient_saliency(SquareRed(), I)
    for reward in (SquareRed(), HeatReward()):
        with pytest.raises(ValueError, match=match):
            mask_from_reward(reward, I, threshold_mode="top_percent", threshold=0.15)


def test_a_nonfinite_map_from_finite_images_names_the_reward_review10():
    class NaNHeat(HeatReward):
        name = "nan_heat"

        def heatmap(self, I):
            return torch.full((I.shape[0], 1, 8, 8), float("nan"))

    with pytest.raises(ValueError, match="reward 'nan_heat' gave a non-finite heatmap"):
        mask_from_reward(NaNHeat(), torch.rand(1, 3, 16, 16))


def test_heatmap_errors_say_which_check_failed_and_empty_batch_review10():
    with pytest.raises(ValueError, match="heatmap H must be finite, got NaN"):
        heatmap_to_mask(torch.full((1, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="heatmap H must be >= 0, got a minimum of -1"):
        heatmap_to_mask(-torch.ones(1, 8, 8))
    for mode in THRESHOLD_MODES:  # top_percent read H[0]: IndexError; otsu (kornia 0.8) and dilation's FFT failed
        for dilation, feather in ((0, 0.0), (3, 2.0)):
            M = heatmap_to_mask(torch.rand(0, 8, 8), threshold_mode=mode, threshold=0.2, dilation=dilation,
                                feather=feather)
            assert M.shape == (0, 1, 8, 8) and M.dtype == torch.float32


# ---------------------------------------------------------------- review: mutation-testing gaps M1, M2, M4, M7, M8, M9
def test_mask_blur_of_one_pixel_is_the_gaussian_disk():
    """A one-pixel heatmap blurred with sigma 2 and normalised to its peak is exp(-r^2 / (2 sigma^2)) (kornia's
    kernel is that Gaussian, normalised, and the constant cancels in the min-max; the pixel sits 16 px from every
    edge, beyond the 13-tap kernel's reach of 6, so neither the kernel size nor the reflect border matters).
    Value 0.5 keeps r^2 <= 8 ln 2 = 5.55: r^2 in {0, 1, 2, 4, 5}, 1 + 4 + 4 + 4 + 8 = 21 pixels.
    (No blur would keep 1 pixel; sigma 1 would keep 5.)"""
    H = torch.zeros(1, 32, 32)
    H[0, 16, 16] = 1.0
    M = heatmap_to_mask(H, blur_sigma=2.0, threshold_mode="value", threshold=0.5)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disk = (((yy - 16) ** 2 + (xx - 16) ** 2) <= 8 * torch.log(torch.tensor(2.0))).float()
    assert int(disk.sum()) == 21 and int(M.sum()) == 21
    assert torch.equal(M[0, 0], disk)


@pytest.mark.parametrize("fraction, keep", [(0.1, 40), (0.123, 50), (0.0025, 1)])
def test_mask_top_percent_keeps_exactly_ceil_of_the_fraction(fraction, keep):
    """Tie-free values (a permutation of 0..399): exactly ceil(fraction * 400) pixels, the largest ones."""
    H = torch.randperm(400, generator=torch.Generator().manual_seed(5)).float().view(1, 1, 20, 20)
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="top_percent", threshold=fraction)
    assert int(M.sum()) == keep
    assert torch.equal(M.bool(), H >= 400 - keep)


def test_mask_value_threshold_keeps_a_pixel_exactly_at_it():
    """The docs say "value" keeps H >= threshold: a pixel that normalises to exactly the threshold is in."""
    H = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 3.0, 0.0]]])  # normalised: 0, 0.5, 1 / 0.25, 0.75, 0 (exact)
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="value", threshold=0.5)
    assert M.tolist() == [[[[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]]]
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="value", threshold=0.25)
    assert M.tolist() == [[[[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]]]


class _RedSquared(nn.Module):
    """r(I) = sum of red^2: dr/dI_red = 2 I_red depends on I, so noise changes the gradient."""

    def forward(self, I):
        return I[:, 0].square().sum((1, 2))


def test_smoothgrad_is_the_mean_grad_at_noisy_copies():
    reward = _RedSquared()
    I = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grad = gradient_saliency(reward, I, "grad")
    torch.testing.assert_close(grad, 2 * I[:, :1])
    no_noise = gradient_saliency(reward, I, "smoothgrad", n_samples=3, noise_std=0.0,
                                 generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(no_noise, grad)
    S = gradient_saliency(reward, I, "smoothgrad", n_samples=4, noise_std=0.3,
                          generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the same draws: one randn(I.shape) per copy
    ref = sum((2 * (I + 0.3 * torch.randn(I.shape, generator=g))[:, :1]).abs() for _ in range(4)) / 4
    torch.testing.assert_close(S, ref)
    assert (S - grad).abs().max() > 0.1


def test_grad_x_input_is_weight_times_the_red_channel():
    """r(I) = sum w * I_red, linear: grad is |w| everywhere, grad x input is |w| * I_red (I >= 0)."""
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))

    class Linear(nn.Module):
        def forward(self, I):
            return (w * I[:, 0]).sum((1, 2))

    I = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gradient_saliency(Linear(), I, "grad"), w.abs().expand(2, 1, 8, 8))
    gxi = gradient_saliency(Linear(), I, "grad_x_input")
    torch.testing.assert_close(gxi, w.abs() * I[:, :1])
    assert (gxi - w.abs()).abs().max() > 0.1


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24), radius=st.integers(0, 7), density=st.floats(0.0, 0.3),
       seed=st.integers(0, 2**16))
def test_dilate_equals_kornias_exact_dilation(h, w, radius, density, seed):
    """The FFT dilation (memory O(HW) at any radius) gives what kornia's exact `unfold` engine gives with the same
    disk (fine at these sizes; on a GPU it would unfold (2r+1)^2 values per pixel: fuzz review, 257 GiB at
    r = 256)."""
    import kornia

    from focusfix_core.saliency import _disk, dilate
    M = (torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(seed)) < density).float()
    want = M if radius == 0 else kornia.morphology.dilation(M, _disk(radius, M.device, M.dtype), engine="unfold")
    assert torch.equal(dilate(M, radius), want)


def test_dilate_a_radius_beyond_the_image_fills_it_and_stays_small():
    from focusfix_core.saliency import dilate
    M = torch.zeros(2, 1, 40, 30)
    M[0, 0, 0, 0] = 1
    out = dilate(M, 10**6)  # clamped to the image's diagonal, not a 2e6-wide disk
    assert out[0].eq(1).all() and out[1].eq(0).all()


def test_score_and_saliency_is_the_score_and_grad_saliency_in_one_pass():
    r = SquareRed()
    with torch.inference_mode():  # as ComfyUI hands images over
        I = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scores, S = score_and_saliency(r, I)
    with torch.no_grad():
        torch.testing.assert_close(scores, r(I.clone()))
    torch.testing.assert_close(S, gradient_saliency(r, I))
    assert not scores.requires_grad and not S.requires_grad and r.gain.grad is None


def test_otsu_on_a_kornia_without_it_says_which_version_it_needs(monkeypatch):
    """kornia before 0.8.2 has no otsu_threshold; ComfyUI asks only for 0.7.1, and an installer may keep it:
    the mode is refused naming both versions and the other modes (it was an AttributeError from kornia)."""
    import kornia
    monkeypatch.delattr(kornia.filters, "otsu_threshold")
    monkeypatch.setattr(kornia, "__version__", "0.7.1")
    with pytest.raises(ValueError, match=r"threshold_mode 'otsu' needs kornia 0\.8\.2 or newer, this Python has "
                                         r"kornia 0\.7\.1: update it .* or choose 'value' or 'top_percent'"):
        heatmap_to_mask(torch.rand(1, 8, 8), threshold_mode="otsu")
    assert heatmap_to_mask(torch.rand(1, 8, 8), threshold_mode="value", threshold=0.5).shape == (1, 1, 8, 8)


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
class RedMinusGreen(nn.Module):
    """Gradients of opposite sign in two channels: 1/(HW) on red, -1/(HW) on green."""

    def forward(self, I):
        return (I[:, 0] - I[:, 1]).mean((1, 2))


class SignedHeatmap(nn.Module):
    """A reward whose heatmap is negative off a 4x4 square (a signed artifact map)."""

    has_heatmap = True
    name = "signed"

    def forward(self, I):
        return I.mean((1, 2, 3))

    def heatmap(self, I):
        H = torch.full_like(I[:, :1], -0.5)
        H[..., 2:6, 2:6] = 1.0
        return H


def _square8(size=8, lo=2, hi=6):
    M = torch.zeros(1, 1, size, size)
    M[..., lo:hi, lo:hi] = 1
    return M


def test_score_and_saliency_sums_absolute_gradients_over_channels():
    """|dr/dred| + |dr/dgreen| = 1/4 + 1/4 per pixel of a 2x2 image, not |1/4 - 1/4| = 0; the same map as
    gradient_saliency's "grad"."""
    I = torch.full((1, 3, 2, 2), 0.5)
    scores, S = score_and_saliency(RedMinusGreen(), I)
    assert scores.tolist() == [0.0]
    torch.testing.assert_close(S, torch.full((1, 1, 2, 2), 0.5))
    torch.testing.assert_close(S, gradient_saliency(RedMinusGreen(), I, method="grad"))


def test_smoothgrad_refuses_zero_samples():
    """The average of no noisy copies is 0/0: refused, naming n_samples."""
    with pytest.raises(ValueError, match="n_samples"):
        gradient_saliency(RedMinusGreen(), torch.rand(1, 3, 4, 4), method="smoothgrad", n_samples=0)


def test_heatmap_threshold_is_relative_to_each_maps_minimum_and_peak():
    """Min-max normalisation: a heatmap of 1 with a square of 2 thresholds at 1.5 (the square), not at 0.5 * 2."""
    H = torch.ones(1, 8, 8)
    H[0, 2:6, 2:6] = 2.0
    assert torch.equal(heatmap_to_mask(H, blur_sigma=0, threshold_mode="value", threshold=0.5), _square8())


def test_feather_kernel_reaches_three_sigma():
    """Feathering a lone on pixel with sigma 1 gives the separable Gaussian of size 2 * ceil(3 sigma) + 1 = 7,
    normalised over its window: the row through the pixel is g(0) g(d), nonzero out to d = 3."""
    H = torch.zeros(1, 15, 15)
    H[0, 7, 7] = 1.0
    M = heatmap_to_mask(H, blur_sigma=0, threshold=0.5, feather=1.0)
    g = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / 2)
    g = g / g.sum()
    torch.testing.assert_close(M[0, 0, 7, 4:11], g[3] * g)
    assert M[0, 0, 7, 3] == 0 and M[0, 0, 7, 11] == 0


def test_mask_from_reward_clamps_a_signed_heatmap():
    """A reward's heatmap below 0 reads as 0 (no change there): mask_from_reward gives the square, where
    heatmap_to_mask alone refuses a negative map."""
    M = mask_from_reward(SignedHeatmap(), torch.rand(1, 3, 8, 8), "heatmap", blur_sigma=0)
    assert torch.equal(M, _square8())


def test_check_mask_says_full_only_when_every_pixel_may_change():
    M = torch.ones(1, 4, 4)
    M[0, 0] = 0  # coverage 0.75
    assert check_mask(M) == []
    assert check_mask(torch.ones(1, 4, 4)) == [
        "mask M[0] is full (every value 1): nothing is held: Focus-N-Fix becomes plain DRaFT"]


def test_check_mask_judges_a_soft_mask_by_its_values_not_by_a_half_threshold():
    """Bad-input hunt (session 27): a feathered Saliency Mask peaking at 0.44 was called empty ("coverage 0: the
    whole image is held fixed") and a 0.5-everywhere mask full ("nothing is held"), but the region term weighs each
    pixel by 1 - M: both change in part, and say so."""
    faint = torch.zeros(1, 8, 8)
    faint[0, 2:6, 2:6] = 0.44
    assert check_mask(faint) == ["mask M[0] is faint (at most 0.44): even its strongest pixel is held 56% to I0, so "
                                 "the region changes only in part (a wide feather on a small region, or a light "
                                 "brush?)"]
    assert check_mask(torch.full((1, 8, 8), 0.5)) == []  # half held everywhere: neither empty nor full
    assert check_mask(torch.full((1, 8, 8), 0.9 / 255))[0].startswith("mask M[0] is faint (at most 0.00353)")
    assert check_mask(torch.full((1, 8, 8), 0.4 / 255)) == [  # under half an 8-bit level: a painted 0
        "mask M[0] is empty (every value 0): the whole image is held fixed"]
    assert check_mask(torch.full((1, 8, 8), 1 - 0.4 / 255))[0].startswith("mask M[0] is full")
    nan = torch.zeros(1, 8, 8)
    nan[0, 0, 0] = float("nan")  # named once, for its NaN, not also as empty
    assert check_mask(nan) == ["mask M[0] has NaN or inf values"]
    assert check_mask(torch.zeros(2, 0, 0)) == [f"mask M[{b}] is empty (every value 0): the whole image is held fixed"
                                                for b in range(2)]
