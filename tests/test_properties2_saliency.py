"""Property tests (hypothesis) for `saliency.heatmap_to_mask` and `mask_coverage`, beyond tests/test_saliency.py:
random heatmaps of any size (1-pixel sides included) with ties and flat areas, in every threshold mode: the mask
is an upper level set holding the peak, monotone in the threshold and the dilation, independent of the batch the
heatmap came in and of its scale."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from focusfix_core.saliency import THRESHOLD_MODES, _blur, heatmap_to_mask, mask_coverage

FAST = settings(max_examples=60, deadline=None)


@st.composite
def heatmaps(draw, B=st.integers(1, 3), side=st.integers(1, 12), dtype=st.sampled_from([torch.float32, torch.float64])):
    """[B,1,H,W] >= 0: random values, with plateaus (quantised), zero areas and sometimes a constant image."""
    b, h, w = draw(B), draw(side), draw(side)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    H = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64)
    levels = draw(st.sampled_from([0, 3, 8]))
    if levels:  # ties
        H = (H * levels).floor() / levels
    if draw(st.booleans()):  # a zero background
        H = H * (torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) < 0.4)
    if draw(st.integers(0, 5)) == 0:  # one constant image in the batch
        H[0] = draw(st.sampled_from([0.0, 0.7]))
    return (H * draw(st.sampled_from([1e-6, 1.0, 1e4]))).to(draw(dtype))


def thresholds(mode):
    return {"value": st.floats(0, 1), "top_percent": st.floats(0, 1, exclude_min=True), "otsu": st.just(0.5)}[mode]


SETTINGS = dict(blur_sigma=st.sampled_from([0.0, 0.5, 1.5, 4.0]), dilation=st.integers(0, 3),
                feather=st.sampled_from([0.0, 0.7, 2.0]))


@FAST
@given(H=heatmaps(), mode=st.sampled_from(THRESHOLD_MODES), data=st.data(), layout=st.sampled_from(["BHW", "B1HW"]))
def test_any_heatmap_gives_a_mask_of_its_size_in_0_1(H, mode, data, layout):
    kw = {k: data.draw(v) for k, v in SETTINGS.items()}
    t = data.draw(thresholds(mode))
    M = heatmap_to_mask(H[:, 0] if layout == "BHW" else H, threshold_mode=mode, threshold=t, **kw)
    assert M.shape == H.shape and M.dtype == H.dtype  # [B,1,H,W] from either layout
    assert torch.isfinite(M).all() and M.min() >= 0 and M.max() <= 1
    if kw["feather"] == 0:
        assert ((M == 0) | (M == 1)).all()
    flat = (H.flatten(1).amax(1) == H.flatten(1).amin(1))
    assert (M[flat] == 0).all()  # a constant heatmap carries no location: empty mask


@FAST
@given(H=heatmaps(), mode=st.sampled_from(THRESHOLD_MODES), data=st.data())
def test_the_mask_is_an_upper_level_set_holding_the_peak(H, mode, data):
    """Without blur, dilation or feather, every kept pixel is hotter than every pixel left out, and the hottest
    pixel of an image that is not constant is always kept."""
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode=mode, threshold=data.draw(thresholds(mode))).bool()
    for b in range(len(H)):
        h, m = H[b].flatten(), M[b].flatten()
        if h.max() == h.min():
            continue
        assert m[h.argmax()], "the peak is left out"
        if (~m).any():
            assert h[m].min() > h[~m].max()


@FAST
@given(H=heatmaps(), mode=st.sampled_from(THRESHOLD_MODES), blur=st.sampled_from([0.5, 1.5, 4.0]))
def test_the_blurred_peak_is_kept_after_any_blur(H, mode, blur):
    """The threshold is relative to each image's blurred peak, so the pixel at that peak is in the mask."""
    M = heatmap_to_mask(H, blur_sigma=blur, threshold_mode=mode, threshold=0.9 if mode == "value" else 0.01)
    Hb = _blur(H, blur)
    for b in range(len(H)):
        span = float(Hb[b].max() - Hb[b].min())
        assume(span > 1e-3 * float(Hb[b].abs().max()))  # informative (not flattened to an empty mask)
        assert M[b].flatten()[Hb[b].flatten().argmax()] == 1


@FAST
@given(H=heatmaps(), t=st.lists(st.floats(0, 1), min_size=2, max_size=2), data=st.data())
def test_a_higher_value_threshold_keeps_a_subset(H, t, data):
    kw = {k: data.draw(v) for k, v in SETTINGS.items()}
    lo, hi = sorted(t)
    M_lo = heatmap_to_mask(H, threshold_mode="value", threshold=lo, **kw)
    M_hi = heatmap_to_mask(H, threshold_mode="value", threshold=hi, **kw)
    assert (M_hi <= M_lo).all()


@FAST
@given(H=heatmaps(), t=st.lists(st.floats(0, 1, exclude_min=True), min_size=2, max_size=2), data=st.data())
def test_a_larger_top_percent_keeps_a_superset(H, t, data):
    kw = {k: data.draw(v) for k, v in SETTINGS.items()}
    lo, hi = sorted(t)
    M_lo = heatmap_to_mask(H, threshold_mode="top_percent", threshold=lo, **kw)
    M_hi = heatmap_to_mask(H, threshold_mode="top_percent", threshold=hi, **kw)
    assert (M_lo <= M_hi).all()


@FAST
@given(B=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), t=st.floats(0, 1, exclude_min=True),
       seed=st.integers(0, 2**31), zeros=st.integers(0, 20))
def test_top_percent_keeps_that_fraction_of_the_nonzero_pixels(B, h, w, t, seed, zeros):
    """Tie-free positive values: exactly ceil(t * HW) pixels (at least 1); pixels that are 0 never enter a mask below
    100%, so with many zeros only the non-zero ones are kept."""
    n = h * w
    g = torch.Generator().manual_seed(seed)
    H = torch.stack([torch.randperm(n, generator=g) for _ in range(B)]).view(B, h, w).double()  # 0..n-1 each
    H = torch.where(H < min(zeros, n - 1), torch.zeros_like(H), H)  # the lowest values set to 0
    assume(n > 1)
    M = heatmap_to_mask(H, blur_sigma=0.0, threshold_mode="top_percent", threshold=t)
    keep = min(max(math.ceil(t * n - 1e-9), 1), n)
    nonzero = (H > 0).flatten(1).sum(1)
    want = torch.minimum(torch.full_like(nonzero, keep), nonzero) if t < 1 else torch.full_like(nonzero, n)
    assert torch.equal(M.flatten(1).sum(1).long(), want)
    assert torch.equal(mask_coverage(M), want.double() / n)


@FAST
@given(H=heatmaps(), mode=st.sampled_from(THRESHOLD_MODES), data=st.data())
def test_more_dilation_only_grows_the_mask(H, mode, data):
    t = data.draw(thresholds(mode))
    blur = data.draw(SETTINGS["blur_sigma"])
    masks = [heatmap_to_mask(H, blur_sigma=blur, threshold_mode=mode, threshold=t, dilation=d) for d in range(4)]
    assert all((a <= b).all() for a, b in zip(masks, masks[1:]))


@FAST
@given(H=heatmaps(B=st.integers(2, 4)), mode=st.sampled_from(THRESHOLD_MODES), data=st.data())
def test_an_images_mask_does_not_depend_on_its_batch(H, mode, data):
    """Min-max normalisation, top_percent, Otsu, dilation and feathering work per image: a heatmap gives the same
    mask alone or in a batch. (Not with a pre-threshold blur: a convolution rounds differently per batch size and a
    cut can flip near-tied pixels, which is why the trainer and the Saliency Mask node derive masks one image at a
    time.)"""
    kw = {k: data.draw(v) for k, v in SETTINGS.items()}
    kw["blur_sigma"] = 0.0
    t = data.draw(thresholds(mode))
    M = heatmap_to_mask(H, threshold_mode=mode, threshold=t, **kw)
    for b in range(len(H)):
        torch.testing.assert_close(heatmap_to_mask(H[b:b + 1], threshold_mode=mode, threshold=t, **kw)[0], M[b],
                                   rtol=0, atol=1e-6)


@FAST
@given(H=heatmaps(), mode=st.sampled_from(THRESHOLD_MODES), k=st.integers(-20, 20), data=st.data())
def test_the_mask_does_not_depend_on_the_heatmaps_scale(H, mode, k, data):
    """Each heatmap is normalised to its own peak: scaling it (by a power of 2, exact in floating point) leaves
    the mask as it was, so a reward's units do not matter."""
    kw = {k_: data.draw(v) for k_, v in SETTINGS.items()}
    t = data.draw(thresholds(mode))
    assert torch.equal(heatmap_to_mask(H * 2.0**k, threshold_mode=mode, threshold=t, **kw),
                       heatmap_to_mask(H, threshold_mode=mode, threshold=t, **kw))


@FAST
@given(B=st.integers(0, 3), h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_mask_coverage_is_the_mean_of_m_a_soft_pixel_counting_by_its_value(B, h, w, seed, dtype):
    """The share that may change as the region term weighs it: the mean of M (the CLI report's mask_coverage, which
    computed its own mean while this function counted pixels >= 0.5: review health-3)."""
    M = torch.rand(B, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    M[M > 0.9] = 0.5
    c = mask_coverage(M)
    assert c.shape == (B,) and torch.isfinite(c).all() and ((c >= 0) & (c <= 1)).all()
    assert torch.equal(c, mask_coverage(M[:, None]))
    for b in range(B):
        assert abs(float(c[b]) - float(M[b].double().mean())) <= 4 * torch.finfo(dtype).eps
    if B:  # a NaN counts as 0, values past [0,1] (a blur's overshoot) as their bound
        M2 = M.clone()
        M2[0, 0, 0], M2[-1, -1, -1] = float("nan"), 1.5
        want = torch.nan_to_num(M2[0], nan=0.0).clamp(0, 1).double().mean()
        assert abs(float(mask_coverage(M2)[0]) - float(want)) <= 4 * torch.finfo(dtype).eps


@FAST
@given(which=st.sampled_from(["blur_sigma", "feather", "dilation"]), bad=st.floats(max_value=-1e-9) | st.just(1.5))
def test_a_negative_setting_or_a_fractional_dilation_is_refused_by_name(which, bad):
    assume(which == "dilation" or bad < 0)
    with pytest.raises(ValueError, match=rf"^{which} must be a (whole )?number of pixels"):
        heatmap_to_mask(torch.rand(1, 6, 6), **{which: bad})


# A non-finite blur_sigma / feather / dilation, or a blur wider than any image, is a ValueError naming it (inf raised
# OverflowError, NaN an unnamed ValueError, blur_sigma=1e300 a RuntimeError from kornia).
@FAST
@given(which=st.sampled_from(["blur_sigma", "feather", "dilation"]), bad=st.sampled_from([math.nan, math.inf, 1e300]))
def test_a_nonfinite_setting_is_a_valueerror_naming_it(which, bad):
    assume(which != "dilation" or not math.isfinite(bad))  # a huge dilation just covers the image
    with pytest.raises(ValueError, match=which):
        heatmap_to_mask(torch.rand(1, 8, 8), **{which: bad})


