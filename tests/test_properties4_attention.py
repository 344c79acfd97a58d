"""Property tests (hypothesis) for focusfix_core/attention.py: `AttentionStore` (maps of words that cover every
token sum to 1 at each pixel, for any batch, CFG multiple, heads, map shape, repeated contexts and "any" resolution),
`attention_capture` on the tiny model at any aspect ratio, `level_sizes` / `map_size`, and token index checks.
The bugs found are fixed; their tests say so ("Fixed, was BUG n")."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from focusfix_core.attention import AttentionStore, level_sizes, map_size

FAST = settings(max_examples=60, deadline=None)


def _partition(draw, T: int) -> list[list[int]]:
    """The token positions 0..T-1 cut into random words (each a list of positions, in a random order)."""
    perm = draw(st.permutations(list(range(T))))
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=T - 1))) if T > 1 else []
    return [list(perm[a:b]) for a, b in zip([0, *cuts], [*cuts, T])]


def _qk(Bq, N, T, heads, d, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Bq, N, heads * d, generator=g) * scale).to(dtype), \
        (torch.randn(Bq, T, heads * d, generator=g) * scale).to(dtype)


@st.composite
def _store_case(draw):
    B, cfg = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    heads, d = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    T = draw(st.integers(1, 9))
    words = [_partition(draw, T) for _ in range(B)]
    n = min(len(x) for x in words)
    # every item must have the same number of words: merge the extra words into the last kept one
    words = [x[:n - 1] + [sum(x[n - 1:], [])] for x in words]
    return B, cfg, heads, d, (h, w), T, words, draw(st.integers(0, 2**16)), draw(st.integers(1, 3)), \
        draw(st.booleans()), draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))


@FAST
@given(case=_store_case())
def test_maps_of_words_covering_every_token_sum_to_one_at_every_pixel(case):
    B, cfg, heads, d, (h, w), T, words, seed, layers, k_batch_1, dtype = case
    store = AttentionStore(words, resolution=(h, w), keep_grad=False)
    for i in range(layers):
        q, k = _qk(B * cfg, h * w, T, heads, d, seed + i, dtype, scale=3.0)
        store.add(q, k[:1] if k_batch_1 else k, heads, (h, w))
    A = store.maps()
    assert A.shape == (B, len(words[0]), h, w) and store.n_layers == layers
    assert A.dtype == torch.promote_types(dtype, torch.float32)  # the softmax in at least fp32
    assert float(A.min()) >= 0 and float(A.max()) <= 1 + 1e-6
    torch.testing.assert_close(A.sum(1), torch.ones(B, h, w, dtype=A.dtype))


@FAST
@given(case=_store_case(), data=st.data())
def test_a_word_is_the_sum_of_its_tokens_maps_and_only_the_cond_half_counts(case, data):
    B, cfg, heads, d, (h, w), T, words, seed, _, _, _ = case
    q, k = _qk(B * cfg, h * w, T, heads, d, seed)
    singles = AttentionStore([[[t] for t in range(T)]] * B, resolution=(h, w))
    singles.add(q, k, heads, (h, w))
    grouped = AttentionStore(words, resolution=(h, w))
    grouped.add(q, k, heads, (h, w))
    S, G = singles.maps(), grouped.maps()
    for b in range(B):
        for i, word in enumerate(words[b]):
            torch.testing.assert_close(G[b, i], S[b, word].sum(0))
    # the unconditional rows of a CFG batch (after the first B) never reach the maps
    if cfg > 1:
        q2, k2 = q.clone(), k.clone()
        q2[B:] = data.draw(st.floats(-5, 5))
        k2[B:] = -k2[B:]
        again = AttentionStore(words, resolution=(h, w))
        again.add(q2, k2, heads, (h, w))
        torch.testing.assert_close(again.maps(), G, rtol=0, atol=0)


@FAST
@given(B=st.integers(1, 3), Tb=st.data(), heads=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_repeated_contexts_of_each_items_own_length_still_sum_to_one(B, Tb, heads, h, w, seed):
    """cat_cond joins prompts of other lengths by repeating each row up to a common T: given each item's own
    length, a partition of that item's tokens still holds all of the probability."""
    lengths = [Tb.draw(st.sampled_from([1, 2, 3, 6])) for _ in range(B)]
    T = math.lcm(*lengths) * Tb.draw(st.integers(1, 2))
    words = [_partition(Tb.draw, n) for n in lengths]
    m = min(len(x) for x in words)
    words = [x[:m - 1] + [sum(x[m - 1:], [])] for x in words]
    store = AttentionStore(words, resolution=(h, w), context_lengths=lengths)
    q, k = _qk(B, h * w, T, heads, 2, seed)
    store.add(q, k, heads, (h, w))
    torch.testing.assert_close(store.maps().sum(1), torch.ones(B, h, w))


@FAST
@given(sizes=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=4),
       out=st.one_of(st.none(), st.tuples(st.integers(1, 8), st.integers(1, 8)), st.integers(1, 8)),
       T=st.integers(1, 6), seed=st.integers(0, 2**16), data=st.data())
def test_any_resolution_resizes_every_layer_to_one_size_keeping_the_sum(sizes, out, T, seed, data):
    words = [_partition(data.draw, T)]
    store = AttentionStore(words, resolution="any", out_size=out)
    for i, (h, w) in enumerate(sizes):
        q, k = _qk(1, h * w, T, 2, 2, seed + i)
        store.add(q, k, 2, (h, w))
    want = sizes[0] if out is None else (out, out) if isinstance(out, int) else out
    A = store.maps()
    assert A.shape == (1, len(words[0]), *want) and store.n_layers == len(sizes)
    torch.testing.assert_close(A.sum(1), torch.ones(1, *want))


@FAST
@given(keep=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=6), seed=st.integers(0, 99))
def test_only_layers_of_the_chosen_size_are_averaged_and_every_size_is_reported(keep, sizes, seed):
    store = AttentionStore([[[0], [1]]], resolution=keep)
    ref = AttentionStore([[[0], [1]]], resolution=keep)
    for i, (h, w) in enumerate(sizes):
        q, k = _qk(1, h * w, 3, 1, 2, seed + i)
        store.add(q, k, 1, (h, w))
        if (h, w) == keep:
            ref.add(q, k, 1, (h, w))
    assert store.resolutions_seen == sorted(set(sizes), reverse=True)
    assert store.n_layers == sum(s == keep for s in sizes)
    if keep in sizes:
        torch.testing.assert_close(store.maps(), ref.maps(), rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="no cross-attention layer ran at the map size"):
            store.maps()


@FAST
@given(case=st.sampled_from([
    ((2, 6, 4), (2, 3, 5), 2, (2, 3), "q must be"),          # channel counts differ
    ((2, 6, 4), (2, 3, 4), 2, (2, 2), "must multiply to"),
    ((2, 6, 4), (2, 3, 4), 3, (2, 3), "must divide"),
    ((2, 6, 4), (2, 3, 4), 0, (2, 3), "must divide"),
    ((3, 6, 4), (3, 3, 4), 2, (2, 3), "multiple of the store's batch"),
    ((4, 6, 4), (3, 3, 4), 2, (2, 3), "k's batch"),
    ((2, 6), (2, 3, 4), 2, (2, 3), "q must be"),
]))
def test_a_layer_of_another_shape_is_refused_by_name(case):
    q_shape, k_shape, heads, hw, match = case
    store = AttentionStore([[[0]], [[1]]], resolution="any")
    with pytest.raises(ValueError, match=match):
        store.add(torch.randn(q_shape), torch.randn(k_shape), heads, hw)
    assert store.n_layers == 0


_GARBAGE = st.sampled_from([None, 3, "ab", [], [[]], [[[]]], [[[-1]]], [[[1.5]]], [["1"]], [[[1]], [[1], [2]]],
                            [[[1]], []], {"a": 1}, [[None]], [[[0, -2]]]])


@FAST
@given(bad=_GARBAGE)
def test_token_indices_that_are_not_words_of_positions_are_refused(bad):
    with pytest.raises((TypeError, ValueError), match="token_indices"):
        AttentionStore(bad, resolution=4)


@FAST
@given(T=st.integers(1, 8), pos=st.integers(0, 12), seed=st.integers(0, 99))
def test_a_token_position_past_the_keys_is_refused_naming_it(T, pos, seed):
    assume(pos >= T)
    store = AttentionStore([[[pos]]], resolution=(2, 2))
    q, k = _qk(1, 4, T, 1, 2, seed)
    with pytest.raises(ValueError, match=rf"token_indices\[0\]\[0\] = \[{pos}\] points past"):
        store.add(q, k, 1, (2, 2))


# Fixed, was BUG 4: a bool is taken as a token position: AttentionStore([[True]]) (or [[[True]]]) is accepted and gives the map of
# token 1 (`isinstance(True, int)`), where `_check_context_lengths` and `_check_resolution` refuse bools on purpose.
# A silently wrong map instead of the ValueError "each word must be a non-empty list of token positions >= 0".
# Minimal input: AttentionStore([[[True]]], resolution=4).
@FAST
@given(bad=st.sampled_from([[[True]], [[[True]]], [[[0, False]]], [[[1], [True]]]]))
def test_a_bool_token_position_is_refused(bad):
    with pytest.raises((TypeError, ValueError), match="token_indices"):
        AttentionStore(bad, resolution=4)


# ------------------------------------------------------------------------------------------- level_sizes / map_size
@FAST
@given(H=st.integers(1, 300), W=st.integers(1, 300), levels=st.integers(1, 10))
def test_level_sizes_halve_by_ceil_down_to_one_pixel(H, W, levels):
    sizes = level_sizes((H, W), levels)
    assert sizes[0] == (H, W) and 1 <= len(sizes) <= levels
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]):
        assert (h1, w1) == (-(-h0 // 2), -(-w0 // 2)) and min(h0, w0) > 1
    assert len(sizes) == levels or min(sizes[-1]) == 1


@FAST
@given(H=st.integers(1, 300), W=st.integers(1, 300), levels=st.integers(1, 10),
       attn=st.one_of(st.none(), st.sets(st.integers(0, 9), min_size=1, max_size=4)), r=st.integers(1, 300),
       scale=st.one_of(st.none(), st.sampled_from([1, 8])))
def test_map_size_is_the_one_usable_level_with_that_shorter_side_or_a_valueerror_listing_them(H, W, levels, attn, r,
                                                                                           scale):
    sizes = level_sizes((H, W), levels)
    usable = [s for i, s in enumerate(sizes) if (attn is None or i in attn) and min(s) >= 2]
    matches = [s for s in usable if min(s) == r]
    assert len(matches) <= 1  # shorter sides strictly shrink: never two levels to choose from
    if matches:
        assert map_size(r, (H, W), levels, attn, scale) == matches[0]
    else:
        with pytest.raises(ValueError, match=f"resolution {r}: at this size") as e:
            map_size(r, (H, W), levels, attn, scale)
        for s in usable:  # names what would work
            assert str(min(s)) in str(e.value)
        if scale is not None:
            assert f"width {W * scale}, height {H * scale} px" in str(e.value)


# ------------------------------------------------------------------------------------------- attention_capture
_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        from focusfix_core.tiny.model import TinyConfig, TinyModel
        _MODEL = TinyModel.random(seed=0, config=TinyConfig(image_size=16, channels=(16, 16, 32), heads=2,
                                                            context_dim=16, text_layers=1))
    return _MODEL


@settings(max_examples=25, deadline=None)
@given(H=st.sampled_from([4, 8, 12, 16, 24, 40]), W=st.sampled_from([4, 8, 12, 16, 24, 40]), B=st.integers(1, 2),
       cfg=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_capture_on_the_tiny_model_gives_maps_of_every_attention_level_at_any_aspect_ratio(H, W, B, cfg, seed, data):
    m = _model()
    prompts = data.draw(st.lists(st.sampled_from(["a red circle", "a blue square and a green triangle", ""]),
                                 min_size=B * cfg, max_size=B * cfg))
    cond = m.encode_prompts(prompts)
    T = cond["context"].shape[1]
    words = [_partition(data.draw, T) for _ in range(B)]
    n = min(len(x) for x in words)
    words = [x[:n - 1] + [sum(x[n - 1:], [])] for x in words]
    sizes = level_sizes((H, W))
    levels = [i for i in m.attention_levels() if i < len(sizes)]
    x = torch.randn(B * cfg, 3, H, W, generator=torch.Generator().manual_seed(seed))
    for level in levels:
        hw = sizes[level]
        if min(hw) >= 2:
            assert map_size(min(hw), (H, W), attention_levels=m.attention_levels()) == hw
        store = AttentionStore(words, resolution=hw, keep_grad=False)
        with torch.no_grad(), m.attention_capture(store):
            m.denoise(x, torch.full((B * cfg,), 2.0), cond)
        assert store.n_layers >= 1
        assert set(store.resolutions_seen) <= {sizes[i] for i in levels}
        A = store.maps()
        assert A.shape == (B, n, *hw)
        torch.testing.assert_close(A.sum(1), torch.ones(B, *hw))
