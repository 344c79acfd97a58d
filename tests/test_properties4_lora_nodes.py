"""Property tests (hypothesis) for FocusFix Save LoRA / Load LoRA (nodes/lora_nodes.py) and `LoraData`
(nodes/adapters.py), without ComfyUI: `folder_paths` is a stand-in that looks files up as ComfyUI's does
(`get_full_path`: the name joined under the folder, a file; `get_filename_list`: every file below the folder, links
followed), and `comfy.cli_args` one with metadata on. A tmp folder is the loras folder.

Promised (README, the nodes' tooltips, `safe_join` / `lora_path` / `save_lora_data`): the saved file never leaves
the loras folder, an existing file is never replaced unless `overwrite` (a counter `_00001` is added instead), the
returned name is the one Load LoRA lists and loads back to the same LoRA, and a refused name is refused at queue
time (VALIDATE_INPUTS) exactly when the save would refuse it, writing nothing."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from comfy_stubs import folder_paths_stub
from pack_loader import load_pack
from torch import nn

PACK = load_pack()
L = PACK.nodes.lora_nodes
A = PACK.nodes.adapters
CORE_LORA = PACK.focusfix_core.lora
FAST = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------------- stand-ins
def _comfy_modules():
    comfy = types.ModuleType("comfy")
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False)
    comfy.cli_args = cli_args
    return {"comfy": comfy, "comfy.cli_args": cli_args}


class _Comfy:
    """Context: the stand-in modules installed, restored on exit."""

    def __init__(self, folder: Path, *more: Path):
        self.folder, self.more, self.mp = folder, more, pytest.MonkeyPatch()

    def __enter__(self):
        self.mp.setitem(sys.modules, "folder_paths", folder_paths_stub(self.folder, *self.more))
        for k, v in _comfy_modules().items():
            self.mp.setitem(sys.modules, k, v)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


# ------------------------------------------------------------------------------------------- a small SD-like net
class _Attn(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])


class _Block(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.attn1, self.attn2 = _Attn(D), _Attn(D)
        self.ff = nn.Linear(D, D)


class _Net(nn.Module):
    def __init__(self, D=6, n=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)  # noqa: the test's own net, not library code
        self.transformer_blocks = nn.ModuleList([_Block(D) for _ in range(n)])

    def forward(self, x):
        return sum(m(x) for m in self.modules() if isinstance(m, nn.Linear))


def _lora_data(targets="attn", rank=2, alpha=None, seed=0, method="focus-n-fix") -> tuple:
    """(net, its hooked trained-looking LoRA, the LoraData a Train node would give)."""
    net = _Net()
    lora = CORE_LORA.LoRA.attach(net, targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    trainer = types.SimpleNamespace(lora=lora, model=types.SimpleNamespace(family=None), method=method,
                                    metadata=lambda: {"focusfix_method": method, "focusfix_seed": str(seed)})
    return net, lora, A.LoraData.from_trainer(trainer)


_DATA_CACHE: dict = {}


def _data(seed: int):
    if seed not in _DATA_CACHE:
        net, lora, data = _lora_data(seed=seed)
        lora.remove()
        _DATA_CACHE[seed] = data
    return _DATA_CACHE[seed]


def _same_lora(a, b) -> None:
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert (a.rank, a.alpha, tuple(a.targets), a.method) == (b.rank, b.alpha, tuple(b.targets), b.method)
    for k, v in a.metadata.items():
        assert b.metadata[k] == v, k


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- names
_PART = st.text(alphabet="abcXYZ019 _-é猫", min_size=1, max_size=8).filter(
    lambda s: s.strip() and not s.endswith(" ") and not s.startswith(" "))
_NAMES = st.lists(_PART, min_size=1, max_size=3).map("/".join)


@FAST
@given(name=_NAMES, overwrite=st.booleans(), existing=st.integers(0, 3), seed=st.integers(0, 3),
       suffix=st.sampled_from(["", ".safetensors", ".SafeTensors"]), sep=st.sampled_from(["/", "\\"]))
def test_save_lora_writes_inside_the_folder_keeps_other_files_and_its_name_loads_back(
        tmp_path_factory, name, overwrite, existing, seed, suffix, sep):
    folder = tmp_path_factory.mktemp("loras")
    name = name.replace("/", sep) + suffix
    data = _data(seed)
    with _Comfy(folder):
        # earlier saves of this name (other LoRAs): kept unless overwrite
        for i in range(existing):
            L.FocusFixSaveLoRA().execute(_data((seed + 1 + i) % 4), name, False)
        before = _snapshot(folder)
        assert L.FocusFixSaveLoRA.VALIDATE_INPUTS(filename=name) is True
        out = L.FocusFixSaveLoRA().execute(data, name, overwrite, prompt={"1": {"class_type": "X"}},
                                           extra_pnginfo={"workflow": {"nodes": []}})
        (lora_name,) = out["result"]
        assert out["ui"]["text"] == [lora_name]
        path = (folder / lora_name).resolve()
        assert path.is_file() and path.is_relative_to(folder.resolve())
        assert lora_name in sys.modules["folder_paths"].get_filename_list("loras")
        loaded = L.FocusFixLoadLoRA().execute(lora_name)[0]
        _same_lora(data, loaded)
        assert json.loads(loaded.metadata["prompt"]) == {"1": {"class_type": "X"}}
        assert json.loads(loaded.metadata["workflow"]) == {"nodes": []}
    after = _snapshot(folder)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    rel = str(path.relative_to(folder.resolve()))
    assert changed == {rel}  # only the file it names
    if existing and overwrite:
        assert rel in before  # replaced the file of that name, as asked
    elif existing:
        assert rel not in before and "_0000" in Path(rel).stem  # a counter, never over an existing file
    else:
        assert rel not in before


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 5), name=_NAMES)
def test_repeated_saves_without_overwrite_each_keep_their_own_lora(tmp_path_factory, n, name):
    folder = tmp_path_factory.mktemp("loras")
    with _Comfy(folder):
        names = [L.FocusFixSaveLoRA().execute(_data(i % 4), name, False)["result"][0] for i in range(n)]
        assert len(set(names)) == n
        for i, lora_name in enumerate(names):
            _same_lora(_data(i % 4), L.FocusFixLoadLoRA().execute(lora_name)[0])


_BAD = st.sampled_from(["../x", "a/../../x", "/abs/x", "\\abs\\x", "C:x", "c:\\x", "..", "a/..", "", "  ", "sub/",
                        "a\0b", "con", "sub/aux.txt", "a:b", "x?", "a./b", ".hidden", "a" * 300, "x/" * 2100 + "x",
                        "a/\ud800"])


@FAST
@given(bad=_BAD, overwrite=st.booleans())
def test_a_refused_name_is_refused_at_queue_time_and_by_the_save_writing_nothing(tmp_path_factory, bad, overwrite):
    root = tmp_path_factory.mktemp("root")
    folder = root / "models" / "loras"
    folder.mkdir(parents=True)
    with _Comfy(folder):
        message = L.FocusFixSaveLoRA.VALIDATE_INPUTS(filename=bad)
        assert isinstance(message, str) and message.startswith("filename ")
        with pytest.raises(ValueError, match="filename"):
            L.FocusFixSaveLoRA().execute(_data(0), bad, overwrite)
    assert _snapshot(root) == {}


@FAST
@given(name=st.text(alphabet="ab/\\.:* ~%$-_\t\n", min_size=0, max_size=12), overwrite=st.booleans())
def test_any_name_is_saved_inside_the_folder_or_refused_at_queue_time_alike(tmp_path_factory, name, overwrite):
    root = tmp_path_factory.mktemp("root")
    folder = root / "loras"
    folder.mkdir()
    with _Comfy(folder):
        ok = L.FocusFixSaveLoRA.VALIDATE_INPUTS(filename=name)
        try:
            lora_name = L.FocusFixSaveLoRA().execute(_data(0), name, overwrite)["result"][0]
        except ValueError as e:
            assert ok is not True and str(e) in ok
            assert _snapshot(root) == {}
            return
        assert ok is True
        path = (folder / lora_name).resolve()
        assert path.is_relative_to(folder.resolve()) and path.suffix == ".safetensors"
        assert list(_snapshot(root)) == [str(Path("loras") / lora_name)]
        _same_lora(_data(0), L.FocusFixLoadLoRA().execute(lora_name)[0])


@settings(max_examples=20, deadline=None)
@given(name=_NAMES, H=st.integers(1, 12), W=st.integers(1, 12), B=st.integers(1, 3), seed=st.integers(0, 99))
def test_a_preview_lands_beside_its_own_lora_and_never_replaces_another_unless_asked(tmp_path_factory, name, H, W,
                                                                                     B, seed):
    folder = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(seed)
    first, second = torch.rand(B, H, W, 3, generator=g), torch.rand(B, H, W, 3, generator=g)
    from PIL import Image
    import numpy as np

    def png(path):
        return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255

    with _Comfy(folder):
        n1 = L.FocusFixSaveLoRA().execute(_data(0), name, False, preview=first)["result"][0]
        p1 = (folder / n1).with_name(Path(n1).stem + ".preview.png")
        assert torch.allclose(png(p1), first[0], atol=1 / 255 * 0.51 + 1e-6)
        n2 = L.FocusFixSaveLoRA().execute(_data(1), name, False, preview=second)["result"][0]
        p2 = (folder / n2).with_name(Path(n2).stem + ".preview.png")
        assert n2 != n1 and p2 != p1
        assert torch.allclose(png(p1), first[0], atol=1 / 255 * 0.51 + 1e-6)  # the first LoRA's own preview
        assert torch.allclose(png(p2), second[0], atol=1 / 255 * 0.51 + 1e-6)
        n3 = L.FocusFixSaveLoRA().execute(_data(2), name, True, preview=second)["result"][0]
        assert n3 == n1 and torch.allclose(png(p1), second[0], atol=1 / 255 * 0.51 + 1e-6)


def test_a_lora_saved_over_another_without_a_preview_does_not_keep_the_old_thumbnail(tmp_path):
    """overwrite on, no preview: the replaced LoRA's <name>.preview.png went on showing beside the new file in
    A1111/Forge and LoRA managers (review A2). It is removed (and said); overwrite off keeps a stranger's."""
    folder = tmp_path / "loras"
    folder.mkdir()
    with _Comfy(folder):
        save = L.FocusFixSaveLoRA()
        save.execute(_data(0), "fix", False, preview=torch.rand(1, 4, 4, 3))
        thumb = folder / "fix.preview.png"
        assert thumb.is_file()
        out = save.execute(_data(1), "fix", True)
        assert out["result"][0] == "fix.safetensors" and not thumb.exists()
        assert "removed fix.preview.png" in out["ui"]["text"][0]
        assert "removed" not in save.execute(_data(2), "fix", True)["ui"]["text"][0]  # nothing there: no note
        thumb.mkdir()  # not a file: left alone
        assert "removed" not in save.execute(_data(0), "fix", True)["ui"]["text"][0] and thumb.is_dir()
        thumb.rmdir()
        (folder / "other.preview.png").write_bytes(b"mine")
        assert save.execute(_data(0), "other", False)["result"][0] == "other_00001.safetensors"
        assert (folder / "other.preview.png").read_bytes() == b"mine"


@settings(max_examples=15, deadline=None)
@given(bad=st.sampled_from([torch.rand(1, 8, 8), torch.full((1, 8, 8, 3), float("nan")), torch.rand(0, 8, 8, 3),
                            (torch.rand(1, 8, 8, 3) * 255).round().to(torch.uint8)]))
def test_a_bad_preview_is_refused_by_name_before_the_lora_is_written(tmp_path_factory, bad):
    folder = tmp_path_factory.mktemp("loras")
    with _Comfy(folder):
        with pytest.raises(ValueError, match="preview"):
            L.FocusFixSaveLoRA().execute(_data(0), "fix", False, preview=bad)
    assert _snapshot(folder) == {}


def test_load_lora_refuses_a_name_that_leaves_the_folder(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    with _Comfy(folder):
        L.FocusFixSaveLoRA().execute(_data(0), "fix", False)
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes((folder / "fix.safetensors").read_bytes())
        for name in ("../outside.safetensors", str(outside)):
            with pytest.raises(FileNotFoundError):
                L.FocusFixLoadLoRA().execute(name)


# ------------------------------------------------------------------------------------------- LoraData round trip
@settings(max_examples=20, deadline=None)
@given(targets=st.sampled_from(["attn", "to_k", "all_linear", ("attn1\\.to_q$", "ff$")]), rank=st.integers(1, 6),
       alpha=st.one_of(st.none(), st.integers(1, 16), st.sampled_from([0.5, 0.25, 3.0, 12.5])),
       seed=st.integers(0, 2**16), method=st.sampled_from(["focus-n-fix", "draft", "separate-enhance"]))
def test_a_saved_lora_data_reads_back_and_attaches_as_the_trained_lora(tmp_path_factory, targets, rank, alpha, seed,
                                                                       method):
    folder = tmp_path_factory.mktemp("loras")
    net, lora, data = _lora_data(targets, rank, alpha, seed, method)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = net(x)
    lora.remove()
    assert data.rank == rank and data.alpha == (rank if alpha is None else alpha) and data.method == method
    assert all(v.dtype == torch.float32 for v in data.tensors.values())
    path = L.save_lora_data(data, "fix", folder=folder)
    back = A.LoraData.from_file(path)
    _same_lora(data, back)
    assert back.saved().config_targets == (targets if isinstance(targets, str) else tuple(targets))
    again = back.attach(net)
    try:
        with torch.no_grad():
            torch.testing.assert_close(net(x), want)
    finally:
        again.remove()
    # the stock loaders' view: every layer's .alpha tensor is the LoRA's alpha
    alphas = {float(v) for k, v in back.tensors.items() if k.endswith(".alpha")}
    assert alphas == {float(data.alpha)}


@settings(max_examples=15, deadline=None)
@given(name=_NAMES, linked_sub=st.booleans(), overwrite=st.booleans())
def test_a_loras_folder_reached_through_a_link_lists_and_loads_the_saved_name(tmp_path_factory, name, linked_sub,
                                                                             overwrite):
    """ComfyUI's models/loras is often a link to another drive (and a subfolder of it a link to a third): the name
    Save LoRA returns is relative to the folder as ComfyUI names it, listed and loaded back by Load LoRA."""
    root = tmp_path_factory.mktemp("root")
    (root / "drive").mkdir()
    (root / "other").mkdir()
    (root / "models").mkdir()
    (root / "models" / "loras").symlink_to(root / "drive", target_is_directory=True)
    folder = root / "models" / "loras"
    if linked_sub:
        (root / "drive" / "shared").symlink_to(root / "other", target_is_directory=True)
        name = "shared/" + name
    with _Comfy(folder):
        lora_name = L.FocusFixSaveLoRA().execute(_data(1), name, overwrite)["result"][0]
        assert not os.path.isabs(lora_name) and ".." not in Path(lora_name).parts
        assert lora_name in sys.modules["folder_paths"].get_filename_list("loras")
        _same_lora(_data(1), L.FocusFixLoadLoRA().execute(lora_name)[0])
    written = [p for p in (root / ("other" if linked_sub else "drive")).rglob("*.safetensors")]
    assert len(written) == 1


@settings(max_examples=20, deadline=None)
@given(name=_NAMES, overwrite=st.booleans(), in_first=st.booleans())
def test_a_name_in_another_loras_folder_is_never_hidden(tmp_path_factory, name, overwrite, in_first):
    """Review s29: ComfyUI lists its loras folders (models/loras, extra_model_paths.yaml's: an A1111 models/Lora) as
    one, a name loading from the first folder holding it. A save into the first folder under a name only a later
    folder held hid the artist's LoRA from every loader; it now takes a counter, and overwrite (which replaces only
    the first folder's file) is refused by name at queue time. Checkpoints take a counter too."""
    root = tmp_path_factory.mktemp("root")
    first, theirs = root / "models" / "loras", root / "webui" / "Lora"
    fname = name.strip() + ".safetensors"
    (theirs / fname).parent.mkdir(parents=True)
    (theirs / fname).write_bytes(b"the artist's own LoRA")
    first.mkdir(parents=True)
    if in_first:
        (first / fname).parent.mkdir(parents=True, exist_ok=True)
        (first / fname).write_bytes(b"a FocusFix LoRA saved earlier")
    with _Comfy(first, theirs):
        fp = sys.modules["folder_paths"]
        before = fp.get_full_path("loras", fname)
        message = L.FocusFixSaveLoRA.VALIDATE_INPUTS(filename=name, overwrite=overwrite)
        if overwrite and not in_first:
            assert message.startswith(f"filename {name!r}") and str(theirs) in message and "overwrite off" in message
            with pytest.raises(ValueError, match="another loras folder"):
                L.FocusFixSaveLoRA().execute(_data(0), name, overwrite)
            saved = None
        else:
            assert message is True
            saved = L.FocusFixSaveLoRA().execute(_data(0), name, overwrite)["result"][0]
            assert (saved == fname) == overwrite  # overwrite: the first folder's own file, else a counter
            _same_lora(_data(0), L.FocusFixLoadLoRA().execute(saved)[0])
        assert fp.get_full_path("loras", fname) == before  # the name loads what it loaded before, or the new file
        assert (theirs / fname).read_bytes() == b"the artist's own LoRA"
        assert saved is None or (first / saved).is_file()
        ckpt = PACK.nodes.runs.checkpoint_path(1, name)
        assert ckpt.parent == (first / fname).parent and ckpt.name != fname


def test_only_a_file_another_loras_folder_loads_takes_a_name(tmp_path):
    """Review s29: a dangling link or a folder of that name in another loras folder is nothing a loader reads, so
    it takes no name; nor does a LoRA in ComfyUI's folders take a name in a folder of a caller's own."""
    first, theirs, own = tmp_path / "loras", tmp_path / "Lora", tmp_path / "exports"
    for f in (first, theirs, own):
        f.mkdir()
    (theirs / "gone.safetensors").symlink_to(tmp_path / "missing.safetensors")
    (theirs / "dir.safetensors").mkdir()
    (theirs / "real.safetensors").write_bytes(b"a LoRA")
    with _Comfy(first, theirs):
        assert L.lora_path("gone", overwrite=True) == first / "gone.safetensors"
        assert L.lora_path("dir") == first / "dir.safetensors"
        assert L.lora_path("real") == first / "real_00001.safetensors"
        assert L.lora_path("real", overwrite=True, folder=str(own)) == own / "real.safetensors"
        with pytest.raises(ValueError, match="another loras folder"):
            L.lora_path("real", overwrite=True)
