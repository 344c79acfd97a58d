"""Property tests (hypothesis) for the ComfyUI layout conversions in nodes/adapters.py (IMAGE <-> I, MASK <-> M,
CONDITIONING -> Cond), loaded without ComfyUI, and for `cat_cond`, which batches prompts of different lengths."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pack_loader import load_pack

from focusfix_core.denoisers import cat_cond

A = load_pack().nodes.adapters

FAST = settings(max_examples=60, deadline=None)
SIDE = st.integers(1, 9)
FLOATS = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
NAMES = st.sampled_from(["image", "before", "after", "preview"])
MASK_NAMES = st.sampled_from(["mask", "painted_mask", "M"])


def _rand(shape, seed, dtype=torch.float32, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


# ------------------------------------------------------------------------------------------------ IMAGE <-> I
@FAST
@given(B=st.integers(1, 3), H=SIDE, W=SIDE, C=st.sampled_from([1, 3, 4]), dtype=FLOATS, seed=st.integers(0, 2**31),
       batched=st.booleans())
def test_image_to_bchw_and_back_keeps_every_colour_value(B, H, W, C, dtype, seed, batched):
    """IMAGE [B,H,W,C] in [0,1] -> I [B,3,H,W] float32 in [0,1] -> IMAGE [B,H,W,3]: the RGB values come back
    exactly (as float32), alpha is dropped, grey is spread to 3 channels, and [H,W,C] is a batch of one."""
    image = _rand((B, H, W, C), seed, dtype)
    given_ = image if batched else image[0]
    I = A.image_to_bchw(given_)
    n = B if batched else 1
    assert I.shape == (n, 3, H, W) and I.dtype == torch.float32 and I.is_contiguous()
    assert I.min() >= 0 and I.max() <= 1
    rgb = image[:n].float()
    rgb = rgb.expand(n, H, W, 3) if C == 1 else rgb[..., :3]
    back = A.bchw_to_image(I)
    assert back.shape == (n, H, W, 3) and back.dtype == torch.float32 and back.device.type == "cpu"
    assert torch.equal(back, rgb)


@FAST
@given(H=SIDE, W=SIDE, seed=st.integers(0, 2**31), lo=st.floats(-0.5, 0.0), hi=st.floats(1.0, 2.0))
def test_image_values_slightly_out_of_range_are_clamped_into_0_1(H, W, seed, lo, hi):
    """A resampler's overshoot (up to 2) and undershoot (down to -0.5) are clamped, not refused: I stays in
    [0,1] and is the clamped image."""
    image = _rand((2, H, W, 3), seed, lo=lo, hi=hi)
    I = A.image_to_bchw(image)
    assert I.min() >= 0 and I.max() <= 1
    assert torch.equal(I, image.clamp(0, 1).movedim(-1, 1))


@FAST
@given(H=SIDE, W=SIDE, top=st.floats(2.001, 1e6), name=NAMES, seed=st.integers(0, 2**31))
def test_an_image_with_values_above_2_is_refused_by_name(H, W, top, name, seed):
    image = _rand((1, H, W, 3), seed)
    image[0, seed % H, (seed // H) % W, seed % 3] = top
    with pytest.raises(ValueError, match=rf"^{name} has values up to .*expected a float IMAGE in \[0,1\]"):
        A.image_to_bchw(image, name=name)


@FAST
@given(H=SIDE, W=SIDE, low=st.floats(-1e6, -0.5001), name=NAMES, seed=st.integers(0, 2**31))
def test_an_image_with_values_below_minus_a_half_is_refused_by_name(H, W, low, name, seed):
    """Bad-input hunt (session 27): an image in [-1,1] (a custom node's normalised output) was scored after its
    dark half was clamped to black, without a word."""
    image = _rand((1, H, W, 3), seed)
    image[0, seed % H, (seed // H) % W, seed % 3] = low
    with pytest.raises(ValueError, match=rf"^{name} has values down to .*expected a float IMAGE in \[0,1\] "
                                         rf"\(\[-1,1\] values\? map them to \(x \+ 1\) / 2\)"):
        A.image_to_bchw(image, name=name)


@FAST
@given(H=st.integers(2, 24), W=st.integers(2, 24), scale=st.floats(1.1, 4.0), seed=st.integers(0, 2**31))
def test_a_bicubic_upscale_of_hard_edges_is_clamped_not_refused(H, W, scale, seed):
    """Review (session 27): ComfyUI's Upscale Image (bicubic, torch's interpolate, unclamped) takes a 1-bit
    image down to about -0.45 (the kernel's negative lobes, in 2-D): clamped as any resampler's overshoot, not
    refused as a [-1,1] image."""
    g = torch.Generator().manual_seed(seed)
    bits = (torch.rand(1, 3, H, W, generator=g) > 0.5).float()
    up = torch.nn.functional.interpolate(bits, scale_factor=scale, mode="bicubic", align_corners=False)
    I = A.image_to_bchw(up.movedim(1, -1))
    assert torch.equal(I, up.clamp(0, 1))
    assert float(up.min()) > -0.5  # the bound the refusal leaves room for (one resize; two chained can pass it)


@FAST
@given(B=st.integers(1, 4), H=SIDE, W=SIDE, bad=st.sampled_from([math.nan, math.inf, -math.inf]), name=NAMES,
       data=st.data())
def test_a_nonfinite_image_is_refused_naming_the_input_and_the_images(B, H, W, bad, name, data):
    image = torch.rand(B, H, W, 3)
    hit = sorted(data.draw(st.sets(st.integers(0, B - 1), min_size=1)))
    for b in hit:
        image[b, data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1)), data.draw(st.integers(0, 2))] = bad
    with pytest.raises(ValueError, match=rf"^{name} has NaN or inf values \(image\(s\) {re.escape(str(hit))} of {B}\)"):
        A.image_to_bchw(image, name=name)


@FAST
@given(dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]),
       H=SIDE, W=SIDE, name=NAMES)
def test_an_integer_image_is_refused_by_name(dtype, H, W, name):
    image = torch.zeros(1, H, W, 3, dtype=dtype)
    hint = r" \(0\.\.255 pixel values\? divide by 255\)" if dtype == torch.uint8 else ""
    with pytest.raises(ValueError, match=rf"^{name} must be a float IMAGE .*got dtype {re.escape(str(dtype))}{hint}$"):
        A.image_to_bchw(image, name=name)


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=6), name=NAMES)
def test_an_image_of_another_layout_is_refused_by_name(shape, name):
    """Any shape but [B,H,W,C] / [H,W,C] with C in (1, 3, 4) is a ValueError naming the input and the shape."""
    ok = len(shape) in (3, 4) and shape[-1] in (1, 3, 4)
    image = torch.rand(tuple(shape))
    if ok:
        assert A.image_to_bchw(image, name=name).shape[1] == 3
    else:
        with pytest.raises(ValueError, match=rf"^{name} must be an IMAGE \[B,H,W,C\] .*got shape "
                                             rf"{re.escape(str(tuple(shape)))}"):
            A.image_to_bchw(image, name=name)


@FAST
@given(H=st.integers(1, 12), W=st.integers(1, 12), min_side=st.integers(-2, 12), name=NAMES)
def test_min_side_refuses_exactly_the_images_below_it(H, W, min_side, name):
    image = torch.rand(1, H, W, 3)
    if min(H, W) >= max(min_side, 1):
        assert A.image_to_bchw(image, name=name, min_side=min_side).shape == (1, 3, H, W)
    else:
        with pytest.raises(ValueError, match=rf"^{name} is {H}x{W} pixels \(HxW\): expected at least {min_side} "):
            A.image_to_bchw(image, name=name, min_side=min_side)


def test_an_empty_batch_and_a_non_tensor_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^before is an empty batch"):
        A.image_to_bchw(torch.rand(0, 4, 4, 3), name="before")
    with pytest.raises(TypeError, match=r"^after must be an IMAGE tensor .*got list"):
        A.image_to_bchw([[0.0]], name="after")


@FAST
@given(B=st.integers(1, 3), C=st.sampled_from([1, 3]), H=SIDE, W=SIDE, seed=st.integers(0, 2**31),
       lo=st.floats(-3, 0), hi=st.floats(1, 3), dtype=FLOATS, batched=st.booleans())
def test_bchw_to_image_is_the_clamped_image_in_comfyuis_layout(B, C, H, W, seed, lo, hi, dtype, batched):
    I = _rand((B, C, H, W), seed, dtype, lo, hi)
    out = A.bchw_to_image(I if batched else I[0])
    n = B if batched else 1
    assert out.shape == (n, H, W, 3) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, I[:n].float().clamp(0, 1).expand(n, 3, H, W).movedim(1, -1))


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=5))
def test_bchw_to_image_refuses_other_layouts(shape):
    ok = len(shape) in (3, 4) and shape[-3] in (1, 3)
    if ok:
        assert A.bchw_to_image(torch.rand(tuple(shape))).shape[-1] == 3
    else:
        with pytest.raises(ValueError, match=r"^images must be \[B,3,H,W\], got shape"):
            A.bchw_to_image(torch.rand(tuple(shape)))


# ------------------------------------------------------------------------------------------------ MASK <-> M
LAYOUTS = ["BHW", "HW", "B1HW", "BHW1"]


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 8), W=st.integers(1, 8), layout=st.sampled_from(LAYOUTS),
       kind=st.sampled_from(["float", "bool", "double", "half"]), seed=st.integers(0, 2**31))
def test_every_mask_layout_reads_as_the_same_mask_and_converts_back(B, H, W, layout, kind, seed):
    """[B,H,W], [H,W], [B,1,H,W] and [B,H,W,1] all give M: [B,1,H,W] float with the mask's values, and
    `b1hw_to_mask` gives the [B,H,W] mask back."""
    if layout == "HW":
        B = 1
    if layout == "BHW" and B > 1 and H > 1 and W == 1:
        W = 2  # the ambiguous [B,H,1] is refused on purpose (tested below)
    if layout == "BHW1" and H == 1:
        H = 2  # [B,1,W,1] reads as [B,1,H,W]: ambiguous, its first reading wins
    m = torch.rand(B, H, W, generator=torch.Generator().manual_seed(seed))
    m = {"float": m, "bool": m > 0.5, "double": m.double(), "half": m.half()}[kind]
    given_ = {"BHW": m, "HW": m[0], "B1HW": m[:, None], "BHW1": m[..., None]}[layout]
    M, note = A.mask_to_b1hw(given_)
    assert note == ""
    assert M.shape == (B, 1, H, W) and M.dtype == torch.float32 and M.is_contiguous()
    assert torch.equal(M[:, 0], m.float())
    back = A.b1hw_to_mask(M)
    assert back.shape == (B, H, W) and back.dtype == torch.float32 and torch.equal(back, m.float())
    assert torch.equal(A.b1hw_to_mask(M[:, 0]), back)


@FAST
@given(B=st.integers(1, 3), H=st.integers(2, 8), W=st.integers(2, 8), lo=st.floats(-10, 0), hi=st.floats(1, 10),
       seed=st.integers(0, 2**31))
def test_mask_values_are_clamped_into_0_1_both_ways(B, H, W, lo, hi, seed):
    """An overshoot (down to -0.5, up to 2) is clamped; values past that (0..255, [-1,1]) are refused, as an
    IMAGE's ([-1,1] masks were clamped, holding their lower half whole without a word: review health-2)."""
    m = _rand((B, H, W), seed, lo=lo, hi=hi)
    if m.max() > 2 or m.min() < -0.5:
        with pytest.raises(ValueError, match=r"mask has values from .* to .*: expected a float MASK in \[0,1\]"):
            A.mask_to_b1hw(m)
    else:
        M, _ = A.mask_to_b1hw(m)
        assert torch.equal(M[:, 0], m.clamp(0, 1))
    out = A.b1hw_to_mask(m[:, None])
    assert out.min() >= 0 and out.max() <= 1 and torch.equal(out, m.clamp(0, 1))


@FAST
@given(B=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), H=st.integers(1, 12), W=st.integers(1, 12),
       batch=st.integers(1, 4), name=MASK_NAMES, seed=st.integers(0, 2**31))
def test_mask_size_and_batch_are_met_or_refused_by_name(B, h, w, H, W, batch, name, seed):
    """With size and batch: M is [batch,1,H,W] in [0,1] (a single mask repeated, another size resized with a note
    naming the input), or a ValueError naming the input and both counts."""
    m = torch.rand(B, h, w, generator=torch.Generator().manual_seed(seed))
    if B > 1 and h > 1 and w == 1:
        m = m.view(B, 1, h, 1)  # an unambiguous layout of a mask 1 pixel wide
    if B not in (1, batch):
        with pytest.raises(ValueError, match=rf"^{name} has {B} masks but there are {batch} images: give 1 or {batch}"):
            A.mask_to_b1hw(m, size=(H, W), batch=batch, name=name)
        return
    M, note = A.mask_to_b1hw(m, size=(H, W), batch=batch, name=name)
    assert M.shape == (batch, 1, H, W) and M.min() >= 0 and M.max() <= 1
    if B == 1:  # a single mask serves every image
        assert all(torch.equal(M[i], M[0]) for i in range(batch))
    if (h, w) == (H, W):
        assert note == "" and torch.equal(M[:, 0], m.view(B, h, w).expand(batch, h, w))
    else:
        assert note.startswith(f"{name} resized from {h}x{w} to {H}x{W}")
        with pytest.raises(ValueError, match=rf"^{name} is {h}x{w} but the images are {H}x{W}$"):
            A.mask_to_b1hw(m, size=(H, W), batch=batch, name=name, resize=False)


@FAST
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=5), name=MASK_NAMES)
def test_any_mask_shape_gives_a_b1hw_mask_or_a_valueerror_naming_the_input(shape, name):
    m = torch.rand(tuple(shape))
    try:
        M, note = A.mask_to_b1hw(m, name=name)
    except ValueError as e:
        assert str(e).startswith(f"{name} ") and str(tuple(shape)) in str(e), str(e)
        return
    assert M.ndim == 4 and M.shape[1] == 1 and M.numel() == m.numel() > 0 and note == ""
    assert len(shape) in (2, 3, 4)
    if len(shape) == 3:  # B masks 1 pixel wide only where it cannot be one [H,W,1] mask
        assert not (shape[0] > 1 and shape[1] > 1 and shape[2] == 1)


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 6), W=st.integers(1, 6),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), name=MASK_NAMES, seed=st.integers(0, 2**31))
def test_a_nonfinite_mask_is_refused_by_name(B, H, W, bad, name, seed):
    m = torch.rand(B, H, W)
    if B > 1 and H > 1 and W == 1:
        W = 2
        m = torch.rand(B, H, W)
    m.view(-1)[seed % m.numel()] = bad
    with pytest.raises(ValueError, match=rf"^{name} has NaN or inf values"):
        A.mask_to_b1hw(m, name=name)


@FAST
@given(dtype=st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.int64]), name=MASK_NAMES)
def test_an_integer_mask_is_refused_by_name(dtype, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a float MASK .*got dtype {re.escape(str(dtype))}$"):
        A.mask_to_b1hw(torch.ones(1, 4, 4, dtype=dtype), name=name)


@FAST
@given(B=st.integers(2, 5), H=st.integers(2, 9), name=MASK_NAMES)
def test_a_b_h_1_mask_is_refused_as_ambiguous(B, H, name):
    with pytest.raises(ValueError, match=rf"^{name} has shape \({B}, {H}, 1\): a MASK \[B,H,W\] of that shape is {B} "
                                         rf"masks {H}x1 pixels"):
        A.mask_to_b1hw(torch.rand(B, H, 1), name=name)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=5))
def test_b1hw_to_mask_refuses_other_layouts(shape):
    ok = len(shape) == 3 or (len(shape) == 4 and shape[1] == 1)
    if ok:
        assert A.b1hw_to_mask(torch.rand(tuple(shape))).ndim == 3
    else:
        with pytest.raises(ValueError, match=r"^mask M must be \[B,(1,)?H,W\], got shape"):
            A.b1hw_to_mask(torch.rand(tuple(shape)))


# ------------------------------------------------------------------------------------- CONDITIONING -> Cond
@st.composite
def conditionings(draw):
    """A CONDITIONING: entries [context [n,T,D], {pooled_output: [n,P], ...}] with T a multiple of 77 or other."""
    D, P = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    entries = []
    for _ in range(draw(st.integers(1, 3))):
        n, T = draw(st.integers(1, 2)), draw(st.sampled_from([2, 3, 4, 6]))
        extra = {"pooled_output": torch.randn(n, P)}
        if draw(st.booleans()):
            extra["area"] = (8, 8, 0, 0)  # ignored by training, named by conditioning_ignored
        entries.append([torch.randn(n, T, D), extra])
    return entries


@FAST
@given(conditioning=conditionings(), is_adm=st.booleans())
def test_conditioning_rows_keep_their_tokens_and_pooled_output(conditioning, is_adm):
    """Batch = all rows of all entries, in order; T = the lcm of the lengths, each row's tokens repeated; the
    pooled output follows its row (SDXL-type models only); the context is a detached float copy."""
    cond = A.conditioning_to_cond(conditioning, is_adm)
    rows = [(e[0][r], e[1]["pooled_output"][r]) for e in conditioning for r in range(len(e[0]))]
    T = math.lcm(*(e[0].shape[1] for e in conditioning))
    assert set(cond) == ({"context", "pooled"} if is_adm else {"context"})
    assert cond["context"].shape == (len(rows), T, conditioning[0][0].shape[-1])
    for b, (context, pooled) in enumerate(rows):
        assert torch.equal(cond["context"][b], context.repeat(T // len(context), 1))
        if is_adm:
            assert torch.equal(cond["pooled"][b], pooled)
    first = conditioning[0][0].clone()
    cond["context"].add_(1)  # a copy: the node's input is not touched
    assert torch.equal(conditioning[0][0], first)
    ignored = A.conditioning_ignored(conditioning, "negative")
    assert bool(ignored) == any("area" in e[1] for e in conditioning)
    assert all(line.startswith("negative: ") for line in ignored)


def test_conditioning_parts_no_sd_unet_reads_are_not_named_but_a_zero_strength_is():
    """A style model's attention bias sets attention_mask and attention_mask_img_shape (no SD UNet reads either);
    strength 0 on a lone entry zeroes the prompt's prediction in KSampler (it divides by a count of 1e-37)."""
    ctx = torch.zeros(1, 77, 8)
    bias = [[ctx, {"attention_mask": torch.zeros(1, 1, 85), "attention_mask_img_shape": (64, 64)}]]
    assert A.conditioning_ignored(bias) == []
    assert A.conditioning_ignored([[ctx, {"strength": 3.0}]]) == []
    assert "without its strength:" in A.conditioning_ignored([[ctx, {"strength": 0.0}]])[0]


@FAST
@given(conditioning=conditionings(), drop=st.integers(0, 2), name=st.sampled_from(["positive", "negative"]))
def test_sdxl_conditioning_without_a_pooled_output_is_refused_and_empty_ones_name_the_input(conditioning, drop, name):
    del conditioning[min(drop, len(conditioning) - 1)][1]["pooled_output"]
    with pytest.raises(ValueError, match="pooled output, which is missing"):
        A.conditioning_to_cond(conditioning, True, name)
    assert A.conditioning_to_cond(conditioning, False, name)["context"].ndim == 3  # SD1.5 reads no pooled output
    for empty in ([], (), None, "text", {"context": 1}):
        with pytest.raises(ValueError, match=rf"^{name} must be a non-empty CONDITIONING"):
            A.conditioning_to_cond(empty, False, name)


@FAST
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), D=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_cat_cond_keeps_each_rows_attention_output(lengths, D, seed):
    """cat_cond repeats shorter contexts up to the lcm of the lengths; softmax attention over n copies of every
    token gives each row the same output as over its own tokens (as ComfyUI's CONDCrossAttn.concat)."""
    g = torch.Generator().manual_seed(seed)
    conds = [{"context": torch.randn(1, T, D, generator=g, dtype=torch.float64)} for T in lengths]
    out = cat_cond(*conds)["context"]
    assert out.shape == (len(lengths), math.lcm(*lengths), D)
    q = torch.randn(5, D, generator=g, dtype=torch.float64)
    for b, c in enumerate(conds):
        k = c["context"][0]
        own = torch.softmax(q @ k.T, -1) @ k
        cat = torch.softmax(q @ out[b].T, -1) @ out[b]
        torch.testing.assert_close(cat, own)
        assert torch.equal(out[b, :lengths[b]], k)


def test_cat_cond_refuses_conds_with_other_keys():
    with pytest.raises(ValueError, match="different keys"):
        cat_cond({"context": torch.zeros(1, 2, 3)}, {"context": torch.zeros(1, 2, 3), "pooled": torch.zeros(1, 4)})
