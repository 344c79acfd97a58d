"""Property tests (hypothesis) for the Separate-and-Enhance losses and the preservation terms
(focusfix_core/losses.py: `separate_loss`, `enhance_loss`, `preservation_loss`, `key_change_loss`) beyond
tests/test_losses.py, and for `StepRecord` (focusfix_core/records.py) beyond tests/test_properties3_cli.py.
The bugs found are fixed; their tests say so ("Fixed, was BUG n")."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focusfix_core.losses import enhance_loss, key_change_loss, preservation_loss, separate_loss
from focusfix_core.records import StepRecord

FAST = settings(max_examples=80, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])


def _maps(B, N, h, w, seed, dtype=torch.float64, sparse=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(B, N, h, w, generator=g, dtype=dtype)
    if sparse:
        A = A * (torch.rand(B, N, h, w, generator=g, dtype=dtype) > 0.6)
    return A


MAPS = st.tuples(st.integers(1, 3), st.integers(2, 5), st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**16),
                 st.booleans())


# ------------------------------------------------------------------------------------------- separate_loss
@FAST
@given(m=MAPS, data=st.data(), reduction=st.sampled_from(["mean", "max"]))
def test_separate_does_not_depend_on_the_order_of_the_objects(m, data, reduction):
    B, N, h, w, seed, sparse = m
    A = _maps(B, N, h, w, seed, sparse=sparse)
    perm = data.draw(st.permutations(list(range(N))))
    got = separate_loss(A[:, perm], reduction)
    if reduction == "max":
        assert torch.equal(got, separate_loss(A, reduction))
    else:
        torch.testing.assert_close(got, separate_loss(A, reduction))


@FAST
@given(m=MAPS, reduction=st.sampled_from(["mean", "max"]))
def test_separate_is_zero_exactly_for_maps_that_never_share_a_pixel(m, reduction):
    B, N, h, w, seed, _ = m
    A = _maps(B, N, h, w, seed)
    owner = torch.randint(0, N + 1, (B, 1, h, w), generator=torch.Generator().manual_seed(seed + 1))
    disjoint = A * (owner == torch.arange(N)[None, :, None, None])  # each pixel lit in one map at most
    assert torch.equal(separate_loss(disjoint, reduction), torch.zeros(B, dtype=A.dtype))
    assert (separate_loss(A, reduction) >= 0).all()


@FAST
@given(m=MAPS, c=st.floats(1e-3, 1e3), reduction=st.sampled_from(["mean", "max"]))
def test_separate_scales_with_the_maps_and_stays_below_a_quarter_of_the_pairs_peak_sum(m, c, reduction):
    B, N, h, w, seed, sparse = m
    A = _maps(B, N, h, w, seed, sparse=sparse)
    L = separate_loss(A, reduction)
    torch.testing.assert_close(separate_loss(A * c, reduction), L * c)  # homogeneous of degree 1
    # a b / (a + b) <= min(a, b) and <= (a + b) / 4, pixel by pixel
    i, j = torch.triu_indices(N, N, 1)
    pair_max = torch.minimum((A[:, i] + A[:, j]).flatten(2).amax(2) / 4,
                             torch.minimum(A[:, i], A[:, j]).flatten(2).amax(2))  # (B, P)
    assert (L <= (pair_max.amax(1) if reduction == "max" else pair_max.mean(1)) + 1e-12).all()


@FAST
@given(B=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_two_identical_maps_overlap_by_half_their_peak(B, h, w, seed):
    a = _maps(B, 1, h, w, seed)
    L = separate_loss(torch.cat([a, a], 1))
    torch.testing.assert_close(L, a.flatten(1).amax(1) / 2)


@FAST
@given(m=MAPS, extra=st.integers(1, 3))
def test_an_empty_object_map_lowers_the_mean_and_leaves_the_max(m, extra):
    B, N, h, w, seed, sparse = m
    A = _maps(B, N, h, w, seed, sparse=sparse)
    more = torch.cat([A, torch.zeros(B, extra, h, w, dtype=A.dtype)], 1)
    assert torch.equal(separate_loss(more, "max"), separate_loss(A, "max"))
    P, P2 = N * (N - 1) / 2, (N + extra) * (N + extra - 1) / 2
    torch.testing.assert_close(separate_loss(more, "mean"), separate_loss(A, "mean") * P / P2)


@FAST
@given(m=MAPS, reduction=st.sampled_from(["mean", "max"]), dtype=DTYPES)
def test_each_samples_loss_is_its_own(m, reduction, dtype):
    B, N, h, w, seed, sparse = m
    A = _maps(B, N, h, w, seed, dtype, sparse)
    L = separate_loss(A, reduction)
    assert L.shape == (B,) and L.dtype == dtype
    for b in range(B):
        torch.testing.assert_close(separate_loss(A[b:b + 1], reduction), L[b:b + 1])


# Fixed, was BUG 5: maps with no pixel ([B,N,0,w] or [B,N,h,0]) pass separate_loss's checks and raise IndexError from inside
# torch ("amax(): Expected reduction dim 2 to have non-zero size"); enhance_loss refuses the same maps with a clear
# ValueError ("must be at least 2x2"), and attention.overlay_maps raises the same IndexError for them. Minimal input:
# separate_loss(torch.zeros(1, 2, 0, 3)).
@FAST
@given(h=st.integers(0, 3), w=st.integers(0, 3))
def test_separate_of_maps_without_pixels_is_refused_by_name(h, w):
    if h * w:
        return
    with pytest.raises(ValueError, match="attention maps A"):
        separate_loss(torch.zeros(1, 2, h, w))


# ------------------------------------------------------------------------------------------- enhance_loss
ENH = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 7), st.integers(2, 7), st.integers(0, 2**16),
                st.booleans())


@FAST
@given(m=ENH, c=st.floats(1e-3, 1e3), sigma=st.floats(0.05, 10))
def test_enhance_is_one_minus_the_weakest_peak_and_scales_as_that(m, c, sigma):
    B, N, h, w, seed, sparse = m
    A = _maps(B, N, h, w, seed, sparse=sparse)
    L = enhance_loss(A, sigma)
    assert L.shape == (B,) and (L <= 1 + 1e-12).all()
    torch.testing.assert_close(enhance_loss(A * c, sigma), 1 - c * (1 - L))  # the blur is linear


@FAST
@given(B=st.integers(1, 3), N=st.integers(1, 4), h=st.integers(2, 7), w=st.integers(2, 7), c=st.floats(0, 5),
       sigma=st.floats(0.05, 10))
def test_a_flat_map_of_value_c_gives_one_minus_c(B, N, h, w, c, sigma):
    A = torch.full((B, N, h, w), c, dtype=torch.float64)
    torch.testing.assert_close(enhance_loss(A, sigma), torch.full((B,), 1 - c, dtype=torch.float64))


@FAST
@given(m=ENH, data=st.data(), bump=st.floats(0, 3), sigma=st.floats(0.05, 10))
def test_enhance_never_rises_when_a_map_gets_stronger_or_an_object_is_dropped(m, data, bump, sigma):
    B, N, h, w, seed, sparse = m
    A = _maps(B, N, h, w, seed, sparse=sparse)
    L = enhance_loss(A, sigma)
    b, i = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, N - 1))
    y, x = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    stronger = A.clone()
    stronger[b, i, y, x] += bump
    assert (enhance_loss(stronger, sigma) <= L + 1e-12).all()
    if N > 1:  # min over fewer objects
        keep = [k for k in range(N) if k != i]
        assert (enhance_loss(A[:, keep], sigma) <= L + 1e-12).all()
    perm = data.draw(st.permutations(list(range(N))))
    assert torch.equal(enhance_loss(A[:, perm], sigma), L)


@FAST
@given(sigma=st.sampled_from([0.0, -1.0, math.nan, -math.inf]))
def test_enhance_refuses_a_sigma_that_is_not_positive(sigma):
    with pytest.raises(ValueError, match="sigma must be > 0"):
        enhance_loss(torch.rand(1, 2, 4, 4), sigma)


# Fixed, was BUG 6: a finite sigma above float32's largest value (e.g. 1e200) passes `not sigma > 0` and raises RuntimeError from
# inside kornia ("value cannot be converted to type float without overflow"), while sigma = inf is taken (a flat 3x3
# kernel); the same class as the lr beyond float32 the CLI fixed (was BUG 9). Minimal input:
# enhance_loss(torch.rand(1, 2, 4, 4), sigma=1e200).
@FAST
@given(sigma=st.floats(3.5e38, 1e308))
def test_any_positive_sigma_gives_values_or_a_valueerror_naming_it(sigma):
    try:
        L = enhance_loss(torch.rand(1, 2, 4, 4), sigma)
    except ValueError as e:
        assert "sigma" in str(e)
    else:
        assert torch.isfinite(L).all()


# ------------------------------------------------------------------------------------------- preservation_loss
@FAST
@given(B=st.integers(1, 3), C=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**16),
       c=st.floats(-10, 10), dtype=DTYPES)
def test_preservation_is_each_samples_mse_zero_for_equal_outputs_and_grads_only_the_adapted(B, C, h, w, seed, c,
                                                                                             dtype):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, h, w, generator=g, dtype=dtype).requires_grad_(True)
    base = torch.randn(B, C, h, w, generator=g, dtype=dtype).requires_grad_(True)
    L = preservation_loss(x0, base)
    assert L.shape == (B,) and L.dtype == dtype
    torch.testing.assert_close(L, ((x0 - base) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(preservation_loss(base, x0), L)  # symmetric in value
    assert torch.equal(preservation_loss(x0, x0), torch.zeros(B, dtype=dtype))
    torch.testing.assert_close(preservation_loss(x0 + c, base + c), L)  # a shared shift does not count
    L.sum().backward()
    assert base.grad is None and x0.grad is not None  # the base output is a constant target


@FAST
@given(a=st.sampled_from([(2, 3), (2, 3, 4), (4,), (2, 3, 4, 5)]), b=st.sampled_from([(2, 3), (3, 3), (2, 3, 4, 6),
                                                                                        (4,), (1, 3, 4, 5)]))
def test_preservation_refuses_outputs_of_another_shape(a, b):
    if a == b and len(a) >= 2:
        assert preservation_loss(torch.rand(a), torch.rand(b)).shape == (a[0],)
    else:
        with pytest.raises(ValueError, match="x0_base must have the shape of x0"):
            preservation_loss(torch.rand(a), torch.rand(b))


# ------------------------------------------------------------------------------------------- key_change_loss
@st.composite
def _key_case(draw):
    P, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    T = draw(st.integers(1, 5))
    shapes = [(P, T, draw(st.integers(1, 6))) for _ in range(n)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    deltas = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    energy = torch.rand(P, generator=g, dtype=torch.float64) * 10 + 0.1
    return deltas, energy


@FAST
@given(case=_key_case(), c=st.floats(-100, 100))
def test_key_change_is_quadratic_in_the_deltas_and_additive_over_layers(case, c):
    deltas, energy = case
    L = key_change_loss(deltas, energy)
    assert L.shape == energy.shape and (L >= 0).all()
    torch.testing.assert_close(key_change_loss([d * c for d in deltas], energy), L * c * c)
    parts = sum(key_change_loss([d], energy) for d in deltas)
    torch.testing.assert_close(parts, L)
    # one layer's channels split in two layers: the same change
    d0 = deltas[0]
    split = [d0[..., : d0.shape[-1] // 2], d0[..., d0.shape[-1] // 2:], *deltas[1:]]
    torch.testing.assert_close(key_change_loss([s for s in split if s.shape[-1]], energy), L)
    torch.testing.assert_close(key_change_loss(deltas, energy * 2), L / 2)
    torch.testing.assert_close(key_change_loss(deltas, energy, check_energy=False), L)


@FAST
@given(case=_key_case(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_key_change_of_half_precision_deltas_is_summed_in_float32(case, dtype):
    deltas, energy = case
    big = [(d * 300).to(dtype) for d in deltas]  # squares above fp16's 65504
    L = key_change_loss(big, energy)
    assert torch.isfinite(L).all() and L.dtype == torch.float32
    torch.testing.assert_close(L, key_change_loss([d.double() for d in big], energy).float(), rtol=1e-5, atol=0)


@FAST
@given(case=_key_case(), bad=st.sampled_from([0.0, -1.0, math.nan, math.inf]), data=st.data())
def test_key_change_refuses_a_base_energy_that_is_not_finite_and_positive(case, bad, data):
    deltas, energy = case
    energy = energy.clone()
    energy[data.draw(st.integers(0, len(energy) - 1))] = bad
    with pytest.raises(ValueError, match="base_energy must be"):
        key_change_loss(deltas, energy)


@FAST
@given(case=_key_case(), extra=st.integers(1, 3))
def test_key_change_refuses_deltas_of_another_prompt_count_naming_them(case, extra):
    deltas, energy = case
    bad = deltas + [torch.zeros(len(energy) + extra, 2, 2, dtype=torch.float64)]
    with pytest.raises(ValueError, match=f"P = {len(energy)} rows"):
        key_change_loss(bad, energy)
    with pytest.raises(ValueError, match="deltas is empty"):
        key_change_loss([], energy)
    with pytest.raises(TypeError, match="base_energy must be a torch.Tensor"):
        key_change_loss(deltas, energy.tolist())


# Fixed, was BUG 7: key_change_loss raises IndexError from inside its own shape code for two inputs it is meant to refuse by
# name: a 0-dim base_energy (`P = base_energy.shape[0]` runs before the `ndim != 1` check: "tuple index out of
# range") and a delta with one dimension, [P] (only `ndim < 1` is refused; `flatten(1)` then fails with "Dimension
# out of range"). Minimal inputs: key_change_loss([torch.ones(1, 2, 3)], torch.tensor(5.0));
# key_change_loss([torch.ones(2)], torch.tensor([1.0, 2.0])).
@FAST
@given(which=st.sampled_from(["energy", "delta"]))
def test_key_change_refuses_a_scalar_energy_or_a_flat_delta_by_name(which):
    with pytest.raises(ValueError, match="base_energy" if which == "energy" else "deltas"):
        if which == "energy":
            key_change_loss([torch.ones(1, 2, 3)], torch.tensor(5.0))
        else:
            key_change_loss([torch.ones(2)], torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------------------------------- StepRecord
OPTIONAL = st.none() | st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def records(draw):
    return StepRecord(step=draw(st.integers(0, 10**6)), total=draw(st.integers(1, 10**6)),
                      loss=draw(st.floats(allow_nan=True, allow_infinity=True)),
                      grad_norm=draw(st.floats(allow_nan=True, allow_infinity=True)),
                      seconds=draw(st.floats(0, 1e6)), reward=draw(OPTIONAL), region=draw(OPTIONAL),
                      separate=draw(OPTIONAL), enhance=draw(OPTIONAL), preserve=draw(OPTIONAL),
                      loss_scale=draw(st.none() | st.floats(1, 2**24)))


@FAST
@given(rec=records(), field=st.sampled_from([f.name for f in dataclasses.fields(StepRecord)]))
def test_a_step_record_is_frozen_and_its_dict_holds_every_field(rec, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(rec, field, 0)
    d = rec.as_dict()
    assert list(d) == [f.name for f in dataclasses.fields(StepRecord)]
    assert all(d[k] is getattr(rec, k) or d[k] == getattr(rec, k) or d[k] != d[k] for k in d)
    d[field] = "changed"  # a copy: the record is untouched
    assert rec.as_dict()[field] != "changed"


@FAST
@given(rec=records())
def test_a_step_records_summary_shows_the_terms_in_order_with_four_decimals(rec):
    s = rec.summary()
    parts = s.split("  ")
    assert parts[1] == f"loss {rec.loss:.4f}" and parts[-1] == f"{rec.seconds:.2f}s"
    shown = [p.split(" ")[0] for p in parts[2:-1] if not p.startswith("update skipped")]
    assert shown == [n for n in ("reward", "region", "separate", "enhance", "preserve") if getattr(rec, n) is not None]
    for n in shown:
        assert f"{n} {getattr(rec, n):.4f}" in parts
    assert rec.skipped == (not math.isfinite(rec.grad_norm))
