"""Property tests (hypothesis) for focusfix_core.io: traversal-safe names and atomic saves.

Each example gets its own temporary folder (hypothesis runs many examples in one test call, so pytest's
`tmp_path` would be shared between them)."""
import os
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from focusfix_core import io as ffio
from focusfix_core.io import (
    NameTakenError,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    load_tensor_file_with_metadata,
    load_training_state,
    safe_join,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Windows' device names: the part of a name before its first dot, trailing spaces dropped (Windows drops them)
_DEVICES = ({"con", "prn", "aux", "nul", "conin$", "conout$"}
            | {f"{d}{n}" for d in ("com", "lpt") for n in "0123456789¹²³"})

# pieces a hostile or careless name is made of
_PIECES = st.sampled_from([
    "..", ".", "", " ", "a", "fix", "hands v2", "/", "\\", "//", "\\\\", "\0", "\t", "\n", ":", "*", "?", "<", ">",
    "|", '"', "C:", "c:\\", "CON", "con", "nul.txt", "NUL .safetensors", "COM1", "lpt¹", "CONIN$", "aux.", "x.",
    "x ", ".hidden", "...", ". .", "é", "\u00a0", "\u200b", "\u2028", "\x85", "猫", "\U0001f3a8", "~", "$HOME",
    "%APPDATA%", "z" * 120, "é" * 110, "a.safetensors", ".safetensors",
])
NAMES = st.one_of(
    st.text(max_size=60),                                            # any text (no lone surrogates)
    st.lists(_PIECES, max_size=8).map("".join),                      # hostile pieces glued together
    st.lists(st.one_of(_PIECES, st.text(max_size=12)), max_size=6).map("/".join),  # as subfolders
    st.lists(st.one_of(_PIECES, st.text(max_size=12)), max_size=6).map("\\".join),
    st.integers(150, 400).map(lambda n: "n" * n),                    # over the name limit, or just under
    st.integers(1, 40).map(lambda n: "/".join(["d" * 150] * n)),     # deep: over the path limit at some depth
)


def _usable_on_windows(part: str) -> bool:
    stem = part.split(".", 1)[0].rstrip(" ").lower()
    return (stem not in _DEVICES and part[-1] not in ". " and not re.search(r'[<>:"|?*\x00-\x1f]', part))


@FAST
@given(name=NAMES, suffix=st.sampled_from([".safetensors", ".pt", ""]))
def test_safe_join_gives_a_clear_error_or_a_writable_path_inside_the_folder(name, suffix):
    """Any name: a ValueError that quotes it, or a path strictly inside the folder that a save can write, whose
    every component Windows can hold (the docstring's promise: found now, not when the save fails after training)."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "loras"
        try:
            path = safe_join(folder, name, suffix=suffix)
        except ValueError as e:
            assert type(e) is ValueError, f"{type(e).__name__}: {e}"  # not a codec error or the like
            assert repr(name) in str(e) or repr(name)[:60] in str(e), str(e)
            assert not folder.exists()  # refusing wrote nothing
            return
        root = folder.resolve()
        assert path.is_relative_to(root) and path != root
        rel = path.relative_to(root).parts
        assert ".." not in rel and all(rel)
        assert all(_usable_on_windows(p) for p in rel), rel
        assert all(len(p.encode()) <= ffio.MAX_NAME_BYTES for p in rel)
        if suffix:
            assert path.name.lower().endswith(suffix)
        ffio.atomic_write_text("x", path)  # the save works, and lands where safe_join said
        assert path.resolve().is_relative_to(root) and path.read_text() == "x"
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files == [path]


@settings(max_examples=60, deadline=None)
@given(name=st.one_of(NAMES, st.integers(60, 260).map(lambda n: "focusfix/" + "w" * n)))
def test_safe_join_under_windows_limits_leaves_room_for_the_counter_and_temp_file(name):
    """With Windows' MAX_PATH (no long paths): an accepted path, with a `_00001` counter or as the temp file
    next to it, is at most 259 UTF-16 units."""
    folder = "C:/Users/artist/ComfyUI_windows_portable/ComfyUI/models/loras"
    with mock.patch.object(ffio, "_PLATFORM", "win32"):
        try:
            path = safe_join(folder, name)
        except ValueError:
            return
    def units(s):
        return len(s.encode("utf-16-le")) // 2
    assert units(str(path)) + len("_00001") <= 259
    assert units(str(path.parent) + os.sep) + len(".focusfix-XXXXXXXX.tmp") <= 259


def test_safe_join_names_a_surrogate_name():
    """A lone surrogate (a ComfyUI widget value: JSON "\\ud800" decodes to one) is refused naming the filename,
    as every other refusal (it was a UnicodeEncodeError naming neither the name nor the folder)."""
    with pytest.raises(ValueError, match="filename 'fix.ud800' must stay inside folder.*lone surrogate") as e:
        safe_join("/tmp/loras", "fix\ud800")
    assert type(e.value) is ValueError


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@FAST
@given(data=st.binary(max_size=2000), old=st.one_of(st.none(), st.binary(max_size=200)), overwrite=st.booleans())
def test_atomic_write_bytes_round_trips_or_keeps_the_old_file(data, old, overwrite):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "out" / "report.bin"
        if old is not None:
            path.parent.mkdir()
            path.write_bytes(old)
        if old is not None and not overwrite:
            with pytest.raises(FileExistsError, match="exists and was kept") as e:
                atomic_write_bytes(data, path, overwrite=False)
            assert isinstance(e.value, NameTakenError)
            assert path.read_bytes() == old
        else:
            assert atomic_write_bytes(data, path, overwrite=overwrite) == path
            assert path.read_bytes() == data
        assert _listing(path.parent) == ["report.bin"]  # no temp file either way


class _Boom(Exception):
    pass


_STAGES = ("write", "fsync", "chmod", "replace")


@FAST
@given(stage=st.sampled_from(_STAGES), exc=st.sampled_from([OSError, KeyboardInterrupt, _Boom, PermissionError]),
       old=st.one_of(st.none(), st.binary(min_size=1, max_size=64)), partial=st.binary(max_size=64))
def test_a_save_that_fails_at_any_stage_leaves_no_temp_file_and_the_old_file_untouched(stage, exc, old, partial):
    """Whatever fails (the writer, fsync, chmod or the rename; also Ctrl-C), after a partial write: the folder
    holds exactly what it held before, and an existing file keeps its bytes."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "lora.safetensors"
        if old is not None:
            path.write_bytes(old)
        before = _listing(folder)

        def fail(*args, **kwargs):
            raise exc("injected")

        def write_partial(tensors, filename, metadata=None):
            Path(filename).write_bytes(partial)
            if stage == "write":
                raise exc("injected")
            return ffio.__dict__["_real_save_file"](tensors, filename, metadata=metadata)

        patches = {"write": mock.patch.object(ffio, "save_file", write_partial),
                   "fsync": mock.patch.object(ffio.os, "fsync", fail),
                   "chmod": mock.patch.object(ffio.os, "chmod", fail),
                   "replace": mock.patch.object(ffio.os, "replace", fail)}
        with mock.patch.dict(ffio.__dict__, {"_real_save_file": ffio.save_file}), patches[stage]:
            with pytest.raises(exc):
                atomic_save_safetensors({"w": torch.ones(3)}, path)
        assert _listing(folder) == before
        if old is not None:
            assert path.read_bytes() == old


_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8,
                           torch.bool])


@st.composite
def _tensors(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5, unique=True))
    out = {}
    for n in names:
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        t = torch.randn(shape, generator=g) * 100
        out[n] = t.to(draw(_DTYPES))
    return out


@FAST
@given(tensors=_tensors(), metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=20), st.text(max_size=40),
                                                                          max_size=4)))
def test_safetensors_save_round_trips_names_values_and_metadata(tensors, metadata):
    with tempfile.TemporaryDirectory() as d:
        p = atomic_save_safetensors(tensors, Path(d) / "sub" / "x.safetensors", metadata)
        back, meta = load_tensor_file_with_metadata(p)
        assert meta == (metadata or {})
        assert set(back) == set(tensors)
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
        assert _listing(p.parent) == ["x.safetensors"]


_PLAIN = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
_STATES = st.recursive(
    _PLAIN,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(state=_STATES)
def test_a_training_state_torch_save_accepts_loads_back_equal(state):
    """`atomic_torch_save` accepts plain values; what it accepts, `load_training_state` must read back equal
    (weights_only=True), or the run cannot be resumed."""
    with tempfile.TemporaryDirectory() as d:
        p = atomic_torch_save({"state": state, "t": torch.arange(3)}, Path(d) / "state.pt")
        back = load_training_state(p)
        assert back["state"] == state and type(back["state"]) is type(state)
        assert torch.equal(back["t"], torch.arange(3))




@settings(max_examples=60, deadline=None)
@given(obj=st.one_of(st.sets(st.integers(), max_size=3), st.frozensets(st.integers(), max_size=3),
                     st.complex_numbers(allow_nan=False), st.just(object()), st.just(Path("x")),
                     st.binary(max_size=4))  # torch pickles b"" as a call of `bytes`: weights_only refused it
       .flatmap(lambda bad: st.sampled_from([bad, [bad], {"k": bad}, (1, {"a": [bad]})])))
def test_a_training_state_with_objects_is_refused_before_anything_is_written(obj):
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(TypeError, match="obj"):
            atomic_torch_save(obj, Path(d) / "state.pt")
        assert os.listdir(d) == []
