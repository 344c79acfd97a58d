"""Tests for focusfix_core.losses (kornia style: properties, reference values, float64 gradcheck)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focusfix_core.losses import (
    enhance_loss,
    key_change_loss,
    overlap_and_peaks,
    preservation_loss,
    region_loss,
    resize_mask,
    reward_loss,
    separate_loss,
)

DTYPES = [torch.float32, torch.float64]


def _square_mask(B, H, W, top=2, left=2, size=4):
    M = torch.zeros(B, H, W)
    M[:, top : top + size, left : left + size] = 1
    return M


# ---------------------------------------------------------------- region_loss
@pytest.mark.parametrize("dtype", DTYPES)
def test_region_zero_when_only_inside_changes(dtype):
    g = torch.Generator().manual_seed(0)
    I0 = torch.rand(2, 3, 8, 8, generator=g, dtype=dtype)
    M = _square_mask(2, 8, 8).to(dtype)
    I = I0 + M[:, None] * torch.randn(2, 3, 8, 8, generator=g, dtype=dtype) * 5
    assert torch.equal(region_loss(I, I0, M), torch.zeros(2, dtype=dtype))


def test_region_reference_value():
    I0 = torch.zeros(1, 1, 2, 2)
    I = torch.tensor([[[[3.0, 4.0], [1.0, 0.0]]]])
    M = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # bottom row may change
    torch.testing.assert_close(region_loss(I, I0, M), torch.tensor([5.0]))  # unsquared: sqrt(9 + 16)


def test_region_gradient_zero_inside_mask():
    g = torch.Generator().manual_seed(1)
    I0 = torch.rand(2, 3, 8, 8, generator=g)
    I = torch.rand(2, 3, 8, 8, generator=g).requires_grad_()
    M = _square_mask(2, 8, 8)
    region_loss(I, I0, M).sum().backward()
    inside = M[:, None].expand_as(I).bool()
    assert torch.isfinite(I.grad).all()
    assert (I.grad[inside] == 0).all()
    assert (I.grad[~inside] != 0).any()


@pytest.mark.parametrize("M", [torch.zeros(1, 8, 8), _square_mask(1, 8, 8)])
def test_region_gradient_finite_when_equal(M):
    I0 = torch.rand(2, 3, 8, 8)
    I = I0.clone().requires_grad_()
    loss = region_loss(I, I0, M)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros(2))
    assert torch.isfinite(I.grad).all() and (I.grad == 0).all()


def test_region_keeps_a_nan_outside_the_mask():
    # A NaN must reach the loss (the trainers' non-finite check), not turn into a region of 0.
    I0 = torch.rand(2, 3, 8, 8)
    I = I0.clone()
    I[1, 0, 0, 0] = float("nan")
    loss = region_loss(I, I0, _square_mask(1, 8, 8))
    assert loss[0] == 0 and torch.isnan(loss[1])


def test_region_broadcast_and_mask_layouts():
    I0, I = torch.rand(3, 4, 8, 8), torch.rand(3, 4, 8, 8)
    M1 = _square_mask(1, 8, 8)
    expected = region_loss(I, I0, M1.expand(3, 8, 8))
    torch.testing.assert_close(region_loss(I, I0, M1), expected)
    torch.testing.assert_close(region_loss(I, I0, M1[:, None]), expected)
    assert expected.shape == (3,)


def test_region_mask_size_mismatch():
    with pytest.raises(ValueError, match=r"mask M.*4x4.*8x8|mask M.*8x8.*4x4"):
        region_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.ones(1, 4, 4))


@pytest.mark.parametrize(
    "M, match",
    [
        (torch.ones(2, 8, 8), "batch"),
        (torch.ones(3, 3, 8, 8), "mask M"),
        (torch.full((1, 8, 8), 2.0), r"\[0,1\]"),
    ],
)
def test_region_bad_masks(M, match):
    with pytest.raises(ValueError, match=match):
        region_loss(torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8), M)


def test_region_half_precision_does_not_overflow():
    I0 = torch.zeros(1, 3, 256, 256, dtype=torch.float16)
    loss = region_loss(I0 + 1, I0, torch.zeros(1, 256, 256))  # sum of squares 196608 > fp16 max
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([(3 * 256 * 256) ** 0.5]))


def test_region_bad_types():
    with pytest.raises(TypeError, match="image I"):
        region_loss([1.0], torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="I0"):
        region_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4), torch.ones(1, 8, 8))


def test_region_gradcheck():
    g = torch.Generator().manual_seed(2)
    I = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    I0 = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    M = torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(region_loss, (I, I0, M))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 6), st.integers(2, 6), st.integers(0, 2**16))
def test_region_property_bounds(B, C, H, W, seed):
    """0 <= region(M) <= region(M = 0) = ||I0 - I||_F, and M = 1 gives 0."""
    g = torch.Generator().manual_seed(seed)
    I0, I = torch.rand(B, C, H, W, generator=g), torch.rand(B, C, H, W, generator=g)
    M = torch.rand(B, H, W, generator=g)
    full = region_loss(I, I0, torch.zeros(1, H, W))
    torch.testing.assert_close(full, (I0 - I).flatten(1).norm(dim=1))
    loss = region_loss(I, I0, M)
    assert (loss >= 0).all() and (loss <= full + 1e-6).all()
    assert (region_loss(I, I0, torch.ones(1, H, W)) == 0).all()


# ---------------------------------------------------------------- resize_mask
def test_resize_mask_blocks_and_range():
    M = _square_mask(2, 16, 16, top=0, left=0, size=8)
    m = resize_mask(M, (2, 2))
    assert m.shape == (2, 1, 2, 2)
    torch.testing.assert_close(m[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_resize_mask_keeps_a_thin_stroke_free():
    """A 3-px "may change" stroke on a 64-px mask stays 1 at latent size 8: averaged (0.375) the region term
    would still hold 62 % of the region it should free (FixConfig(mask_space="latent"))."""
    M = torch.zeros(1, 64, 64)
    M[:, :, 30:33] = 1
    m = resize_mask(M, 8)
    assert m.max() == 1 and m[0, 0, :, 3:5].min() == 1 and m[0, 0, :, :3].max() == 0
    up = resize_mask(torch.eye(4)[None], 16)  # enlarging interpolates, in [0, 1]
    assert up.shape == (1, 1, 16, 16) and 0 < up.mean() < 1
    m = resize_mask(torch.rand(1, 1, 17, 13), 5)
    assert m.shape == (1, 1, 5, 5) and m.min() >= 0 and m.max() <= 1


def test_resize_mask_errors():
    with pytest.raises(ValueError, match="mask M"):
        resize_mask(torch.ones(1, 2, 8, 8), 4)
    with pytest.raises(ValueError, match="size"):
        resize_mask(torch.ones(1, 8, 8), (0, 4))


# ---------------------------------------------------------------- reward_loss
def test_reward_loss_value_and_errors():
    torch.testing.assert_close(reward_loss(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(-2.0))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scores"):
            reward_loss(torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="scores"):
        reward_loss(torch.ones(2, 2))


def test_reward_loss_target_stops_the_push_per_image():
    """With a target, an image above it adds no gradient; the others are pushed as without one."""
    s = torch.tensor([1.0, 3.0, 2.5], requires_grad=True)
    loss = reward_loss(s, target=2.0)
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(-5.0 / 3))
    torch.testing.assert_close(s.grad, torch.tensor([-1 / 3, 0.0, 0.0]))


def test_reward_loss_gradcheck():
    s = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reward_loss, (s,))


# ---------------------------------------------------------------- separate_loss
def _blob(h, w, cy, cx, s=1.5, dtype=torch.float64):
    y, x = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s**2))


def test_separate_matches_paper_two_objects():
    """N = 2: max_p A1 A2 / (A1 + A2), as in the reference code, with both reductions."""
    g = torch.Generator().manual_seed(3)
    A = torch.rand(2, 2, 16, 16, generator=g)
    ref = torch.stack([(a[0] * a[1] / (a[0] + a[1])).max() for a in A])
    torch.testing.assert_close(separate_loss(A), ref)
    torch.testing.assert_close(separate_loss(A, reduction="max"), ref)


def test_separate_decreases_when_maps_move_apart():
    losses = []
    for dx in (0, 3, 6, 9):
        A = torch.stack([_blob(16, 16, 8, 3), _blob(16, 16, 8, 3 + dx)])[None]
        losses.append(separate_loss(A).item())
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_separate_three_objects_all_pairs():
    A = torch.stack([_blob(16, 16, 4, 4), _blob(16, 16, 4, 5), _blob(16, 16, 12, 12)])[None]
    pair = lambda a, b: separate_loss(torch.stack([a, b])[None]).item()  # noqa: E731
    p01, p02, p12 = pair(A[0, 0], A[0, 1]), pair(A[0, 0], A[0, 2]), pair(A[0, 1], A[0, 2])
    assert math.isclose(separate_loss(A).item(), (p01 + p02 + p12) / 3, rel_tol=1e-12)
    assert math.isclose(separate_loss(A, reduction="max").item(), max(p01, p02, p12), rel_tol=1e-12)
    assert p01 > 10 * max(p02, p12)  # the overlapping pair dominates


def test_separate_safe_at_zero():
    A = torch.zeros(1, 2, 4, 4, requires_grad=True)
    loss = separate_loss(A)
    loss.sum().backward()
    assert loss.item() == 0 and torch.isfinite(A.grad).all()


def test_separate_keeps_a_nan_map():
    A = torch.rand(2, 2, 4, 4)
    A[1, 0, 0, 0] = float("nan")
    loss = separate_loss(A)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def test_separate_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        separate_loss(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="reduction"):
        separate_loss(torch.rand(1, 2, 4, 4), reduction="sum")
    with pytest.raises(ValueError, match=r"\[B,N,h,w\]"):
        separate_loss(torch.rand(2, 4, 4))


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_separate_gradcheck(reduction):
    g = torch.Generator().manual_seed(4)
    A = (torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: separate_loss(a, reduction), (A,))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**16))
def test_separate_property_bounds(N, seed):
    """0 <= overlap <= min(A_i, A_j) / 2 <= max(A) / 2, and it is symmetric in the objects."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(2, N, 4, 4, generator=g)
    L = separate_loss(A)
    assert (L >= 0).all() and (L <= A.flatten(1).amax(1) / 2 + 1e-6).all()
    torch.testing.assert_close(separate_loss(A.flip(1)), L)


# ---------------------------------------------------------------- enhance_loss
def test_enhance_peaked_lower_than_flat():
    peaked = torch.zeros(1, 2, 16, 16)
    peaked[:, :, 4:8, 4:8] = 0.9
    flat = torch.full((1, 2, 16, 16), 0.9 * 16 / 256)  # same total attention, spread out
    assert enhance_loss(peaked).item() < enhance_loss(flat).item()
    torch.testing.assert_close(enhance_loss(peaked), torch.tensor([1 - 0.9]))


def test_enhance_uses_weakest_object():
    A = torch.zeros(1, 2, 8, 8)
    A[0, 0] = 0.8
    A[0, 1] = 0.3
    torch.testing.assert_close(enhance_loss(A), torch.tensor([0.7]))  # 1 - min(0.8, 0.3)


def test_enhance_single_pixel_reference():
    """A lone peak of 1 is spread by the 3x3 Gaussian: its centre keeps w0^2, w0 = 1 / (1 + 2 e^{-2})."""
    A = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    A[0, 0, 4, 4] = 1
    w0 = 1 / (1 + 2 * math.exp(-1 / (2 * 0.5**2)))
    torch.testing.assert_close(enhance_loss(A), torch.tensor([1 - w0**2], dtype=torch.float64))


def test_enhance_errors():
    with pytest.raises(ValueError, match="N >= 1"):
        enhance_loss(torch.rand(1, 0, 4, 4))
    with pytest.raises(ValueError, match="sigma"):
        enhance_loss(torch.rand(1, 2, 4, 4), sigma=0.0)


def test_enhance_gradcheck():
    g = torch.Generator().manual_seed(5)
    A = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(enhance_loss, (A,))


# ---------------------------------------------------------------- preservation_loss
def test_preservation_value_and_detach():
    x0 = torch.ones(2, 4, 3, 3, requires_grad=True)
    base = torch.zeros(2, 4, 3, 3, requires_grad=True)
    loss = preservation_loss(x0, base)
    torch.testing.assert_close(loss, torch.ones(2))
    loss.sum().backward()
    assert base.grad is None and x0.grad is not None
    with pytest.raises(ValueError, match="x0_base"):
        preservation_loss(x0, torch.zeros(2, 4, 3, 2))


def test_preservation_gradcheck():
    x0 = torch.rand(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    base = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(preservation_loss, (x0, base))


# ---------------------------------------------------------------- key_change_loss
def test_key_change_value_per_prompt():
    d1, d2 = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    d1[0] = 1.0                      # prompt 0: 12 in layer 1
    d2[1, 0, 0] = 2.0                # prompt 1: 4 in layer 2
    loss = key_change_loss([d1, d2], torch.tensor([24.0, 8.0]))
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.5]))
    assert key_change_loss([torch.zeros(2, 3, 4)], torch.ones(2)).eq(0).all()


@pytest.mark.parametrize("deltas, energy, match", [
    ([], torch.ones(2), "deltas is empty"),
    ([torch.ones(2, 3, 4)], torch.tensor([1.0, 0.0]), "base_energy must be"),
    ([torch.ones(2, 3, 4)], torch.tensor([1.0, float("nan")]), "base_energy must be"),
    ([torch.ones(3, 3, 4)], torch.ones(2), "P = 2 rows"),
])
def test_key_change_errors_name_the_input(deltas, energy, match):
    with pytest.raises(ValueError, match=match):
        key_change_loss(deltas, energy)


def test_key_change_reads_no_values_when_told_they_were_checked():
    """check_energy=False: nothing is read on the host (no device sync per step); meta tensors have no values."""
    d, energy = torch.ones(2, 3, 4, device="meta"), torch.ones(2, device="meta")
    out = key_change_loss([d], energy, check_energy=False)
    assert out.shape == (2,) and out.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # the default check reads the values
        key_change_loss([d], energy)


def test_key_change_gradcheck():
    d = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    energy = torch.rand(2, dtype=torch.float64) + 1
    assert torch.autograd.gradcheck(lambda x: key_change_loss([x], energy).double(), (d,))


# ---------------------------------------------------------------- review: per-image masks (mutation L12)
def test_region_per_image_mask_gives_each_image_its_own_loss():
    """With a mask per image, image b's loss reads M[b] only: it equals its single-image loss and, with
    I = I0 + 1, exactly sqrt(C * held pixels of M[b]). (A mask averaged over the batch passed every other test.)"""
    B, C, H, W = 3, 3, 6, 8
    I0 = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    I = I0 + 1
    M = torch.zeros(B, H, W, dtype=torch.float64)
    M[0, :, : W // 2] = 1   # left half may change: 24 pixels held
    M[1, :2] = 1            # top two rows: 32 held
    # M[2] empty: all 48 held
    loss = region_loss(I, I0, M)
    held = [24, 32, 48]
    for b in range(B):
        assert int((M[b] == 0).sum()) == held[b]
        torch.testing.assert_close(loss[b : b + 1], region_loss(I[b : b + 1], I0[b : b + 1], M[b : b + 1]))
        assert loss[b].item() == pytest.approx(math.sqrt(C * held[b]), rel=1e-9)


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def test_region_refuses_a_negative_mask():
    """A mask below 0 would weight the held pixels by 1 - M > 1: refused like a mask above 1."""
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        region_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.full((1, 8, 8), -0.5))


def test_resize_mask_enlarged_stays_in_0_1_and_region_loss_accepts_it():
    """Bilinear weights of an all-ones mask can sum to 1 + 1 ulp (3x3 -> 7x7 does): the result must still lie in
    [0,1], or region_loss refuses the resized mask."""
    M = resize_mask(torch.ones(1, 3, 3), 7)
    assert M.shape == (1, 1, 7, 7) and M.min() >= 0 and M.max() <= 1
    I0 = torch.rand(1, 3, 7, 7)
    assert region_loss(I0 + 1, I0, M).item() < 1e-5  # everything may change


def test_reward_loss_refuses_no_scores():
    """The mean of no scores is NaN: refused up front, as the docstring says (a non-empty [B] tensor)."""
    with pytest.raises(ValueError, match="non-empty"):
        reward_loss(torch.empty(0))


@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (1, 1, 4, 1)])
def test_enhance_refuses_a_map_one_pixel_thin(shape):
    """The 3x3 reflect blur needs 2 pixels along both sides: a ValueError naming the size, not kornia's error."""
    with pytest.raises(ValueError, match="2x2"):
        enhance_loss(torch.rand(*shape))


def test_overlap_and_peaks_two_words_hand_values():
    """Two words: the overlap is separate_loss's max_p A1 A2 / (A1 + A2); each peak is that word's own blurred max
    (3x3 Gaussian, sigma 0.5: centre weight w0^2, diagonal w1^2, w0 = 1 / (1 + 2 e^-2), w1 = w0 e^-2)."""
    A = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    A[0, 0, 1, 1] = 0.8
    A[0, 1, 1, 1] = 0.2
    A[0, 1, 2, 2] = 0.6
    overlap, peaks = overlap_and_peaks(A)
    w0 = 1 / (1 + 2 * math.exp(-2))
    w1 = w0 * math.exp(-2)
    assert overlap == pytest.approx(0.8 * 0.2 / (0.8 + 0.2))
    assert peaks == pytest.approx([0.8 * w0**2, 0.6 * w0**2 + 0.2 * w1**2])
