"""Property tests (hypothesis) for hostile or damaged files: `io.load_tensor_file_with_metadata` (random bytes,
damaged safetensors, absurd safetensors headers, pickles holding objects), LoRA files (`load_lora_file`,
`read_focusfix_lora`, `SavedLoRA.attach`, `merge_kohya_into`) and reward files (`load_reward`, `convert_reward`).

The contract under test (io/lora/rewards docstrings, STYLE rule 6): a file either loads correctly or is refused
with a ValueError (FileNotFoundError for a missing one) naming the file; never another exception from deep inside
torch/safetensors, never a silently wrong LoRA.

The bugs found here are fixed; their tests say so ("Fixed, was BUG n") with their minimal inputs."""
import io
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file
from torch import nn

from focusfix_core.io import load_tensor_file_with_metadata
from focusfix_core.lora import load_lora_file, merge_kohya_into, read_focusfix_lora, save_lora
from focusfix_core.rewards import convert_reward, load_reward
from reward_files import REWARD_FILES

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about odd pickle protocols


def _tmp(tmp_path_factory, name):
    return tmp_path_factory.mktemp("p3files") / name


def _loads_or_refuses(path):
    """Load `path`; a ValueError must name the file. Returns (tensors, metadata) or None when refused."""
    try:
        return load_tensor_file_with_metadata(path)
    except ValueError as e:
        assert str(path) in str(e) or path.name in str(e), f"the error does not name the file: {e}"
        return None


# ---------------------------------------------------------------------------------------- safetensors, bytes
@FAST
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".safetensors", ".sft", ".SafeTensors"]))
def test_any_bytes_named_safetensors_load_or_are_refused_naming_the_file(tmp_path_factory, data, suffix):
    path = _tmp(tmp_path_factory, "x" + suffix)
    path.write_bytes(data)
    out = _loads_or_refuses(path)
    if out is not None:  # only a real safetensors file loads: an 8-byte length and a JSON header
        assert len(data) >= 8 + struct.unpack("<Q", data[:8])[0]


GOOD_ST = save({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16)}, metadata={"k": "v"})


@FAST
@given(cut=st.integers(0, len(GOOD_ST) - 1))
def test_a_truncated_safetensors_file_is_refused_naming_the_file(tmp_path_factory, cut):
    path = _tmp(tmp_path_factory, "cut.safetensors")
    path.write_bytes(GOOD_ST[:cut])
    assert _loads_or_refuses(path) is None


@FAST
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD_ST) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_damaged_safetensors_file_loads_as_its_header_declares_or_is_refused(tmp_path_factory, flips):
    data = bytearray(GOOD_ST)
    for i, b in flips:
        data[i] = b
    path = _tmp(tmp_path_factory, "flip.safetensors")
    path.write_bytes(bytes(data))
    out = _loads_or_refuses(path)
    if out is not None:
        tensors, metadata = out
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        header = json.loads(bytes(data[8:8 + n]))
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        for k, t in tensors.items():
            assert list(t.shape) == header[k]["shape"]


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XX", 5, None]
_DIMS = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**40, 2**63 - 1, 2**64, -1]), st.just(1.5),
                  st.just("a"))
_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(_DTYPES),
    "shape": st.lists(_DIMS, max_size=3),
    "data_offsets": st.tuples(st.sampled_from([0, 1, 4, 8, 16, 2**63, -4]),
                              st.sampled_from([0, 1, 4, 8, 16, 32, 64, -1, 2**64])).map(lambda t: [t[0], t[0] + t[1]]),
})
_META = st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                  st.sampled_from([{"k": 1}, {"k": None}, {"k": ["a"]}, {"k": {"a": "b"}}, [], "s", None]))


@FAST
@given(entries=st.dictionaries(st.sampled_from(["w", "x", "w.alpha", "__metadata__x"]), _ENTRY, max_size=3),
       meta=st.none() | _META, payload=st.sampled_from([0, 8, 64, 100]))
def test_a_safetensors_header_with_absurd_shapes_offsets_or_metadata_is_refused_or_loads_as_declared(
        tmp_path_factory, entries, meta, payload):
    header = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    path = _tmp(tmp_path_factory, "h.safetensors")
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * payload)
    out = _loads_or_refuses(path)
    if out is not None:
        tensors, metadata = out
        assert set(tensors) == set(entries)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        for k, t in tensors.items():
            assert list(t.shape) == entries[k]["shape"]
            assert t.numel() * t.element_size() == entries[k]["data_offsets"][1] - entries[k]["data_offsets"][0]


# --------------------------------------------------------------------------------------------- pickles
RAN = []


def _ran(what):
    RAN.append(what)


class Boom:
    """An object whose unpickling would run code (calls this module's `_ran`)."""

    def __reduce__(self):
        return (_ran, ("ran",))


@FAST
@given(where=st.sampled_from(["top", "value", "list", "nested"]), suffix=st.sampled_from([".pt", ".pth", ".bin",
                                                                                          ".ckpt"]),
       zipped=st.booleans())
def test_a_pickle_holding_objects_is_refused_and_never_run(tmp_path_factory, where, suffix, zipped):
    obj = {"top": Boom(), "value": {"w": torch.ones(2), "x": Boom()}, "list": [torch.ones(1), Boom()],
           "nested": {"state_dict": {"w": Boom()}}}[where]
    path = _tmp(tmp_path_factory, "obj" + suffix)
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    RAN.clear()
    with pytest.raises(ValueError, match="NOT executed"):
        load_tensor_file_with_metadata(path)
    assert RAN == []


def _zip_pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"a": torch.arange(6.0), "b": torch.ones(2, 2)}, buf)
    return buf.getvalue()


GOOD_ZIP = _zip_pt()


@FAST
@given(cut=st.integers(0, len(GOOD_ZIP) - 1), suffix=st.sampled_from([".pt", ".pth", ".bin", ".ckpt"]))
def test_a_truncated_zip_torch_file_is_refused_naming_the_file(tmp_path_factory, cut, suffix):
    path = _tmp(tmp_path_factory, "cut" + suffix)
    path.write_bytes(GOOD_ZIP[:cut])
    assert _loads_or_refuses(path) is None


@FAST
@given(values=st.lists(st.sampled_from(["tensor", "int", "str", "none", "list"]), min_size=1, max_size=4),
       wrap=st.booleans())
def test_a_pickle_of_plain_values_other_than_tensors_is_refused_naming_the_file(tmp_path_factory, values, wrap):
    make = {"tensor": lambda: torch.ones(1), "int": lambda: 3, "str": lambda: "s", "none": lambda: None,
            "list": lambda: [torch.ones(1)]}
    d = {f"k{i}": make[v]() for i, v in enumerate(values)}
    path = _tmp(tmp_path_factory, "plain.pt")
    torch.save({"state_dict": d} if wrap else d, path)
    out = _loads_or_refuses(path)
    if all(v == "tensor" for v in values):
        assert out is not None and all(torch.equal(out[0][k], d[k]) for k in d) and out[1] == {}
    else:
        assert out is None


# Fixed, was BUG 1: a damaged or foreign .pt/.pth/.bin/.ckpt raises KeyError / IndexError / struct.error / AssertionError from
# torch's weights-only unpickler instead of the documented ValueError ("corrupt/truncated file"). `_torch_load`
# catches only UnpicklingError, RuntimeError, EOFError, OSError and ValueError. Minimal inputs: a file named
# `x.pt` holding b"." (IndexError: pop from empty list) or the text b"hello" (KeyError: 101); a legacy
# (`_use_new_zipfile_serialization=False`) torch file truncated to 1 byte (IndexError) or 28 bytes (struct.error).
# It reaches load_reward, convert-reward, --continue-from, --resume (load_training_state) and FocusFix Load LoRA.
@FAST
@given(data=st.binary(max_size=64), suffix=st.sampled_from([".pt", ".pth", ".bin", ".ckpt"]))
def test_any_bytes_named_pt_load_or_are_refused_naming_the_file(tmp_path_factory, data, suffix):
    path = _tmp(tmp_path_factory, "x" + suffix)
    path.write_bytes(data)
    _loads_or_refuses(path)  # fails for data=b"." (IndexError) and data=b"hello" (KeyError)


# ------------------------------------------------------------------------------------------------ LoRA files
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(6, 5), nn.Linear(4, 5)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(Block())  # paths 0.to_q, 0.to_k, 0.conv


SHAPES = {"0.to_q": (5, 6, ()), "0.to_k": (5, 4, ()), "0.conv": (2, 3, (3, 3))}


@st.composite
def lora_files(draw):
    """A FocusFix-style LoRA file (tensors, metadata) of `_net()`, possibly damaged: another rank in one up or
    down, a NaN, an int dtype, a missing part, an extra key, an alpha that disagrees with the metadata."""
    rank = draw(st.integers(1, 3))
    alpha = draw(st.sampled_from([0.5, 1.0, float(rank), 4.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensors = {}
    for path, (out, fin, k) in SHAPES.items():
        key = "lora_unet_" + path.replace(".", "_")
        one = (1, 1) if k else ()
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, fin, *k, generator=g).to(dtype)
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, rank, *one, generator=g).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    meta = {"focusfix_targets": json.dumps([r"to_q$", r"to_k$", r"conv$"]), "ss_network_alpha": f"{alpha:g}",
            "ss_network_dim": str(rank)}
    damage = draw(st.sampled_from(["none", "rank", "nan", "int", "drop", "extra", "alpha", "shape"]))
    keys = sorted(k for k in tensors if not k.endswith(".alpha"))
    key = draw(st.sampled_from(keys))
    t = tensors[key]
    if damage == "rank":
        shape = list(t.shape)
        shape[0 if key.endswith("lora_down.weight") else 1] = rank + 1
        tensors[key] = torch.randn(*shape, generator=g).to(dtype)
    elif damage == "nan":
        tensors[key] = t.clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view(t.shape)
    elif damage == "int":
        tensors[key] = t.to(torch.int8)
    elif damage == "drop":
        del tensors[key]
    elif damage == "extra":
        tensors["lora_unet_0_nothing.lora_down.weight"] = torch.ones(rank, 2, dtype=dtype)
    elif damage == "alpha":
        tensors[key.rsplit(".", 2)[0] + ".alpha"] = torch.tensor(alpha * 3, dtype=dtype)
    elif damage == "shape":
        shape = list(t.shape)
        shape[-1 if t.ndim == 2 else 1] += 1
        tensors[key] = torch.randn(*shape, generator=g).to(dtype)
    return tensors, meta, damage


@FAST
@given(case=lora_files())
def test_a_damaged_lora_file_is_read_exactly_or_refused_naming_the_file(tmp_path_factory, case):
    """read_focusfix_lora then attach: either the adapters hold exactly the file's weights with its alpha, or a
    ValueError names the file. Every kind of damage drawn here must be refused (none is a valid LoRA)."""
    tensors, meta, damage = case
    path = _tmp(tmp_path_factory, "fix.safetensors")
    save_file(tensors, str(path), metadata=meta)
    net = _net()
    try:
        saved = read_focusfix_lora(path)
        lora = saved.attach(net)
    except ValueError as e:
        assert "fix.safetensors" in str(e), str(e)
        assert damage != "none", f"a valid LoRA file was refused: {e}"
        return
    assert damage == "none", f"damage {damage!r} was not refused"
    for name, a in zip(lora.module_names, lora.adapters):
        key = "lora_unet_" + name.replace(".", "_")
        assert torch.equal(a.down, tensors[f"{key}.lora_down.weight"].float())
        assert torch.equal(a.up, tensors[f"{key}.lora_up.weight"].float())
        assert a.alpha == pytest.approx(float(tensors[f"{key}.alpha"]), rel=1e-6)
        assert a.alpha == pytest.approx(lora.alpha, rel=1e-2)
    lora.remove()


@FAST
@given(case=lora_files())
def test_merge_kohya_into_merges_a_valid_lora_or_refuses_and_leaves_the_net(case):
    """merge_kohya_into: a ValueError for any damage that breaks the kohya layout, the net untouched; a NaN or
    int tensor is the loader's job (load_lora_file), so only layout damage is drawn into the expectation."""
    tensors, _, damage = case
    assume(damage not in ("nan", "int", "alpha"))  # values, not layout: load_lora_file checks them
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        merged = merge_kohya_into(net, tensors)
    except ValueError:
        assert damage != "none"
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        return
    assert damage == "none"
    assert sorted(merged) == sorted(SHAPES)


# Fixed, was BUG 2: a `.lora_down.weight` that is a 0-dim tensor (one number) raises IndexError ("tuple index out of range")
# from `read_focusfix_lora` (`v.shape[0]` when it counts ranks) and from `merge_kohya_into` / `lora_weight_delta`
# (`r = down.shape[0]` before its shape check), instead of a ValueError naming the file / the shapes.
# Minimal input: save_file({"lora_unet_0.lora_down.weight": torch.tensor(1.0), "lora_unet_0.lora_up.weight":
# torch.ones(4, 1)}, "x.safetensors", metadata={"focusfix_targets": '["all_linear"]'}); read_focusfix_lora(...).
# Through the command line (--continue-from x.safetensors) it is a Python traceback.
@pytest.mark.parametrize("down, up", [(torch.tensor(1.0), torch.ones(4, 1)), (torch.ones(()), torch.ones(4))])
def test_a_scalar_lora_down_is_refused_naming_the_file(tmp_path, down, up):
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_0.lora_down.weight": down, "lora_unet_0.lora_up.weight": up}, str(path),
              metadata={"focusfix_targets": '["all_linear"]'})
    with pytest.raises(ValueError, match="x.safetensors"):
        read_focusfix_lora(path)                                   # IndexError
    with pytest.raises(ValueError):
        merge_kohya_into(nn.Sequential(nn.Linear(4, 4)), load_lora_file(path)[0])   # IndexError


# Fixed, was BUG 3: a rank-0 LoRA (down [0,in], up [out,0]: shapes that compose) raises ZeroDivisionError from
# `lora_weight_delta` (`strength * alpha / r` with r = 0), so from `merge_kohya_into`, instead of the documented
# ValueError. Minimal input: lora_weight_delta(torch.zeros(0, 4), torch.zeros(4, 0)).
def test_a_rank_0_lora_is_refused_by_merge():
    tensors = {"lora_unet_0.lora_down.weight": torch.zeros(0, 4), "lora_unet_0.lora_up.weight": torch.zeros(4, 0)}
    with pytest.raises(ValueError):
        merge_kohya_into(nn.Sequential(nn.Linear(4, 4)), tensors)  # ZeroDivisionError


# Fixed, was BUG 4: `read_focusfix_lora` parses the file's `focusfix_targets` metadata with json.loads and catches only
# ValueError/TypeError: a deeply nested JSON array raises RecursionError. Minimal input: metadata
# {"focusfix_targets": "[" * 100000 + "]" * 100000} on any LoRA tensors.
def test_deeply_nested_targets_metadata_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_0.lora_down.weight": torch.ones(2, 4), "lora_unet_0.lora_up.weight": torch.ones(4, 2)},
              str(path), metadata={"focusfix_targets": "[" * 100000 + "]" * 100000})
    with pytest.raises(ValueError, match="x.safetensors"):
        read_focusfix_lora(path)  # RecursionError


# Fixed, was BUG 5: a FocusFix LoRA file without `.alpha` tensors (kohya's convention: alpha = rank) whose metadata says
# ss_network_alpha 1 is accepted by read_focusfix_lora (SavedLoRA.alpha = 1), but `attach` gives adapters with
# alpha = rank (load_kohya's default) while the LoRA's own `alpha` stays 1. Saving that LoRA again writes
# `.alpha` = 2 beside ss_network_alpha "1", a file read_focusfix_lora then refuses ("the file was altered after
# FocusFix saved it"). Minimal input: rank 2, tensors {"lora_unet_0.lora_down.weight": ones(2, 4),
# "lora_unet_0.lora_up.weight": ones(4, 2)}, metadata {"focusfix_targets": '["all_linear"]',
# "ss_network_alpha": "1"}, net nn.Sequential(nn.Linear(4, 4)). Either the file must be refused, or the adapters
# must take the metadata's alpha; a file FocusFix accepted and continued must read back. Now refused: without
# .alpha every LoRA loader applies alpha = rank, so the metadata's other alpha means the file was altered.
@pytest.mark.parametrize("alpha", ["1", "2"])
def test_a_lora_without_alpha_tensors_continues_into_a_file_that_reads_back(tmp_path, alpha):
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_0.lora_down.weight": torch.ones(2, 4), "lora_unet_0.lora_up.weight": torch.ones(4, 2)},
              str(path), metadata={"focusfix_targets": '["all_linear"]', "ss_network_alpha": alpha})
    if alpha == "1":  # not the rank
        with pytest.raises(ValueError, match=r"x\.safetensors.*no \.alpha tensors.*alpha = rank \(2\).*altered"):
            read_focusfix_lora(path)
        return
    lora = read_focusfix_lora(path).attach(nn.Sequential(nn.Linear(4, 4)))
    assert {a.alpha for a in lora.adapters} == {lora.alpha} == {2.0}
    save_lora(tmp_path / "again.safetensors", lora)
    assert read_focusfix_lora(tmp_path / "again.safetensors").alpha == 2.0


# ---------------------------------------------------------------------------------------------- reward files


@st.composite
def damaged_reward_files(draw):
    """A reward file with 1-2 keys damaged in ways that keep each tensor's number of dimensions: dropped, another
    size, an int dtype, a NaN, or an extra key. The layouts stay readable by key, so the loader must refuse."""
    kind = draw(st.sampled_from(sorted(REWARD_FILES)))
    sd = REWARD_FILES[kind]()
    damages = []
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(sd)))
        op = draw(st.sampled_from(["drop", "size", "int", "nan", "extra"]))
        t = sd[key]
        if op == "drop":
            del sd[key]
        elif op == "size" and t.ndim:
            dim = draw(st.integers(0, t.ndim - 1))
            shape = list(t.shape)
            shape[dim] = max(1, shape[dim] + draw(st.sampled_from([-1, 1, 3])))
            if shape == list(t.shape):
                continue
            sd[key] = torch.randn(shape)
        elif op == "int":
            sd[key] = t.to(torch.int32)
        elif op == "nan" and t.numel() and t.is_floating_point():  # (an earlier "int" damage of the same key)
            sd[key] = t.clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view(t.shape)
        elif op == "extra":
            sd["unexpected.weight"] = torch.ones(3)
        else:
            continue
        damages.append((op, key))
    return kind, sd, damages


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged_reward_files())
def test_a_damaged_reward_file_is_refused_naming_the_file_by_load_and_convert(tmp_path_factory, case):
    kind, sd, damages = case
    d = tmp_path_factory.mktemp("reward")
    path = d / "reward.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    for fn in (lambda: load_reward(path), lambda: convert_reward(path, d / "out.safetensors")):
        if not damages:
            fn()  # undamaged: loads
            continue
        with pytest.raises(ValueError, match="reward.safetensors"):
            fn()
    if damages:
        assert not (d / "out.safetensors").exists()


@FAST
@given(kind=st.sampled_from(sorted(REWARD_FILES)), fmt=st.sampled_from([".pt", ".pth", ".safetensors"]))
def test_a_reward_file_converts_and_loads_back_to_the_same_scores(tmp_path_factory, kind, fmt):
    d = tmp_path_factory.mktemp("conv")
    sd = REWARD_FILES[kind]()
    src = d / f"r{fmt}"
    if fmt == ".safetensors":
        save_file(sd, str(src))
    else:
        torch.save(sd, src)
    out = convert_reward(src, d / "r_out.safetensors")
    I = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_reward(out)(I), load_reward(src)(I), rtol=0, atol=0)


# Fixed, was BUG 6 (reward tensors of another rank crashed inside torch): see tests/test_reward_model_files.py.


# Fixed, was BUG 7 (a tiny reward of width -1): see tests/test_reward_model_files.py.
