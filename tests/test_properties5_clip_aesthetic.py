"""Property tests (hypothesis) for CLIP preprocessing (rewards/clip_vision.py `clip_preprocess`) and the LAION
aesthetic MLP head (rewards/aesthetic.py `AestheticHead`): any image size or aspect gives [B,3,size,size],
finite, per image; the head maps [B,D] -> [B,1] and survives a state-dict round trip in both variants."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focusfix_core.rewards.aesthetic import HEAD_VARIANTS, AestheticHead, head_variant, is_aesthetic_head
from focusfix_core.rewards.clip_vision import CLIP_MEAN, CLIP_STD, clip_preprocess

FAST = settings(max_examples=30, deadline=None)
MEAN, STD = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
BOUND = float(((torch.tensor([0.0, 1.0]).view(2, 1) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).abs().max())


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 90), W=st.integers(1, 90), size=st.integers(1, 40),
       seed=st.integers(0, 2**31), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_any_size_and_aspect_gives_b3ss_finite_per_image(B, H, W, size, seed, dtype):
    I = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x = clip_preprocess(I, size=size)
    assert x.shape == (B, 3, size, size) and x.dtype == dtype and torch.isfinite(x).all()
    # bicubic overshoots a little at edges, never wildly: values stay near the normalised [0,1] range
    assert x.abs().max() <= 2 * BOUND
    torch.testing.assert_close(clip_preprocess(I[-1:], size=size), x[-1:], rtol=1e-5, atol=1e-5)


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 60), W=st.integers(1, 60), size=st.integers(1, 32),
       c=st.floats(0, 1))
def test_a_constant_image_stays_constant_and_is_normalised_with_clip_statistics(B, H, W, size, c):
    I = torch.full((B, 3, H, W), c, dtype=torch.float64)
    x = clip_preprocess(I, size=size)
    want = ((torch.full((1, 3, 1, 1), c, dtype=torch.float64) - MEAN.double()) / STD.double()).expand_as(x)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


@FAST
@given(B=st.integers(1, 3), size=st.integers(1, 32), seed=st.integers(0, 2**31))
def test_an_image_already_at_size_is_only_normalised(B, size, seed):
    I = torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(clip_preprocess(I, size=size), (I - MEAN) / STD)


@FAST
@given(H=st.integers(2, 40), W=st.integers(2, 40), size=st.integers(2, 24), seed=st.integers(0, 2**31))
def test_gradients_reach_every_image_finite_and_per_image(H, W, size, seed):
    I = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(clip_preprocess(I, size=size)[0].sum(), I)
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0 and torch.equal(g[1], torch.zeros_like(g[1]))


WIDTHS = st.tuples(*[st.integers(1, 12)] * 5)


@FAST
@given(widths=WIDTHS, variant=st.sampled_from(list(HEAD_VARIANTS)), B=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_the_head_maps_b_d_to_b_1_finite_deterministic_and_per_row(widths, variant, B, seed):
    torch.manual_seed(seed % 1000)
    head = AestheticHead(widths, variant).eval()
    e = torch.nn.functional.normalize(torch.randn(B, widths[0], generator=torch.Generator().manual_seed(seed)), dim=-1)
    y = head(e)
    assert y.shape == (B, 1) and torch.isfinite(y).all()
    assert torch.equal(head(e), y)  # dropouts are identities: deterministic
    torch.testing.assert_close(head(e[-1:]), y[-1:])


@FAST
@given(widths=WIDTHS, variant=st.sampled_from(list(HEAD_VARIANTS)), seed=st.integers(0, 2**31),
       extra=st.booleans())
def test_a_heads_state_dict_round_trips_in_either_variant_and_other_keys_are_ignored(widths, variant, seed, extra):
    torch.manual_seed(seed % 1000)
    head = AestheticHead(widths, variant).eval()
    sd = dict(head.state_dict())
    if extra:
        sd["vision_model.post_layernorm.weight"] = torch.ones(3)
    assert head_variant(sd) == variant and is_aesthetic_head(sd)
    back = AestheticHead.from_state_dict(sd)
    assert back.widths == tuple(widths) and back.variant == variant and not back.training
    e = torch.randn(3, widths[0])
    torch.testing.assert_close(back(e), head(e))


@FAST
@given(widths=WIDTHS, variant=st.sampled_from(list(HEAD_VARIANTS)), data=st.data())
def test_a_head_weight_of_the_wrong_shape_or_a_missing_key_is_a_value_error_naming_it(widths, variant, data):
    sd = dict(AestheticHead(widths, variant).state_dict())
    key = data.draw(st.sampled_from(sorted(sd)))
    if data.draw(st.booleans()):
        sd[key] = torch.zeros(*[n + 1 for n in sd[key].shape])
        # widths are read from the weights, so the culprit may be a neighbour whose shape no longer chains
        with pytest.raises(ValueError, match=r"aesthetic head weight 'layers\.\d+\.(weight|bias)' must have shape"):
            AestheticHead.from_state_dict(sd)
    else:
        del sd[key]
        assert head_variant(sd) is None
        with pytest.raises(ValueError, match="aesthetic head must have keys"):
            AestheticHead.from_state_dict(sd)


@settings(max_examples=20, deadline=None)
@given(widths=st.tuples(st.integers(-2, 8), *[st.integers(1, 8)] * 4) | st.lists(st.integers(1, 8), max_size=7).map(tuple),
       variant=st.sampled_from(["linear", "relu", "gelu", ""]))
def test_bad_widths_or_variant_are_value_errors_naming_them(widths, variant):
    good = len(widths) == 5 and all(w > 0 for w in widths)
    if good and variant in HEAD_VARIANTS:
        assert AestheticHead(widths, variant).in_dim == widths[0]
    else:
        with pytest.raises(ValueError, match="widths" if not good else "variant"):
            AestheticHead(widths, variant)
