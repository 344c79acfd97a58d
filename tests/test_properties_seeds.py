"""Property tests (hypothesis) for `trainers.parse_ints`, the seeds format of the nodes and the CLI ("0, 1, 5-7")."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from focusfix_core.trainers import MAX_SEED, parse_ints

FAST = settings(max_examples=200, deadline=None)
SEEDS = st.integers(0, MAX_SEED)
SEPARATORS = st.sampled_from([",", ", ", " ", "\n", "\t", " ,", ",,", " , \n"])


@st.composite
def _formatted(draw):
    """A list of seeds and ranges, written with random separators -> (text, the seeds it names)."""
    chunks, seeds = [], []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            s = draw(SEEDS)
            chunks.append(str(s))
            seeds.append(s)
        else:
            n = draw(st.integers(0, 1000))
            lo = draw(st.integers(0, MAX_SEED - n))
            chunks.append(f"{lo}-{lo + n}")
            seeds += range(lo, lo + n + 1)
    text = chunks[0]
    for c in chunks[1:]:
        text += draw(SEPARATORS) + c
    pad = draw(st.sampled_from(["", " ", "\n", ","]))
    return pad + text + pad, seeds


@FAST
@given(case=_formatted())
def test_formatted_seeds_and_ranges_parse_back(case):
    text, seeds = case
    assert parse_ints(text) == seeds


@FAST
@given(seeds=st.lists(st.integers(0, 10**6), min_size=1, max_size=50))
def test_a_list_written_as_runs_parses_back(seeds):
    """Sorted seeds compressed into runs ("3-7") and singles, as a user would write them."""
    seeds = sorted(set(seeds))
    runs, start = [], seeds[0]
    for a, b in zip(seeds, seeds[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    assert parse_ints(", ".join(runs)) == seeds


_GARBAGE = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789-, x.+_ \t", max_size=30),
    st.integers(20, 4300).map(lambda n: "9" * n),  # too large for a seed, up to Python's int() digit limit
    st.tuples(st.integers(0, 10**15), st.integers(0, 10**15)).map(lambda t: f"{t[0]}-{t[1]}"),
)


@FAST
@given(text=_GARBAGE, name=st.sampled_from(["seeds", "items"]))
def test_any_text_gives_seeds_in_range_or_an_error_naming_the_input(text, name):
    """Either seeds in KSampler's range (0 .. 2**64-1), at most 1001 per part (no huge list from a typo like
    0-999999999999), or a ValueError that starts with the input's name."""
    try:
        out = parse_ints(text, name)
    except ValueError as e:
        assert str(e).startswith(name), str(e)
        return
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    assert out and all(isinstance(s, int) and 0 <= s <= MAX_SEED for s in out)
    assert len(out) <= 1001 * len(parts)


@FAST
@given(lo=st.integers(0, 10**13), span=st.integers(1001, 10**13))
def test_a_range_of_over_1001_seeds_is_refused_at_once(lo, span):
    with pytest.raises(ValueError, match="at most 1001 values"):
        parse_ints(f"{lo}-{lo + span}")


@FAST
@given(lo=st.integers(1, 10**9), hi=st.integers(0, 10**9))
def test_a_descending_range_is_refused(lo, hi):
    if hi >= lo:
        hi, lo = lo - 1, hi
    with pytest.raises(ValueError, match="must go up"):
        parse_ints(f"{lo}-{hi}")


@FAST
@given(s=st.integers(1, 10**30), other=st.integers(MAX_SEED + 1, 10**30))
def test_seeds_outside_ksamplers_range_are_refused(s, other):
    with pytest.raises(ValueError, match="outside 0 to"):
        parse_ints(f"-{s}")
    with pytest.raises(ValueError, match="outside 0 to"):
        parse_ints(f"1, {other}")


@pytest.mark.parametrize("text", ["9" * 4301, "1-" + "9" * 5000, "0" * 30 + "7"])
def test_a_very_long_number_is_refused_by_name(text):
    """Over 4300 digits, int() raised its own error (advising sys.set_int_max_str_digits) naming nothing; leading
    zeros do not count."""
    if text.lstrip("0") == "7":
        assert parse_ints(text) == [7]
        return
    with pytest.raises(ValueError, match=r"^seeds: .*outside 0 to"):
        parse_ints(text)


def test_a_list_of_over_10000_seeds_is_refused_by_name():
    """Each range holds at most 1001 seeds, and the whole list at most 10 000 (checked as it grows)."""
    walls = ", ".join(f"{k * 1000}-{k * 1000 + 999}" for k in range(10))
    assert len(parse_ints(walls)) == 10_000
    with pytest.raises(ValueError, match=r"^seeds holds over 10000 values \(at '10000-10999'\)"):
        parse_ints(walls + ", 10000-10999, " + ", ".join(f"{k}-{k + 1000}" for k in range(0, 10**8, 2000)))
