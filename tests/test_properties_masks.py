"""Property tests (hypothesis) for the painted-mask path: `io.load_mask_image` on random PNGs of every common
mode (and on damaged files), and `saliency.fit_mask` on random masks and sizes."""
import io as _io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from focusfix_core.io import load_mask_image
from focusfix_core.saliency import fit_mask

FAST = settings(max_examples=80, deadline=None)
SIDES = st.integers(1, 24)


@st.composite
def images(draw):
    """(mode, array) of a random image: L, RGB, RGBA, LA (uint8), I;16 (uint16), 1 (bool)."""
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "I;16", "1"]))
    h, w = draw(SIDES), draw(SIDES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    elif mode == "1":
        a = rng.random((h, w)) < 0.5
    else:
        c = {"L": None, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
        a = rng.integers(0, 256, (h, w) if c is None else (h, w, c), dtype=np.uint8)
        if c in (2, 4) and draw(st.booleans()):
            a[..., -1] = 255  # an opaque alpha channel: read as grey
        if c in (3, 4) and draw(st.booleans()):  # a grey mask saved as colour, some pixels a little coloured
            g = np.repeat(a[..., :1].astype(int), 3, -1)
            tint = rng.random((h, w)) < draw(st.floats(0, 0.03))
            g[tint, 1] += rng.integers(-12, 13, int(tint.sum()))  # either side of the 8/255 a pixel may differ
            a[..., :3] = np.clip(g, 0, 255)
        if draw(st.booleans()):  # extremes: pure black / white pixels
            a[rng.random((h, w)) < 0.3] = draw(st.sampled_from([0, 255]))
    return mode, a


def _save_png(a: np.ndarray, path: Path) -> None:
    im = Image.fromarray(a)  # uint8 HxW(x2/3/4) -> L/LA/RGB/RGBA, uint16 -> I;16, bool -> 1
    im.save(path)


@FAST
@given(img=images())
def test_a_painted_mask_reads_as_documented(img):
    """[H,W] float32 in [0,1]; transparency (alpha below 255 anywhere) -> M = 1 - alpha; else the grey level
    (white may change, black stays); 16-bit grey / 65535; a colour image (over 1 % of its pixels with channels more
    than 8/255 apart) without transparency is refused by name."""
    mode, a = img
    transparent = mode in ("RGBA", "LA") and a[..., -1].min() < 255
    rgb = a[..., :3].astype(int)
    coloured = mode in ("RGB", "RGBA") and not transparent and ((rgb.max(-1) - rgb.min(-1)) > 8).mean() > 0.01
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mask.png"
        _save_png(a, path)
        if coloured:
            with pytest.raises(ValueError, match="is a colour image without transparency") as e:
                load_mask_image(path)
            assert str(path) in str(e.value)
            return
        M = load_mask_image(path)
    h, w = a.shape[:2]
    assert isinstance(M, torch.Tensor) and M.dtype == torch.float32 and M.shape == (h, w)
    assert bool(torch.isfinite(M).all()) and float(M.min()) >= 0 and float(M.max()) <= 1
    m = M.numpy().astype(np.float64)
    if transparent:
        np.testing.assert_allclose(m, 1 - a[..., -1] / 255.0, atol=1e-6)
        return
    grey = {"L": lambda: a / 255.0, "I;16": lambda: a / 65535.0, "1": lambda: a.astype(np.float64),
            "LA": lambda: a[..., 0] / 255.0, "RGB": lambda: None, "RGBA": lambda: None}[mode]()
    if grey is not None:
        np.testing.assert_allclose(m, grey, atol=1e-6)
    else:  # colour: a grey level, 0 for black and 1 for white, between the channels' min and max
        rgb = a[..., :3].astype(np.float64) / 255.0
        assert np.all(m >= rgb.min(-1) - 1 / 255 - 1e-6) and np.all(m <= rgb.max(-1) + 1 / 255 + 1e-6)
        assert np.all(m[(a[..., :3] == 0).all(-1)] == 0) and np.all(m[(a[..., :3] == 255).all(-1)] == 1)


@FAST
@given(h=SIDES, w=SIDES, seed=st.integers(0, 2**32 - 1), n_transparent=st.integers(1, 256))
def test_a_palette_image_with_a_transparent_colour_reads_its_transparency(h, w, seed, n_transparent):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 4, (h, w), dtype=np.uint8)
    im = Image.new("P", (w, h))
    im.putdata(idx.flatten().tolist())
    im.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128, 10, 200, 30])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.png"
        im.save(path, transparency=int(idx.flat[n_transparent % idx.size]))
        M = load_mask_image(path)
    t = int(idx.flat[n_transparent % idx.size])
    assert M.shape == (h, w) and M.dtype == torch.float32
    assert torch.equal(M, torch.from_numpy((idx == t).astype(np.float32)))  # the transparent colour may change


def _png_bytes(a: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@FAST
@given(img=images(), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
       name=st.sampled_from(["m.png", "m.jpg", "mask.webp", "m"]))
def test_a_damaged_or_foreign_file_reads_as_a_mask_or_a_valueerror(img, cut, flips, name):
    """A truncated or corrupted PNG (or any bytes): either a valid mask in [0,1] or a ValueError, never another
    exception type from deep inside PIL or zlib."""
    data = bytearray(_png_bytes(img[1]))
    for where, xor in flips:
        data[int(where * (len(data) - 1))] ^= xor
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 0.95 else bytes(data)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            M = load_mask_image(path)
        except ValueError as e:
            assert type(e) is ValueError and str(path) in str(e), f"{type(e).__name__}: {e}"
            return
    assert M.ndim == 2 and M.dtype == torch.float32
    assert bool(torch.isfinite(M).all()) and float(M.min()) >= 0 and float(M.max()) <= 1


def test_a_png_with_a_damaged_header_is_refused_by_name(tmp_path):
    """Pillow raises its own ValueError ("Truncated IHDR chunk") for a damaged header length: it names the file,
    so the user of `--mask a.png --mask b.png` is told which one is broken (it escaped unnamed)."""
    data = bytearray(_png_bytes(np.zeros((2, 2), np.uint8)))
    data[11] ^= 1
    (tmp_path / "m.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"could not read .*m\.png"):
        load_mask_image(tmp_path / "m.png")


def test_a_missing_mask_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_mask_image(tmp_path / "nope.png")


@st.composite
def masks(draw, binary=None):
    B, h, w = draw(st.integers(1, 3)), draw(SIDES), draw(SIDES)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    binary = draw(st.booleans()) if binary is None else binary
    M = torch.rand(B, 1, h, w, generator=g)
    if binary:
        M = (M < draw(st.floats(0.0, 0.3))).float()  # sparse strokes, possibly one pixel, possibly none
    return M


SIZES = st.tuples(st.integers(1, 48), st.integers(1, 48))


@FAST
@given(M=masks(), size=SIZES)
def test_fit_mask_has_the_asked_size_and_stays_in_0_1(M, size):
    out, note = fit_mask(M, size, "mask")
    B, _, h, w = M.shape
    assert out.shape == (B, 1, *size) and out.dtype == M.dtype
    assert bool(torch.isfinite(out).all()) and float(out.min()) >= 0 and float(out.max()) <= 1
    if (h, w) == size:
        assert out is M and note == ""
    else:
        assert note.startswith(f"mask resized from {h}x{w} to {size[0]}x{size[1]}")
        stretched = 50 * abs(h * size[1] - w * size[0]) > w * size[0]  # aspect ratios over 2 % apart, exactly
        assert ("another aspect ratio" in note) == stretched
    # never outside the input's own range (each image): bilinear mixes, the max picks
    lo, hi = M.amin((1, 2, 3)), M.amax((1, 2, 3))
    assert bool((out.amin((1, 2, 3)) >= lo - 1e-6).all()) and bool((out.amax((1, 2, 3)) <= hi + 1e-6).all())


@FAST
@given(M=masks(), size=SIZES)
def test_fit_mask_shrinks_by_the_maximum_over_each_footprint(M, size):
    """Shrunk (H <= h, W <= w): an input pixel lies in the footprint of output pixel (i*H//h, j*W//w), so that
    output pixel is at least as large: a thin painted stroke stays "may change", and the maximum is kept."""
    B, _, h, w = M.shape
    H, W = min(size[0], h), min(size[1], w)
    out, _ = fit_mask(M, (H, W))
    i = torch.arange(h) * H // h
    j = torch.arange(w) * W // w
    at = out[:, :, i][:, :, :, j]  # [B,1,h,w]: each input pixel's output pixel
    assert bool((at >= M - 1e-6).all())
    assert torch.equal(out.amax((1, 2, 3)), M.amax((1, 2, 3)))


@FAST
@given(M=masks(binary=True), size=SIZES)
def test_a_painted_stroke_survives_any_resize_but_a_double_enlargement(M, size):
    """A binary stroke still reads as "may change" (>= 0.5: at least half of it may change) after fitting, unless
    both sides are enlarged, where bilinear interpolation may fade a one-pixel stroke (documented: enlarged
    bilinearly)."""
    B, _, h, w = M.shape
    out, _ = fit_mask(M, size)
    painted = M.amax((1, 2, 3)) > 0
    if not (size[0] > h and size[1] > w):
        assert bool(((out.amax((1, 2, 3)) >= 0.5) == painted).all())
    else:
        assert bool(((out.amax((1, 2, 3)) >= 0.25) == painted).all())


@FAST
@given(c=st.floats(0, 1), shape=st.tuples(SIDES, SIDES), size=SIZES)
def test_fit_mask_keeps_a_uniform_mask_uniform(c, shape, size):
    out, _ = fit_mask(torch.full((1, 1, *shape), c), size)
    torch.testing.assert_close(out, torch.full((1, 1, *size), c), atol=1e-6, rtol=0)
