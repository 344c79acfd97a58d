"""Property tests (hypothesis) for focusfix_core/viz.py (grids, upscale, mask and heat overlays, curves, PNGs) and
`attention.overlay_maps`: shapes, dtypes and ranges as documented for any batch and image size (1 px, odd, very
wide), and what NaN/inf inputs give. The bugs found are fixed; their tests say so ("Fixed, was BUG n")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from focusfix_core import viz
from focusfix_core.attention import overlay_maps

FAST = settings(max_examples=60, deadline=None)
SIDES = st.sampled_from([1, 2, 3, 5, 8, 17])
WIDE = st.sampled_from([1, 3, 8, 64, 301])


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------------------------- image_grid
@FAST
@given(N=st.integers(1, 11), H=SIDES, W=WIDE, nrow=st.one_of(st.none(), st.integers(1, 13)), pad=st.integers(0, 3),
       pad_value=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_image_grid_puts_each_image_at_its_row_major_tile(N, H, W, nrow, pad, pad_value, seed, dtype):
    images = _rand(N, 3, H, W, seed=seed, dtype=dtype)
    grid = viz.image_grid(images, nrow=nrow, pad=pad, pad_value=pad_value)
    c = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / c)
    assert grid.shape == (3, rows * (H + pad) + pad, c * (W + pad) + pad) and grid.dtype == dtype
    covered = torch.zeros(grid.shape[1:], dtype=torch.bool)
    for k in range(rows * c):
        r, col = divmod(k, c)
        y, x = pad + r * (H + pad), pad + col * (W + pad)
        tile = grid[:, y:y + H, x:x + W]
        want = images[k] if k < N else torch.full_like(images[0], pad_value)
        assert torch.equal(tile, want), k
        covered[y:y + H, x:x + W] = True
    assert (grid[:, ~covered] == pad_value).all()  # the rest is padding


@FAST
@given(shape=st.sampled_from([(2, 3, 4), (2, 1, 4, 4), (2, 4, 4, 4), (3, 4, 4, 3), (1, 2, 3, 4, 5)]))
def test_image_grid_refuses_other_layouts_naming_the_shape(shape):
    with pytest.raises(ValueError, match=r"images must be \[N,3,H,W\]"):
        viz.image_grid(torch.zeros(shape))


# Fixed, was BUG 2: an empty batch [0,3,H,W] has the documented layout but raises ZeroDivisionError ("division by zero",
# `math.ceil(N / nrow)` with nrow = ceil(sqrt(0)) = 0), not a ValueError naming it (STYLE: a clear ValueError
# naming the input, never an error from deep inside). Minimal input: viz.image_grid(torch.zeros(0, 3, 4, 4)).
def test_image_grid_of_an_empty_batch_is_refused_naming_it():
    with pytest.raises(ValueError, match="images"):
        viz.image_grid(torch.zeros(0, 3, 4, 4))


# ------------------------------------------------------------------------------------------- upscale
@FAST
@given(N=st.integers(1, 3), C=st.sampled_from([1, 3]), H=SIDES, W=WIDE, min_size=st.integers(1, 200),
       seed=st.integers(0, 2**16))
def test_upscale_repeats_each_pixel_by_one_integer_factor_up_to_min_size(N, C, H, W, min_size, seed):
    x = _rand(N, C, H, W, seed=seed)
    y = viz.upscale(x, min_size)
    f = y.shape[-1] // W
    assert y.shape == (N, C, H * f, W * f) and f >= 1
    assert max(y.shape[-2:]) >= min_size or f == 1 and max(H, W) >= min_size
    assert f == 1 or max(H, W) * (f - 1) < min_size  # the smallest factor that reaches min_size
    assert torch.equal(y[..., ::f, ::f], x)
    assert torch.equal(y, x.repeat_interleave(f, -2).repeat_interleave(f, -1))


# ------------------------------------------------------------------------------------------- mask_overlay
@FAST
@given(B=st.integers(1, 3), H=SIDES, W=WIDE, alpha=st.floats(0, 1), seed=st.integers(0, 2**16),
       color=st.tuples(*[st.floats(0, 1)] * 3), layout=st.sampled_from(["bhw", "b1hw"]))
def test_mask_overlay_tints_exactly_the_masked_part(B, H, W, alpha, seed, color, layout):
    I = _rand(B, 3, H, W, seed=seed)
    M = (_rand(B, H, W, seed=seed + 1) > 0.5).float()
    out = viz.mask_overlay(I, M if layout == "bhw" else M[:, None], color=color, alpha=alpha)
    assert out.shape == I.shape and out.dtype == I.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    keep = M[:, None].expand_as(I) == 0
    assert torch.equal(out[keep], I[keep])  # outside M: untouched
    c = torch.tensor(color)[None, :, None, None].expand_as(I)
    tinted = (I * (1 - alpha) + c * alpha).clamp(0, 1)
    torch.testing.assert_close(out[~keep], tinted[~keep])


# ------------------------------------------------------------------------------------------- heat_overlay
@FAST
@given(B=st.integers(1, 3), H=SIDES, W=WIDE, h=SIDES, w=WIDE, alpha=st.floats(0, 1), seed=st.integers(0, 2**16),
       scale=st.floats(0.1, 100), shift=st.floats(-10, 10), layout=st.sampled_from(["bhw", "b1hw"]),
       same=st.booleans())
def test_heat_overlay_is_an_image_in_0_1_that_ignores_the_heatmaps_scale(B, H, W, h, w, alpha, seed, scale, shift,
                                                                         layout, same):
    h, w = (H, W) if same else (h, w)
    I = _rand(B, 3, H, W, seed=seed)
    Hm = _rand(B, h, w, seed=seed + 1)
    Hm = Hm if layout == "bhw" else Hm[:, None]
    out = viz.heat_overlay(I, Hm, alpha)
    assert out.shape == (B, 3, H, W) and out.dtype == I.dtype
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1
    # per-image normalised: an affine change of the heatmap (scale > 0) draws the same picture. Only for a heatmap
    # at the image's size: a resized one that should be flat (1 row to 2 rows) differs by rounding between its
    # pixels, which the normalisation spreads over the whole colour range
    if (h, w) == (H, W):
        torch.testing.assert_close(viz.heat_overlay(I, Hm * scale + shift, alpha), out, atol=2e-3, rtol=0)


@FAST
@given(B=st.integers(1, 3), H=SIDES, W=WIDE, alpha=st.floats(0, 1), c=st.floats(-1e6, 1e6), seed=st.integers(0, 99))
def test_a_flat_heatmap_is_drawn_as_the_lowest_colour(B, H, W, alpha, c, seed):
    I = _rand(B, 3, H, W, seed=seed)
    out = viz.heat_overlay(I, torch.full((B, H, W), c), alpha)
    blue = torch.tensor([0.0, 0.0, 1.0])[None, :, None, None]
    torch.testing.assert_close(out, (I * (1 - alpha) + blue * alpha).clamp(0, 1))


# Fixed, was BUG 3: a heatmap holding NaN or inf (or finite values whose range overflows float32, e.g. [-3e38, 3e38]) gives a
# NaN overlay: no error, and an image outside the documented [0,1] that PNG/preview code then turns into arbitrary
# pixels (STYLE: never a silently wrong result). The same holds for `attention.overlay_maps` with a NaN/inf map
# (documented "[B,n_words,3,H,W] in [0,1]"). Minimal inputs: viz.heat_overlay(torch.rand(1, 3, 2, 2),
# torch.tensor([[[0.0, float("inf")], [0.0, 0.0]]])) has NaN at the inf pixel; overlay_maps(torch.rand(1, 3, 2, 2),
# torch.tensor([[[[1.0, float("inf")]]]])) is NaN everywhere.
@settings(max_examples=20, deadline=None)
@given(bad=st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38]), H=SIDES, W=WIDE)
def test_a_nonfinite_heatmap_is_refused_or_drawn_in_0_1(bad, H, W):
    I = torch.rand(1, 3, H, W)
    Hm = torch.zeros(1, H, W)
    Hm[0, 0, 0] = bad
    if bad == 3e38:
        Hm[0, -1, -1] = -bad
    for draw in (lambda: viz.heat_overlay(I, Hm), lambda: overlay_maps(I, Hm[:, None])):
        try:
            out = draw()
        except ValueError:
            continue
        assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1


# ------------------------------------------------------------------------------------------- plot_curves
_VALUE = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6))


@FAST
@given(series=st.dictionaries(st.text(min_size=1, max_size=12), st.lists(_VALUE, max_size=40), max_size=7),
       width=st.integers(1, 600), height=st.integers(1, 300))
def test_plot_curves_gives_one_image_in_0_1_for_any_series(series, width, height):
    img = viz.plot_curves(series, width=width, height=height)
    assert img.shape == (3, height, width) and img.dtype == torch.float32
    assert torch.isfinite(img).all() and float(img.min()) >= 0 and float(img.max()) <= 1


@FAST
@given(vals=st.lists(st.floats(-1e30, 1e30), min_size=1, max_size=30), name=st.sampled_from(["loss", "reward"]))
def test_a_series_with_values_is_drawn_and_an_empty_one_says_no_data(vals, name):
    drawn = viz.plot_curves({name: vals})
    empty = viz.plot_curves({name: [None, math.nan, math.inf]})
    blank = torch.ones(3, 256, 512)
    assert not torch.equal(drawn, blank) and not torch.equal(empty, blank)
    coloured = (drawn.max(0).values - drawn.min(0).values) > 0.2  # the curve's colour, not black text
    assert coloured.any()
    assert torch.equal(empty, viz.plot_curves({}))  # nothing finite: the same "no data" picture


# ------------------------------------------------------------------------------------------- to_pil / save_png
@FAST
@given(H=SIDES, W=WIDE, grey=st.booleans(), lo=st.floats(-2, 0), hi=st.floats(1, 3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_save_png_writes_the_clamped_image_rounded_to_8_bits(tmp_path_factory, H, W, grey, lo, hi, seed, dtype):
    img = (_rand(*((H, W) if grey else (3, H, W)), seed=seed) * (hi - lo) + lo).to(dtype)
    path = viz.save_png(img, tmp_path_factory.mktemp("png") / "a.png")
    arr = torch.from_numpy(np.array(Image.open(path))).float() / 255
    assert arr.shape == (H, W, 3)
    want = (img.float().clamp(0, 1) if grey else img.float().clamp(0, 1).permute(1, 2, 0))
    want = want[..., None].expand(H, W, 3) if grey else want
    assert (arr - want).abs().max() <= 0.5 / 255 + 1e-6


@FAST
@given(seed=st.integers(0, 99), old=st.binary(max_size=20))
def test_save_png_never_replaces_a_file_unless_asked(tmp_path_factory, seed, old):
    path = tmp_path_factory.mktemp("png") / "a.png"
    path.write_bytes(old)
    with pytest.raises(FileExistsError):
        viz.save_png(_rand(3, 4, 4, seed=seed), path, overwrite=False)
    assert path.read_bytes() == old and [p.name for p in path.parent.iterdir()] == ["a.png"]
    viz.save_png(_rand(3, 4, 4, seed=seed), path, overwrite=True)
    assert Image.open(path).size == (4, 4)


# ------------------------------------------------------------------------------------------- overlay_maps
@FAST
@given(B=st.integers(1, 3), n=st.integers(1, 4), H=SIDES, W=WIDE, h=SIDES, w=WIDE, alpha=st.floats(0, 1),
       seed=st.integers(0, 2**16), one=st.booleans(), scale=st.floats(1e-3, 1e3))
def test_overlay_maps_gives_each_word_its_tile_in_0_1_whatever_the_maps_scale(B, n, H, W, h, w, alpha, seed, one,
                                                                              scale):
    I = _rand(B, 3, H, W, seed=seed)
    A = _rand(1 if one else B, n, h, w, seed=seed + 1)
    out = overlay_maps(I, A, alpha)
    assert out.shape == (B, n, 3, H, W) and out.dtype == I.dtype
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1
    torch.testing.assert_close(overlay_maps(I, A * scale, alpha), out, atol=1e-5, rtol=0)  # each map by its max
    torch.testing.assert_close(overlay_maps(I, A - 5, alpha), overlay_maps(I, torch.zeros_like(A), alpha))  # < 0 = 0
    if alpha == 0:
        assert torch.equal(out, I[:, None].expand_as(out))


@FAST
@given(case=st.sampled_from([((2, 4, 4), (2, 1, 2, 2), 0.5, "images I"), ((2, 1, 4, 4), (2, 1, 2, 2), 0.5, "images I"),
                             ((2, 3, 4, 4), (3, 1, 2, 2), 0.5, "attention maps A"),
                             ((2, 3, 4, 4), (2, 2, 2), 0.5, "attention maps A"),
                             ((1, 3, 4, 4), (1, 1, 2, 2), 1.5, "alpha"), ((1, 3, 4, 4), (1, 1, 2, 2), -0.1, "alpha"),
                             ((1, 3, 4, 4), (1, 1, 2, 2), math.nan, "alpha")]))
def test_overlay_maps_refuses_bad_inputs_naming_them(case):
    I_shape, A_shape, alpha, name = case
    with pytest.raises(ValueError, match=name):
        overlay_maps(torch.rand(I_shape), torch.rand(A_shape), alpha)
