"""Property tests (hypothesis) for the node plumbing in nodes/common.py: `parse_lines`, the widget range checks
(`check_widget_ranges`, `widgets_checked`) on every node's real INPUT_TYPES, and `clock`."""
import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pack_loader import load_pack

PACK = load_pack()
C = PACK.nodes.common
NODES = PACK.nodes.NODE_CLASS_MAPPINGS

FAST = settings(max_examples=80, deadline=None)

# every widget of every node: (node class, input name, spec)
NUMBERS = [(cls, name, spec) for cls in NODES.values() for name, spec in C.input_specs(cls).items()
           if isinstance(spec, tuple) and spec[0] in ("INT", "FLOAT") and "min" in spec[1] and "max" in spec[1]]
COMBOS = [(cls, name, spec) for cls in NODES.values() for name, spec in C.input_specs(cls).items()
          if isinstance(spec, tuple) and isinstance(spec[0], list) and spec[0]]
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_the_nodes_have_widgets_to_check():
    assert len(NUMBERS) > 20 and len(COMBOS) > 10


# ------------------------------------------------------------------------------------------------ parse_lines
LINE = st.text(st.characters(blacklist_characters=_LINE_BREAKS, blacklist_categories=("Cs",)), min_size=1,
               max_size=20).map(str.strip).filter(lambda s: s and not s.startswith("#"))
PAD = st.text(" \t", max_size=3)


@FAST
@given(lines=st.lists(LINE, min_size=1, max_size=6), data=st.data(), name=st.sampled_from(["prompts", "words"]))
def test_parse_lines_gives_back_the_lines_between_blanks_comments_and_padding(lines, data, name):
    """One prompt per line: blank lines, '#' comments and the spaces around a line are dropped, the order kept,
    whatever the line breaks (\\n, \\r\\n, \\r)."""
    text = []
    for line in lines:
        text += data.draw(st.lists(st.sampled_from(["", "  ", "# a comment", "  #x", "\t"]), max_size=2))
        text.append(data.draw(PAD) + line + data.draw(PAD))
    text += data.draw(st.lists(st.sampled_from(["", " # end"]), max_size=2))
    sep = data.draw(st.sampled_from(["\n", "\r\n", "\r"]))
    assert C.parse_lines(sep.join(text), name) == lines


@FAST
@given(text=st.text(max_size=40), name=st.sampled_from(["prompts", "words", "negatives"]))
def test_parse_lines_gives_clean_lines_or_an_error_naming_the_input(text, name):
    try:
        out = C.parse_lines(text, name)
    except ValueError as e:
        assert str(e).startswith(f"{name} is empty: write one per line")
        assert all(not line.strip() or line.strip().startswith("#") for line in text.splitlines())
        comments = sum(line.strip().startswith("#") for line in text.splitlines())
        assert (f"its {comments} line" in str(e) and "start with #, which marks a comment" in str(e)) == bool(comments)
        return
    assert out and all(line == line.strip() and line and not line.startswith("#") for line in out)
    assert all(not any(b in line for b in _LINE_BREAKS) for line in out)
    assert all(line in text for line in out)


@FAST
@given(lines=st.lists(LINE, min_size=1, max_size=4), comments=st.lists(st.sampled_from(
    ["#1 best photo of a cat", "  # the dog", "#" + "x" * 80]), max_size=3), data=st.data())
def test_comment_lines_are_counted_in_a_note_and_none_gives_no_note(lines, comments, data):
    """A prompt such as '#1 best photo of a cat' is a comment line, skipped: the report says so, quoting one."""
    text = "\n".join(data.draw(st.permutations(lines + comments)))
    notes = C.comment_notes(text)
    assert C.parse_lines(text) == [line for line in text.splitlines() if not line.strip().startswith("#")]
    if not comments:
        assert notes == []
        return
    (note,) = notes
    assert note.startswith(f"prompts: {len(comments)} line") and "remove the # to train on it" in note
    first = next(line.strip() for line in text.splitlines() if line.strip().startswith("#"))
    assert (repr(first) in note) == (len(first) <= 60) and len(note) < 200


# ------------------------------------------------------------------------------------------ widget ranges
def _message_names(e: ValueError, name: str) -> bool:
    return str(e).startswith(f"{name} ")


@FAST
@given(case=st.sampled_from(NUMBERS), data=st.data())
def test_a_number_within_its_widgets_range_is_accepted(case, data):
    cls, name, (kind, options) = case
    lo, hi = options["min"], options["max"]
    value = data.draw(st.integers(int(lo), int(hi)) if kind == "INT" else
                      st.floats(lo, hi, allow_nan=False) | st.sampled_from([lo, hi]))
    C.check_widget_ranges(cls, **{name: value})
    C.check_widget_ranges(cls, **{name: None})  # a linked input: checked when the node runs


@FAST
@given(case=st.sampled_from(NUMBERS), data=st.data())
def test_a_number_outside_its_widgets_range_is_refused_by_name(case, data):
    cls, name, (kind, options) = case
    lo, hi = options["min"], options["max"]
    below = data.draw(st.booleans())
    if kind == "INT":
        value = data.draw(st.integers(max_value=int(lo) - 1) if below else st.integers(min_value=int(hi) + 1))
    else:
        value = data.draw(st.floats(max_value=lo, exclude_max=True, allow_infinity=False, allow_nan=False) if below
                          else st.floats(min_value=hi, exclude_min=True, allow_infinity=False, allow_nan=False))
    word = "at least" if below else "at most"
    with pytest.raises(ValueError, match=rf"^{name} \({re.escape(str(value))}\) must be {word} "
                                         rf"{re.escape(str(lo if below else hi))}$"):
        C.check_widget_ranges(cls, **{name: value})


@FAST
@given(case=st.sampled_from(NUMBERS), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_nonfinite_number_is_refused_by_name(case, bad):
    """JSON's NaN passes ComfyUI's own min/max check (every comparison with NaN is False)."""
    cls, name, _ = case
    with pytest.raises(ValueError, match=rf"^{name} \({bad}\) must be a finite number$"):
        C.check_widget_ranges(cls, **{name: bad})


@FAST
@given(case=st.sampled_from(COMBOS), data=st.data())
def test_a_combo_takes_exactly_its_choices(case, data):
    cls, name, (choices, *_) = case
    C.check_widget_ranges(cls, **{name: data.draw(st.sampled_from(choices))})
    other = data.draw(st.text(max_size=12) | st.integers() | st.floats(allow_nan=False))
    assume(other not in choices)
    with pytest.raises(ValueError, match=rf"^{name} must be one of .*got {re.escape(repr(other))}$"):
        C.check_widget_ranges(cls, **{name: other})


@FAST
@given(cases=st.lists(st.sampled_from(NUMBERS), min_size=2, max_size=2, unique_by=lambda c: (c[0], c[1])).filter(
    lambda cs: cs[0][0] is cs[1][0]), data=st.data())
def test_the_first_bad_value_is_the_one_named(cases, data):
    """With several values, the message names the first out-of-range one, and a good one before it is no bother."""
    (cls, good, (_, gopt)), (_, bad, (kind, bopt)) = cases
    value = bopt["max"] + (1 if kind == "INT" else 1.5)
    with pytest.raises(ValueError, match=rf"^{bad} "):
        C.check_widget_ranges(cls, **{good: gopt["min"], bad: value})


def _node_with(spec: dict):
    """A V1 node whose execute (with one parameter per input, as the nodes' own) is wrapped by `widgets_checked`;
    execute records what it ran with."""
    ran = []
    params = ", ".join(spec)
    scope = {"ran": ran}
    exec(f"def execute(self, {params}, prompt=None):\n    kw = dict({', '.join(f'{p}={p}' for p in spec)})\n"
         f"    ran.append(kw)\n    return (kw,)", scope)

    class Node:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": spec, "hidden": {"prompt": "PROMPT"}}

        execute = C.widgets_checked(scope["execute"])
    Node.ran = ran
    return Node


@FAST
@given(case=st.sampled_from(NUMBERS), data=st.data())
def test_widgets_checked_refuses_a_linked_out_of_range_value_before_execute_runs(case, data):
    _, name, spec = case
    kind, options = spec
    node = _node_with({name: spec, "text": ("STRING", {}), "flag": ("BOOLEAN", {})})
    inside = data.draw(st.integers(int(options["min"]), int(options["max"])) if kind == "INT"
                       else st.floats(options["min"], options["max"]))
    assert node().execute(**{name: inside, "text": "x", "flag": True}) == ({name: inside, "text": "x", "flag": True},)
    outside = data.draw(st.sampled_from([options["max"] + 1, options["min"] - 1, math.nan]))
    with pytest.raises(ValueError, match=rf"^{name} \("):
        node().execute(**{name: outside, "text": "x", "flag": False})
    assert len(node.ran) == 1  # the refused call never reached execute


# ------------------------------------------------------------------------------------------------ clock
@FAST
@given(seconds=st.floats(0, 10**7, allow_nan=False) | st.integers(0, 10**7))
def test_clock_reads_back_as_the_rounded_seconds(seconds):
    text = C.clock(seconds)
    m = re.fullmatch(r"(?:(\d+):(\d\d):(\d\d))|(?:(\d+):(\d\d))", text)
    assert m is not None, text
    if m.group(1) is not None:
        h, mm, ss = int(m.group(1)), int(m.group(2)), int(m.group(3))
        assert h >= 1 and mm < 60 and ss < 60
    else:
        h, mm, ss = 0, int(m.group(4)), int(m.group(5))
        assert mm < 60 and ss < 60
    assert 3600 * h + 60 * mm + ss == int(round(seconds))


@pytest.mark.parametrize("seconds", [-5, -0.4, -3600])
def test_clock_of_a_negative_eta_is_zero(seconds):
    """An ETA past its end read '-1:55'."""
    assert C.clock(seconds) == "0:00"
