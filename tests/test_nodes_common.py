"""nodes/common.py and nodes/lora_nodes.py without ComfyUI (stand-in modules, as tests/test_properties4_lora_nodes.py
and tests/test_rewards_nodes.py use): file fingerprints, progress and cancel, graph metadata, Save/Apply LoRA. Each
test pins behaviour that mutation testing found no earlier test held."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from comfy_stubs import folder_paths_stub
from pack_loader import load_pack
from safetensors import safe_open

PACK = load_pack()
C = PACK.nodes.common
L = PACK.nodes.lora_nodes
A = PACK.nodes.adapters


def _lora() -> "A.LoraData":
    t = {"lora_unet_0.lora_down.weight": torch.ones(2, 4), "lora_unet_0.lora_up.weight": torch.ones(4, 2),
         "lora_unet_0.alpha": torch.tensor(2.0)}
    meta = {"focusfix_targets": '["all_linear"]', "ss_network_alpha": "2", "ss_network_dim": "2"}
    return A.LoraData(tensors=t, metadata=meta, rank=2, alpha=2.0, targets=("all_linear",))


# ------------------------------------------------------------------------------------------- common.py
class _Interrupted(Exception):
    pass


def _comfy(monkeypatch, cancelled):
    """comfy.model_management (cancel pressed while cancelled() is true) and comfy.utils.ProgressBar stand-ins."""
    comfy, mm, utils = (types.ModuleType(n) for n in ("comfy", "comfy.model_management", "comfy.utils"))

    def throw():
        if cancelled():
            raise _Interrupted

    updates = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total, preview):
            updates.append((value, total))

    mm.throw_exception_if_processing_interrupted, utils.ProgressBar = throw, Bar
    comfy.model_management, comfy.utils = mm, utils
    for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    return updates


def _records(n, drawn):
    for i in range(n):
        drawn.append(i)  # a training step runs when its record is drawn
        yield types.SimpleNamespace(step=i, summary=lambda i=i: f"step {i}")


def test_run_with_progress_reports_each_step_and_calls_on_record(monkeypatch):
    """The bar shows steps done (1..total) and on_record (the checkpoint save) runs after every step (mutants: the
    bar one behind; on_record skipped)."""
    updates = _comfy(monkeypatch, lambda: False)
    drawn, seen = [], []
    history = C.run_with_progress(_records(3, drawn), 3, on_record=lambda r: seen.append(r.step))
    assert [r.step for r in history] == seen == [0, 1, 2]
    assert updates == [(1, 3), (2, 3), (3, 3)]


def test_a_cancel_before_the_first_step_runs_no_step(monkeypatch):
    """Cancel is checked before every step (mutant: the check before the loop removed, so a cancelled run still
    trained one step)."""
    _comfy(monkeypatch, lambda: True)
    drawn = []
    with pytest.raises(_Interrupted):
        C.run_with_progress(_records(3, drawn), 3)
    assert drawn == []


def test_a_cancel_during_a_step_stops_before_the_next(monkeypatch):
    """Cancel pressed during step 0: no step 1 (mutant: the check after each step removed)."""
    pressed = []
    _comfy(monkeypatch, lambda: bool(pressed))
    drawn = []
    with pytest.raises(_Interrupted):
        C.run_with_progress(_records(3, drawn), 3, on_record=lambda r: pressed.append(True))
    assert drawn == [0]


@pytest.mark.parametrize("disabled", [True, False])
def test_graph_metadata_follows_disable_metadata(monkeypatch, disabled):
    """ComfyUI's --disable-metadata keeps the graph out of saved files (mutant: the flag ignored)."""
    comfy, cli_args = types.ModuleType("comfy"), types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=disabled)
    comfy.cli_args = cli_args
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    out = C.graph_metadata({"1": {"class_type": "X"}}, {"workflow": {"nodes": []}})
    assert out == ({} if disabled else {"prompt": '{"1": {"class_type": "X"}}', "workflow": '{"nodes": []}'})


def test_file_fingerprint_follows_a_rewrite_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    """IS_CHANGED is the file's sha256, hashed again when size, times or inode change: a file rewritten in place
    with the same size, its old mtime put back, is hashed again (ctime moved), so ComfyUI does not serve the old
    LoRA from its cache (mutants: the stamp not compared; the stamp without inode and ctime). A missing file is ""."""
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths_stub(tmp_path))
    monkeypatch.setattr(C, "_DIGESTS", {})
    path = tmp_path / "fix.safetensors"
    path.write_bytes(b"first LoRA")
    first = C.file_fingerprint("loras", "fix.safetensors")
    st = os.stat(path)
    with open(path, "r+b") as f:  # the same inode, the same size
        f.write(b"other LoRA")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    import hashlib
    assert C.file_fingerprint("loras", "fix.safetensors") == hashlib.sha256(b"other LoRA").hexdigest() != first
    assert C.file_fingerprint("loras", "missing.safetensors") == ""


# ------------------------------------------------------------------------------------------- lora_nodes.py
def test_a_name_with_surrounding_spaces_is_saved_under_the_trimmed_name(tmp_path):
    """A widget value " fix " (a space typed or pasted) names fix.safetensors (mutant: not stripped, so refused
    as a name ending in a space)."""
    assert L.lora_path(" fixes/hands ", folder=str(tmp_path)) == tmp_path.resolve() / "fixes" / "hands.safetensors"


def test_graph_metadata_never_replaces_the_loras_own_entries(tmp_path):
    """extra_metadata (the graph's extra_pnginfo entries) cannot change what loaders read (mutant: merged the other
    way round, so an extra entry named like a LoRA entry won)."""
    data = _lora()
    path = L.write_lora(data, tmp_path / "x.safetensors", {"ss_network_alpha": "99", "workflow": "{}"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_alpha"] == "2" and meta["workflow"] == "{}"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_read_only_preview_keeps_its_lora_with_overwrite(tmp_path):
    """The LoRA and its thumbnail are replaced together or not at all (mutant: only the LoRA's own mode checked,
    so the LoRA was replaced beside a thumbnail that stayed the old one's)."""
    first = L.save_lora_data(_lora(), "fix", overwrite=False, folder=str(tmp_path))
    before = first.read_bytes()
    preview = L.preview_path(first)
    preview.write_bytes(b"old thumbnail")
    os.chmod(preview, 0o444)
    try:
        other = _lora()
        other.tensors["lora_unet_0.lora_up.weight"] = torch.full((4, 2), 3.0)
        with pytest.raises(PermissionError, match="read-only, and was kept"):
            L.save_lora_data(other, "fix", overwrite=True, folder=str(tmp_path))
        assert first.read_bytes() == before
    finally:
        os.chmod(preview, 0o644)


def test_save_preview_without_overwrite_keeps_an_existing_thumbnail(tmp_path):
    """save_preview returns None and writes nothing where the thumbnail exists and not overwrite (mutant: always
    replaced)."""
    lora_file = tmp_path / "fix.safetensors"
    L.preview_path(lora_file).write_bytes(b"not ours")
    assert L.save_preview(torch.zeros(1, 3, 8, 8), lora_file, overwrite=False) is None
    assert L.preview_path(lora_file).read_bytes() == b"not ours"
    assert L.save_preview(torch.zeros(1, 3, 8, 8), lora_file, overwrite=True) == L.preview_path(lora_file)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_drop_preview_leaves_a_symlink(tmp_path):
    """A symlink named as the thumbnail is left (mutant: unlinked)."""
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"png")
    lora_file = tmp_path / "fix.safetensors"
    L.preview_path(lora_file).symlink_to(target)
    assert L.drop_preview(lora_file) is False
    assert L.preview_path(lora_file).is_symlink()


def test_apply_lora_patches_a_clone_at_the_widgets_strength(monkeypatch):
    """Apply LoRA: a patched copy, at `strength` (mutants: strength ignored; the input MODEL patched itself)."""
    class Model:
        def __init__(self):
            self.added = []

        def clone(self):
            return Model()

        def add_patches(self, patches, strength):
            self.added.append((patches, strength))

    monkeypatch.setattr(L, "lora_patches", lambda model, lora: {"w": "patch"})
    model = Model()
    (out,) = L.FocusFixApplyLoRA().execute(model, _lora(), 0.25)
    assert out is not model and model.added == []
    assert out.added == [({"w": "patch"}, 0.25)]


def test_layers_applied_counts_only_live_nonzero_patches_of_the_same_values(monkeypatch):
    """A layer counts as applied upstream only at a strength other than 0 and when it adds something (mutants:
    strength 0 counted; an all-zero layer counted; the tolerance widened to rtol=atol=1, so another LoRA counted)."""
    up, down = torch.ones(4, 2), torch.ones(2, 4)
    zero_up = torch.zeros(4, 2)
    ours = {"a.weight": ("lora", (up, down)), "b.weight": ("lora", (zero_up, down)), "c.weight": ("lora", (up, down)),
            "d.weight": ("lora", (up, down))}
    monkeypatch.setattr(L, "lora_patches", lambda model, lora: ours)
    model = types.SimpleNamespace(patches={
        "a.weight": [(1.0, ("lora", (up.clone(), down.clone())))],   # applied: counts
        "b.weight": [(1.0, ("lora", (zero_up.clone(), down.clone())))],  # a zero layer: adds nothing
        "c.weight": [(0.0, ("lora", (up.clone(), down.clone())))],   # at strength 0: off
        "d.weight": [(1.0, ("lora", (up * 5, down * 0.5)))],          # another LoRA's values
    })
    assert L.layers_applied(model, _lora()) == 1
