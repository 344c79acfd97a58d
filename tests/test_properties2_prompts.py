"""Property tests (hypothesis) for the trainers' text inputs and configs: `split_words`, `split_objects_prompt`,
`_check_distinct_words`, the derived single-object preservation prompts, `attention.word_token_indices` on a
simple BPE-like tokenizer, and the validation of `FixConfig` / `SeparateEnhanceConfig` (valid settings are
accepted; an invalid one is a ValueError naming the field)."""
import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from focusfix_core.attention import word_token_indices
from focusfix_core.saliency import SALIENCY_METHODS, THRESHOLD_MODES
from focusfix_core.sampler import COMPILE_MODES, SAMPLERS
from focusfix_core.trainers import (MASK_SOURCES, MAX_SEED, PRESERVATIONS, FixConfig, SeparateEnhanceConfig,
                                    _check_distinct_words, _single_object_prompts, split_objects_prompt, split_words)

FAST = settings(max_examples=80, deadline=None)

WORD = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
# an object word or phrase: no separator of the Train line (',', ';', '|'), no padding
OBJECT = st.text(st.characters(blacklist_characters=",;|", blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
                 min_size=1, max_size=10) | st.builds(lambda a, b: f"{a} {b}", WORD, WORD)


def _key(w: str) -> str:
    return " ".join(w.lower().split())


# ------------------------------------------------------------------------------------------------ split_words
@FAST
@given(words=st.lists(OBJECT.map(str.strip).filter(bool), max_size=6), data=st.data())
def test_split_words_gives_back_the_words_whatever_the_separators(words, data):
    seps = data.draw(st.lists(st.sampled_from([",", ";", ", ", " ; ", ",,", ";\n", " , ; "]), min_size=len(words),
                              max_size=len(words)))
    text = data.draw(st.sampled_from(["", " ", ","])) + "".join(w + s for w, s in zip(words, seps))
    assert split_words(text) == words


@FAST
@given(text=st.text(max_size=40))
def test_split_words_are_stripped_non_empty_and_free_of_separators(text):
    out = split_words(text)
    assert all(w and w == w.strip() and "," not in w and ";" not in w and w in text for w in out)
    assert split_words(", ".join(out)) == out  # idempotent


# -------------------------------------------------------------------------------------- split_objects_prompt
@st.composite
def object_lines(draw):
    prompt = draw(st.text(st.characters(blacklist_characters="|", blacklist_categories=("Cs",)), min_size=1,
                          max_size=30).filter(lambda p: p.strip()))
    objects = draw(st.lists(OBJECT.map(str.strip).filter(bool), min_size=2, max_size=4, unique_by=_key))
    return prompt, objects


@FAST
@given(case=object_lines(), pad=st.sampled_from(["", " ", "  "]), sep=st.sampled_from([", ", ",", ";", " ; "]))
def test_an_objects_line_splits_into_its_prompt_and_words(case, pad, sep):
    prompt, objects = case
    line = f"{pad}{prompt}{pad}|{pad}{sep.join(objects)}{pad}"
    assert split_objects_prompt(line) == (prompt.strip(), objects)


@FAST
@given(case=object_lines(), i=st.integers(0, 3), j=st.integers(0, 3), variant=st.sampled_from(
    [str.upper, str.lower, str.title, lambda w: f" {w} ", lambda w: w.replace(" ", "   ")]))
def test_the_same_object_twice_is_refused_naming_it_in_any_case_or_spacing(case, i, j, variant):
    prompt, objects = case
    i, j = i % len(objects), j % (len(objects) + 1)
    twice = objects[:j] + [variant(objects[i])] + objects[j:]
    assume(_key(variant(objects[i])) == _key(objects[i]))  # e.g. upper() of 'ß' is 'SS': another word
    first = next(w for w in twice if _key(w) == _key(objects[i]))
    with pytest.raises(ValueError, match=rf"names the object {re.escape(repr(first))} twice"):
        _check_distinct_words(prompt, twice)
    with pytest.raises(ValueError, match="twice"):
        split_objects_prompt(f"{prompt} | {', '.join(w.strip() for w in twice)}")


@FAST
@given(line=st.text(max_size=40))
def test_any_line_splits_or_is_refused_quoting_it(line):
    try:
        prompt, objects = split_objects_prompt(line)
    except ValueError as e:
        assert repr(line) in str(e) or repr(line.split("|", 1)[0].strip()) in str(e)
        return
    assert prompt == prompt.strip() and prompt and "|" not in prompt
    assert len(objects) >= 2 and len({_key(o) for o in objects}) == len(objects)
    assert line.startswith(line.split("|", 1)[0]) and all(o in line for o in objects)


@FAST
@given(case=object_lines(), extra=st.sampled_from(["| and a dog |", "|", "| a bird | |"]))
def test_a_line_with_a_second_bar_is_refused_counting_the_bars(case, extra):
    """'a cat | and a dog | cat, dog' split at its first '|' made 'and a dog | cat' an object word, refused as a
    word missing from the prompt; the line's extra '|' is now named."""
    prompt, objects = case
    line = f"{prompt} {extra} {', '.join(objects)}" if extra != "|" else f"{prompt} | {', '.join(objects)} |"
    with pytest.raises(ValueError, match=rf"has {line.count('|')} '\|': write the prompt, one '\|', then"):
        split_objects_prompt(line)

# ----------------------------------------------------------------------------- single-object preservation
@FAST
@given(parts=st.lists(st.lists(WORD, min_size=1, max_size=3).map(" ".join), min_size=1, max_size=4),
       joins=st.lists(st.sampled_from([" and ", ", ", " , and "]), min_size=3, max_size=3), data=st.data())
def test_each_preservation_prompt_names_its_object_and_no_other(parts, joins, data):
    """One prompt per object: a part of the prompt (split at 'and' / ',') that names this object and no other one,
    else 'a <word>'; never a part naming two objects."""
    prompt = parts[0] + "".join(j + p for j, p in zip(joins, parts[1:]))
    words = sorted({w for p in parts for w in p.split() if w != "and"})
    assume(len(words) >= 2)
    objects = data.draw(st.lists(st.sampled_from(words), min_size=2, max_size=3, unique=True))
    out = _single_object_prompts(prompt, objects)
    assert len(out) == len(objects)
    pieces = [p.strip() for p in re.split(r"(?<![\w-])and(?![\w-])|,", prompt, flags=re.I) if p.strip()]

    def names(text, w):
        return re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.I) is not None

    for w, q in zip(objects, out):
        assert names(q, w)
        alone = [p for p in pieces if names(p, w) and not any(names(p, o) for o in objects if o != w)]
        if q in alone:
            continue
        assert q == f"a {w}"  # the fallback only when no part (or more than one) names this object
        assert not alone or len([p for p in pieces if names(p, w)]) > 1


@FAST
@given(parts=st.lists(st.lists(WORD, min_size=1, max_size=3).map(" ".join), min_size=2, max_size=3, unique=True),
       weights=st.lists(st.sampled_from(["", ":1.2", ":0.8", ": 1.5 ", ":.5"]), min_size=4, max_size=4),
       nest=st.lists(st.integers(0, 2), min_size=3, max_size=3), whole=st.booleans())
def test_weighted_prompts_give_the_same_preservation_prompts_without_their_syntax(parts, weights, nest, whole):
    """'(a cat and a dog:1.2)' gave '(a cat' and 'a dog:1.2)': ComfyUI reads unbalanced '(' and ':1.2)' as literal
    tokens, so the preservation prompts held text no image had (review E4). With the syntax gone they are the
    unweighted prompt's."""
    objects = [p.split()[-1] for p in parts]
    assume(len({o.lower() for o in objects}) == len(objects) and "and" not in {o.lower() for o in objects})
    plain = " and ".join(parts)
    wrapped = [("(" * n + p + (w if n else "") + ")" * n) for p, n, w in zip(parts, nest, weights)]
    weighted = " and ".join(wrapped)
    if whole:
        weighted = f"({weighted}{weights[-1]})"
    assert _single_object_prompts(weighted, objects) == _single_object_prompts(plain, objects)
    assert all("(" not in q and ")" not in q and ":" not in q for q in _single_object_prompts(weighted, objects))
    assert _single_object_prompts(r"a \(black\) cat and a dog", ["cat", "dog"])[0] == r"a \(black\) cat"


# -------------------------------------------------------------------------------------- word_token_indices
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@st.composite
def tokenised_prompts(draw):
    """(prompt words, tokens, start index of each word's pieces): words of distinct letters (no letter in two
    words), each cut into 1-3 BPE pieces, in one of three marker styles, in random case."""
    n = draw(st.integers(2, 5))
    letters = draw(st.permutations(LETTERS))
    sizes = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    words, at = [], 0
    for s in sizes:
        words.append("".join(letters[at:at + s]))
        at += s
    order = draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n + 3).filter(lambda o: set(o) == set(range(n))))
    style = draw(st.sampled_from(["clip", "gpt2", "sentencepiece"]))
    tokens = {"clip": ["<|startoftext|>"], "gpt2": ["<s>"], "sentencepiece": ["<s>"]}[style]
    positions: dict[int, list[int]] = {}
    for k in order:
        w = words[k]
        cuts = sorted(draw(st.sets(st.integers(1, max(len(w) - 1, 1)), max_size=2))) if len(w) > 1 else []
        pieces = [w[a:b] for a, b in zip([0, *cuts], [*cuts, len(w)])]
        pieces = [draw(st.sampled_from([p, p.upper(), p.title()])) for p in pieces]
        if style == "clip":
            pieces[-1] += "</w>"
        else:
            pieces[0] = ("Ġ" if style == "gpt2" else "▁") + pieces[0]
        positions.setdefault(k, list(range(len(tokens), len(tokens) + len(pieces))))
        tokens += pieces
    tokens += ["<|endoftext|>"] * draw(st.integers(1, 4))
    return words, tokens, positions


@FAST
@given(case=tokenised_prompts(), data=st.data())
def test_each_word_is_found_at_its_first_occurrences_pieces(case, data):
    """Case, BPE markers, how the word is cut into pieces and spaces typed inside the word do not matter; a word
    written twice in the prompt maps to its first occurrence."""
    words, tokens, positions = case
    ask = data.draw(st.lists(st.integers(0, len(words) - 1), min_size=1, max_size=len(words), unique=True))
    typed = []
    for k in ask:
        w = words[k]
        cut = data.draw(st.integers(0, len(w)))
        typed.append(data.draw(st.sampled_from([w, w.upper(), w[:cut] + " " + w[cut:]])))
    assert word_token_indices(tokens, typed) == [positions[k] for k in ask]


@FAST
@given(case=tokenised_prompts(), extra=st.text("0123456789", min_size=1, max_size=3))
def test_a_word_not_in_the_prompt_is_refused_by_name(case, extra):
    words, tokens, _ = case
    with pytest.raises(ValueError, match=rf"^word '{words[0]}{extra}' not found in the prompt's tokens"):
        word_token_indices(tokens, [words[-1], words[0] + extra])


@FAST
@given(case=tokenised_prompts(), k=st.integers(0, 4), variant=st.sampled_from([str.upper, str.title, str.lower]))
def test_the_same_word_twice_is_refused_naming_both(case, k, variant):
    words, tokens, _ = case
    w = words[k % len(words)]
    with pytest.raises(ValueError, match=rf"^words '{w}' and '{variant(w)}' both land on"):
        word_token_indices(tokens, [w, variant(w)])


# word_token_indices matches whole words of the prompt: the BPE markers ('</w>' ends a CLIP word, 'Ġ' / '▁' start
# one) bound them. It matched a piece inside a longer word: with SD1.5's real CLIP tokens of "a seahorse and a
# horse" (CLIP cuts sea|horse, wolf|hound, dog|sled, fire|truck, rain|coat) "horse" gave the end of "seahorse".
PIECES = ["sea", "horse", "wolf", "hound", "dog", "sled", "fire", "truck"]


@st.composite
def compound_prompts(draw):
    """CLIP tokens of prompt words made of 1-2 pieces (compounds), and a word that stands alone in the prompt."""
    words = draw(st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=2).map(tuple), min_size=2,
                          max_size=5))
    alone = draw(st.sampled_from(PIECES))
    words.insert(draw(st.integers(0, len(words))), (alone,))
    tokens, starts, ends = ["<|startoftext|>"], set(), set()
    for w in words:
        starts.add(len(tokens))
        tokens += list(w[:-1]) + [w[-1] + "</w>"]
        ends.add(len(tokens) - 1)
    return tokens + ["<|endoftext|>"], alone, starts, ends, words


@FAST
@given(case=compound_prompts())
def test_a_word_maps_to_whole_words_of_the_prompt(case):
    tokens, word, starts, ends, words = case
    (found,) = word_token_indices(tokens, [word])
    assert found[0] in starts and found[-1] in ends, (words, word, found)


def test_horse_is_not_the_end_of_seahorse():
    tokens = ["<|startoftext|>", "a</w>", "sea", "horse</w>", "and</w>", "a</w>", "horse</w>", "<|endoftext|>"]
    assert word_token_indices(tokens, ["horse"]) == [[6]]
    assert word_token_indices(tokens, ["seahorse", "horse"]) == [[2, 3], [6]]
    with pytest.raises(ValueError, match="'horse' is only part of the longer word 'seahorse'"):
        word_token_indices(tokens[:4] + tokens[-1:], ["horse"])


# ------------------------------------------------------------------------------------------------ FixConfig
POS = st.floats(1e-6, 1e3)
NONNEG = st.floats(0, 1e3)


@st.composite
def fix_kwargs(draw):
    steps = draw(st.integers(1, 50))
    K = draw(st.integers(1, steps))
    mode = draw(st.sampled_from(THRESHOLD_MODES))
    threshold = draw({"value": st.floats(0, 1), "top_percent": st.floats(0, 1, exclude_min=True),
                      "otsu": st.floats(-5, 5)}[mode])
    kw = dict(
        prompts=(*draw(st.lists(st.text(max_size=12), max_size=3)),
                 draw(st.text(min_size=1, max_size=12).filter(str.strip))),
        seeds=tuple(draw(st.lists(st.integers(0, MAX_SEED), min_size=1, max_size=4))),
        lr=draw(POS), rank=draw(st.integers(1, 64)), alpha=draw(st.none() | POS),
        targets=draw(st.sampled_from(["attn", "to_k", "all_linear", ("to_k", "to_v")])),
        iterations=draw(st.integers(1, 10**5)), batch_size=draw(st.integers(1, 64)),
        seed=draw(st.integers(0, MAX_SEED)),
        grad_clip=draw(NONNEG), steps=steps, K=K, lv_copies=draw(st.integers(0, 4)) if K == 1 else 0,
        lam=draw(NONNEG), reward_target=draw(st.none() | st.floats(-1e9, 1e9)), cfg_scale=draw(POS),
        mask_source=draw(st.sampled_from(MASK_SOURCES)), mask_space=draw(st.sampled_from(["pixel", "latent"])),
        saliency_method=draw(st.sampled_from(SALIENCY_METHODS)), blur_sigma=draw(NONNEG), threshold_mode=mode,
        threshold=threshold, dilation=draw(st.integers(0, 256)), feather=draw(NONNEG),
        compile=draw(st.sampled_from(COMPILE_MODES)), sampler_name=draw(st.sampled_from(SAMPLERS)),
        scheduler=draw(st.sampled_from(["normal", "karras", "exponential", "sgm_uniform", "simple", "beta"])),
        height=draw(st.integers(8, 4096)), width=draw(st.integers(8, 4096)),
    )
    if draw(st.booleans()):  # an explicit schedule replaces steps
        n = draw(st.integers(K, max(K, 12)))
        top = draw(st.floats(0.1, 100))
        s = sorted(draw(st.lists(st.floats(1e-3, top), min_size=n, max_size=n)), reverse=True)
        kw["sigmas"] = (*s, 0.0)
    return kw


@FAST
@given(kw=fix_kwargs())
def test_a_valid_fix_config_is_accepted_as_given(kw):
    cfg = FixConfig(**kw)
    assert cfg.prompts == tuple(p.strip() for p in kw["prompts"] if p.strip())
    assert cfg.seeds == kw["seeds"] and cfg.items == [(p, s) for p in cfg.prompts for s in cfg.seeds]
    assert cfg.steps == (len(kw["sigmas"]) - 1 if "sigmas" in kw else kw["steps"])
    for name in ("lr", "rank", "alpha", "K", "lam", "threshold", "dilation", "sampler_name", "mask_source"):
        assert getattr(cfg, name) == kw[name]


# an invalid value per field, of the field's own type; (field, strategy, fields it needs to be read)
FIX_INVALID = [
    ("lr", st.sampled_from([0.0, -1e-3, math.nan, math.inf]), {}),
    ("rank", st.integers(max_value=0), {}),
    ("alpha", st.sampled_from([0.0, -1.0, math.nan, math.inf]), {}),
    ("iterations", st.integers(max_value=0), {}),
    ("batch_size", st.integers(max_value=0), {}),
    ("grad_clip", st.sampled_from([-1.0, math.nan, math.inf]), {}),
    ("steps", st.integers(max_value=0), {}),
    ("K", st.integers(max_value=0) | st.integers(21, 10**6), {"steps": 20}),
    ("lv_copies", st.integers(max_value=-1), {}),
    ("lam", st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf]), {}),
    ("reward_target", st.sampled_from([math.nan, math.inf, -math.inf]), {}),
    ("cfg_scale", st.floats(max_value=0) | st.sampled_from([math.nan, math.inf]), {}),
    ("mask_source", st.text(max_size=8).filter(lambda s: s not in MASK_SOURCES), {}),
    ("mask_space", st.text(max_size=8).filter(lambda s: s not in ("pixel", "latent")), {}),
    ("threshold_mode", st.text(max_size=8).filter(lambda s: s not in THRESHOLD_MODES), {}),
    ("threshold", st.floats(1, exclude_min=True) | st.floats(max_value=0) | st.just(math.nan),
     {"threshold_mode": "top_percent"}),
    ("threshold", st.floats(1, exclude_min=True) | st.floats(max_value=0, exclude_max=True) | st.just(math.nan),
     {"threshold_mode": "value"}),
    ("compile", st.text(max_size=8).filter(lambda s: s not in COMPILE_MODES), {}),
    ("sampler_name", st.text(max_size=8).filter(lambda s: s not in SAMPLERS), {}),
    ("height", st.integers(max_value=7), {}),
    ("width", st.integers(max_value=7), {}),
]


@FAST
@given(case=st.sampled_from(FIX_INVALID), data=st.data(), source=st.sampled_from(["heatmap", "saliency"]))
def test_an_invalid_fix_config_field_is_refused_by_name(case, data, source):
    name, values, needs = case
    value = data.draw(values)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        FixConfig(prompts=("a cat",), **{"mask_source": source, **needs, name: value})


# The mask settings are checked with the threshold, before any image is sampled (they failed in the first step,
# after I0 was sampled; feather=NaN with "cannot convert float NaN to integer", naming nothing).
MASK_INVALID = [
    ("dilation", st.integers(max_value=-1)),
    ("blur_sigma", st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf])),
    ("feather", st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf])),
    ("saliency_method", st.text(max_size=8).filter(lambda s: s not in SALIENCY_METHODS)),
]


@FAST
@given(case=st.sampled_from(MASK_INVALID), data=st.data(), source=st.sampled_from(["heatmap", "saliency"]))
def test_an_invalid_mask_setting_is_refused_by_name_before_any_sampling(case, data, source):
    name, values = case
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        FixConfig(prompts=("a cat",), mask_source=source, **{name: data.draw(values)})


# Seeds outside KSampler's range (parse_ints refuses them) are refused by the configs too (2**64 failed later with
# "Overflow when unpacking long long"; seed=-1 trained as seed 2**64 - 1).
@FAST
@given(seed=st.integers(max_value=-1) | st.integers(min_value=MAX_SEED + 1), field=st.sampled_from(["seed", "seeds"]))
def test_a_seed_outside_ksamplers_range_is_refused_by_name(seed, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        FixConfig(prompts=("a cat",), **{field: seed if field == "seed" else (0, seed)})


# ------------------------------------------------------------------------------------- SeparateEnhanceConfig
@st.composite
def se_kwargs(draw):
    n = draw(st.integers(1, 3))
    prompts, objects = [], []
    for _ in range(n):
        objs = draw(st.lists(WORD, min_size=2, max_size=3, unique=True))
        filler = draw(st.sampled_from([" and ", ", ", " next to ", " with "]))
        prompts.append(filler.join(f"a {o}" for o in objs))
        objects.append(tuple(objs))
    lam_sep, lam_en = draw(NONNEG), draw(NONNEG)
    assume(lam_sep > 0 or lam_en > 0)
    lo = draw(st.floats(0, 0.99))
    return dict(prompts=tuple(prompts), objects=tuple(objects), lam_sep=lam_sep, lam_en=lam_en,
                lam_preserve=draw(NONNEG), preservation=draw(st.sampled_from(PRESERVATIONS)),
                t_range=(lo, draw(st.floats(lo, 1, exclude_min=True))), lr=draw(POS), rank=draw(st.integers(1, 64)),
                iterations=draw(st.integers(1, 1000)), batch_size=draw(st.integers(1, 64)), grad_clip=draw(NONNEG))


@FAST
@given(kw=se_kwargs())
def test_a_valid_separate_enhance_config_is_accepted_with_one_preservation_prompt_per_object(kw):
    cfg = SeparateEnhanceConfig(**kw)
    assert cfg.prompts == kw["prompts"] and cfg.objects == kw["objects"]
    if kw["lam_preserve"] > 0:
        derived = [q for p, o in zip(kw["prompts"], kw["objects"]) for q in _single_object_prompts(p, o)]
        assert cfg.preserve_prompts == tuple(dict.fromkeys(derived))  # each once, in order
        assert all(any(re.search(rf"\b{o}\b", q) for os_ in kw["objects"] for o in os_) for q in cfg.preserve_prompts)
    else:
        assert cfg.preserve_prompts == ()


SE_INVALID = [
    ("lam_sep", st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf])),
    ("lam_en", st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf])),
    ("lam_preserve", st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf])),
    ("preservation", st.text(max_size=8).filter(lambda s: s not in PRESERVATIONS)),
    ("t_range", st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True)).filter(
        lambda t: not 0 <= t[0] < t[1] <= 1)),
    ("objects", st.just((("cat",),))),
    ("objects", st.just((("cat", "dog"), ("a", "b")))),
    ("prompts", st.sampled_from([(), ("",), ("  ",)])),
    ("lr", st.sampled_from([0.0, -1.0, math.nan, math.inf])),
    ("rank", st.integers(max_value=0)),
    ("iterations", st.integers(max_value=0)),
    ("batch_size", st.integers(max_value=0)),
    ("grad_clip", st.sampled_from([-1.0, math.nan, math.inf])),
]


@FAST
@given(case=st.sampled_from(SE_INVALID), data=st.data())
def test_an_invalid_separate_enhance_field_is_refused_by_name(case, data):
    name, values = case
    kw = dict(prompts=("a cat and a dog",), objects=(("cat", "dog"),))
    kw[name] = data.draw(values)
    match = {"objects": r"objects|object words", "prompts": "prompts"}.get(name, rf"\b{name}\b")
    with pytest.raises(ValueError, match=match):
        SeparateEnhanceConfig(**kw)


def test_separate_enhance_without_a_loss_weight_is_refused_naming_both():
    with pytest.raises(ValueError, match="lam_sep and lam_en are both 0"):
        SeparateEnhanceConfig(prompts=("a cat and a dog",), objects=(("cat", "dog"),), lam_sep=0.0, lam_en=0.0)
