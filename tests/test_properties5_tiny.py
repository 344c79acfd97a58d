"""Property tests (hypothesis) for the tiny shapes world (tiny/world.py), its exact evaluators (tiny/evaluate.py)
and the tiny tokenizer (tiny/model.py `Tokenizer`): determinism per seed, documented ranges, ground truth that
matches the pixels, tokens() always max_tokens long with unknown words mapped to <unk>."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from focusfix_core.tiny.evaluate import glitch_map, has_glitch
from focusfix_core.tiny.model import SPECIALS, TinyConfig, Tokenizer
from focusfix_core.tiny.world import (COLOURS, SHAPES, WORDS, WorldConfig, all_prompts, caption, is_held_out,
                                      make_batch, parse_caption, sample_scenes)

FAST = settings(max_examples=25, deadline=None)
VOCAB = TinyConfig().vocab

SIZES = {24: ((8, 14), (6, 10)), 32: ((10, 18), (8, 13))}  # size -> (single_size, pair_size) within size/2+2
CONFIGS = st.builds(lambda size, gr, tr, held: WorldConfig(size=size, glitch_rate=gr, two_object_rate=tr,
                                                           include_held_out=held, single_size=SIZES[size][0],
                                                           pair_size=SIZES[size][1]),
                    st.sampled_from(list(SIZES)), st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 0.5, 1.0]),
                    st.booleans())


@FAST
@given(n=st.integers(1, 4), seed=st.integers(0, 2**40), cfg=CONFIGS)
def test_make_batch_is_a_function_of_the_seed_and_keeps_the_global_rng(n, seed, cfg):
    state = torch.get_rng_state()
    I1, c1, s1 = make_batch(n, seed, cfg)
    torch.manual_seed(seed % 7)  # the global RNG must not matter either
    I2, c2, s2 = make_batch(n, seed, cfg)
    assert torch.equal(I1, I2) and c1 == c2 and [s.glitch for s in s1] == [s.glitch for s in s2]
    assert [s.objects for s in s1] == [s.objects for s in s2]
    torch.set_rng_state(state)
    make_batch(n, seed, cfg)
    assert torch.equal(state, torch.get_rng_state())


@FAST
@given(n=st.integers(1, 4), seed=st.integers(0, 2**31), cfg=CONFIGS)
def test_images_are_in_0_1_and_ground_truth_matches_config_and_pixels(n, seed, cfg):
    I, caps, scenes = make_batch(n, seed, cfg)
    S = cfg.size
    assert I.shape == (n, 3, S, S) and I.dtype == torch.float32 and 0 <= I.min() and I.max() <= 1
    for i, (cap, sc) in enumerate(zip(caps, scenes)):
        assert parse_caption(cap) == [(o.colour, o.shape) for o in sc.objects] and 1 <= len(sc.objects) <= 2
        if len(sc.objects) == 2:
            assert sc.objects[0].colour != sc.objects[1].colour
            assert cfg.include_held_out or not is_held_out(parse_caption(cap))
        for o in sc.objects:
            x0, y0, x1, y1 = o.bbox
            lo, hi = cfg.single_size if len(sc.objects) == 1 else cfg.pair_size
            assert 1 <= x0 and 1 <= y0 and x1 <= S - 1 and y1 <= S - 1 and lo <= x1 - x0 == y1 - y0 <= hi
        assert sc.masks.shape == (len(sc.objects), S, S) and sc.masks.flatten(1).any(1).all()
        if cfg.glitch_rate == 0.0:
            assert sc.glitch is None
        # the glitch ground truth is what the exact evaluator sees (magenta never occurs otherwise)
        assert bool(has_glitch(I[i:i + 1])[0]) == (sc.glitch is not None)


@FAST
@given(seed=st.integers(0, 2**31), cfg=CONFIGS, data=st.data())
def test_scenes_drawn_from_prompts_depict_them(seed, cfg, data):
    prompts = data.draw(st.lists(st.sampled_from(all_prompts(1) + all_prompts(2)), min_size=1, max_size=4))
    scenes = sample_scenes(len(prompts), seed, cfg, prompts)
    assert [s.caption for s in scenes] == prompts
    with pytest.raises(ValueError, match="prompts must have n="):
        sample_scenes(len(prompts) + 1, seed, cfg, prompts)


@FAST
@given(n=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_glitch_map_is_in_minus1_1_for_any_image_in_0_1(n, seed):
    I = torch.rand(n, 3, 9, 13, generator=torch.Generator().manual_seed(seed))
    m = glitch_map(I)
    assert m.shape == (n, 9, 13) and (m >= -1).all() and (m <= 1).all()
    assert has_glitch(I).shape == (n,) and has_glitch(I).dtype == torch.bool


@settings(max_examples=50, deadline=None)
@given(objs=st.lists(st.tuples(st.sampled_from(list(COLOURS)), st.sampled_from(SHAPES)), min_size=1, max_size=3),
       sep=st.sampled_from([" ", "  ", ", "]), upper=st.booleans())
def test_parse_caption_inverts_caption_in_any_case_or_spacing(objs, sep, upper):
    from focusfix_core.tiny.world import Obj
    text = caption([Obj(c, s, (0, 0, 0, 0)) for c, s in objs]).replace(" ", sep)
    assert parse_caption(text.upper() if upper else text) == objs


@settings(max_examples=50, deadline=None)
@given(word=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8))
def test_parse_caption_refuses_a_word_outside_the_grammar_quoting_it(word):
    if word in COLOURS or word in SHAPES or word in ("a", "and"):
        return  # a caption word: covered above
    with pytest.raises(ValueError, match=repr(word)):
        parse_caption(f"a red circle and {word}")


def test_all_prompts_split_into_held_out_and_seen():
    two = all_prompts(2)
    held, seen = all_prompts(2, held_out=True), all_prompts(2, held_out=False)
    assert sorted(held + seen) == sorted(two) and not set(held) & set(seen) and held and seen
    assert all(is_held_out(parse_caption(p)) for p in held)
    assert len(all_prompts(1)) == len(COLOURS) * len(SHAPES)


PROMPTS = st.text(max_size=60) | st.lists(st.sampled_from(list(WORDS) + ["dog", "RED", "Circle!", "<unk>", "x1y"]),
                                           max_size=15).map(" ".join)


@settings(max_examples=80, deadline=None)
@given(prompt=PROMPTS, T=st.integers(3, 20))
def test_tokens_are_always_max_tokens_long_start_end_pad_and_unknown_words_are_unk(prompt, T):
    tok = Tokenizer(VOCAB, T)
    t = tok.tokens(prompt)
    assert len(t) == T and t[0] == "<start>" and t.count("<end>") == 1 and t.count("<start>") == 1
    end = t.index("<end>")
    assert all(x == "<pad>" for x in t[end + 1:])
    import re
    words = re.findall(r"[a-z]+", prompt.lower())
    want = [w if w in WORDS else "<unk>" for w in words][:T - 2]
    assert t[1:end] == want  # each word in order, unknowns (and special names) as <unk>, truncated to T-2
    ids = tok([prompt, "a red circle"])
    assert ids.shape == (2, T) and ids.dtype == torch.long and ((ids >= 0) & (ids < len(VOCAB))).all()
    assert [VOCAB[i] for i in ids[0].tolist()] == t


@settings(max_examples=40, deadline=None)
@given(prompt=PROMPTS, T=st.integers(3, 20))
def test_tokens_are_a_function_of_the_lowercased_words(prompt, T):
    tok = Tokenizer(VOCAB, T)
    assume(prompt.upper().lower() == prompt.lower())  # "ﬀ".upper() is "FF": another text, not another case
    assert tok.tokens(prompt) == tok.tokens(prompt.upper()) == tok.tokens("  ,".join(prompt.split()))
    assert set(tok.tokens(prompt)) <= set(VOCAB) and set(SPECIALS) <= set(VOCAB)
