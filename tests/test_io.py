import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from focusfix_core import io as ffio
from focusfix_core.io import (
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    load_tensor_file,
    load_tensor_file_with_metadata,
    load_training_state,
    safe_join,
    unique_path,
)
from focusfix_core.io import MAX_NAME_BYTES, is_read_only


class _Evil:
    """A pickle whose loading would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TestAtomicSave:
    def test_round_trip_with_metadata(self, tmp_path):
        t = {"a": torch.randn(3, 4), "b": torch.arange(6).reshape(2, 3).t()}  # b not contiguous
        p = atomic_save_safetensors(t, tmp_path / "sub" / "x.safetensors", {"k": "v"})
        back, meta = load_tensor_file_with_metadata(p)
        assert meta == {"k": "v"}
        assert all(torch.equal(back[k], t[k]) for k in t)
        assert sorted(os.listdir(p.parent)) == ["x.safetensors"]  # no temp file left

    def test_a_killed_saves_temp_file_is_swept_by_the_next_save(self, tmp_path):
        # kill -9 or a power cut during a save leaves its temp file (no cleanup runs); the next save into the
        # folder deletes ours that are an hour old, and nothing else
        old = time.time() - 2 * 3600
        stale, live = tmp_path / ".focusfix-abc123_x.tmp", tmp_path / ".focusfix-zzzzzzzz.tmp"
        others = [tmp_path / n for n in (".focusfix-notes.tmp", "focusfix-abc123_x.tmp", ".focusfix-abc123_x.tmpx",
                                         "mine.tmp")]
        for f in (stale, live, *others):
            f.write_bytes(b"partial")
        for f in (stale, *others):
            os.utime(f, (old, old))
        (tmp_path / ".focusfix-dir00000.tmp").mkdir()
        target = tmp_path / "kept.bin"
        target.write_bytes(b"the artist's")
        os.utime(target, (old, old))
        link = tmp_path / ".focusfix-link0000.tmp"
        link.symlink_to(target)
        os.utime(link, (old, old), follow_symlinks=False)  # an old link: still not ours to delete
        atomic_save_safetensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
        assert not stale.exists()
        assert live.exists() and all(f.exists() for f in others) and (tmp_path / ".focusfix-dir00000.tmp").is_dir()
        assert link.is_symlink() and target.read_bytes() == b"the artist's"

    def test_the_sweep_goes_by_the_folders_clock_not_this_machines(self, tmp_path, monkeypatch):
        """The age was this machine's time minus the file's mtime, which a network share stamps by its own clock:
        with this machine 2 hours ahead, another live save's fresh temp file looked 2 hours old and was deleted
        under it (its save then failed, the trained LoRA lost)."""
        live = tmp_path / ".focusfix-zzzzzzzz.tmp"
        live.write_bytes(b"another save, writing")
        real = time.time
        monkeypatch.setattr(ffio.time, "time", lambda: real() + 2 * 3600)
        atomic_save_safetensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
        assert live.exists()

    def test_same_content_same_bytes(self, tmp_path):
        # safetensors orders the metadata by a Rust HashMap, another order in every process and map: the same
        # LoRA saved twice had other bytes (another sha256)
        script = ("import sys, torch; from focusfix_core.io import atomic_save_safetensors as save; "
                  "save({'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(2, dtype=torch.float16)}, sys.argv[1], "
                  "{k: k * 3 for k in 'qwertyuiopasdfg'})")
        paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
        for path in paths:
            subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=Path(__file__).parents[1])
        assert len({path.read_bytes() for path in paths}) == 1

    def test_metadata_order_kept_out_of_the_bytes(self, tmp_path):
        # values json and serde_json must escape alike, or the header would change length
        meta = {"quote": 'a "b" \\ c', "ctrl": "x\x01\ty\nz\x7f", "wide": "猫 café \u2028 ☃", "num": "1e-4",
                "json": json.dumps({"k": [1, "ü"]}), "": "empty key"}
        t = {"w": torch.randn(3, 2), "b": torch.zeros(4, dtype=torch.bfloat16)}
        one = atomic_save_safetensors(t, tmp_path / "one.safetensors", meta)
        other = atomic_save_safetensors(t, tmp_path / "other.safetensors", dict(reversed(list(meta.items()))))
        assert one.read_bytes() == other.read_bytes()
        back, got = load_tensor_file_with_metadata(one)
        assert got == meta and all(torch.equal(back[k], t[k]) for k in t)
        n = int.from_bytes(one.read_bytes()[:8], "little")
        assert list(json.loads(one.read_bytes()[8:8 + n])["__metadata__"]) == sorted(meta)

    @pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
    def test_file_mode_not_private(self, tmp_path):
        p = atomic_save_safetensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
        old = os.umask(0o022)
        os.umask(old)
        assert p.stat().st_mode & 0o777 == 0o666 & ~old  # like open(), not mkstemp's 0600
        os.chmod(p, 0o640)
        atomic_save_safetensors({"a": torch.ones(1)}, p)
        assert p.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode

    def test_replaces_existing(self, tmp_path):
        p = tmp_path / "x.safetensors"
        atomic_save_safetensors({"a": torch.zeros(1)}, p)
        atomic_save_safetensors({"a": torch.ones(1)}, p)
        assert load_tensor_file(p)["a"].item() == 1.0

    def test_failed_write_leaves_nothing(self, tmp_path, monkeypatch):
        def boom(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(ffio, "save_file", boom)
        with pytest.raises(OSError, match="disk full"):
            atomic_save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert os.listdir(tmp_path) == []

    @pytest.mark.parametrize("writer, error", [
        ("save_file", lambda: ffio.SafetensorError("No space left on device (os error 28)")),
        ("torch.save", lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")),
    ])
    def test_a_full_disk_is_an_oserror_naming_the_file(self, tmp_path, monkeypatch, writer, error):
        """On a full disk the writers raise their own errors (as seen on a real full tmpfs), not OSError: a
        checkpoint's `except OSError` missed them and a ComfyUI run died at its first checkpoint (review G1)."""
        def full(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise error()

        if writer == "save_file":
            monkeypatch.setattr(ffio, "save_file", full)
            save = lambda p: atomic_save_safetensors({"a": torch.zeros(2)}, p)  # noqa: E731
        else:
            monkeypatch.setattr(ffio.torch, "save", full)
            save = lambda p: atomic_torch_save({"a": torch.zeros(2)}, p)  # noqa: E731
        target = tmp_path / "x.safetensors"
        monkeypatch.setattr(ffio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
        with pytest.raises(OSError, match="No space left on device") as e:
            save(target)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
        assert os.listdir(tmp_path) == []
        monkeypatch.setattr(ffio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, 10**9))
        error = lambda: RuntimeError("PytorchStreamWriter failed writing file data/0")  # noqa: E731
        monkeypatch.setattr(ffio.torch, "save", full)
        with pytest.raises(OSError, match="failed writing file data/0 .RuntimeError while writing.") as e:
            atomic_torch_save({"a": torch.zeros(2)}, target)
        assert e.value.errno == errno.EIO and os.listdir(tmp_path) == []
        # not a failed write: the writer's own error, whole (its cause was on a first line the OSError dropped)
        shared = "Some tensors share memory, this will lead to duplicate memory on disk.\n  More information at ..."
        error = lambda: RuntimeError(shared)  # noqa: E731
        with pytest.raises(RuntimeError, match="^Some tensors share memory") as e:
            atomic_torch_save({"a": torch.zeros(2)}, target)
        assert not isinstance(e.value, OSError) and os.listdir(tmp_path) == []

    def test_an_oserror_without_a_file_name_names_the_target(self, tmp_path, monkeypatch):
        """A full disk met by a plain write (a report, a PNG) gave "cannot write the outputs" (review K4)."""
        def full(data, f, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ffio, "save_file", full)
        with pytest.raises(OSError) as e:
            atomic_save_safetensors({"a": torch.zeros(2)}, tmp_path / "r.safetensors")
        assert e.value.filename == str(tmp_path / "r.safetensors") and os.listdir(tmp_path) == []

    def test_failed_write_keeps_old_file(self, tmp_path, monkeypatch):
        p = atomic_save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        monkeypatch.setattr(ffio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
        with pytest.raises(OSError, match="rename failed"):
            atomic_save_safetensors({"a": torch.ones(2)}, p)
        assert os.listdir(tmp_path) == ["x.safetensors"]
        assert torch.equal(load_tensor_file(p)["a"], torch.zeros(2))

    def test_bad_types(self, tmp_path):
        with pytest.raises(TypeError, match="tensors"):
            atomic_save_safetensors({"a": [1.0]}, tmp_path / "x.safetensors")
        with pytest.raises(TypeError, match="metadata"):
            atomic_save_safetensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors", {"k": 1})
        assert os.listdir(tmp_path) == []


class TestAtomicWriteText:
    def test_write_and_replace(self, tmp_path):
        p = atomic_write_text("# a\n", tmp_path / "r" / "report.md")
        assert p.read_text() == "# a\n"
        atomic_write_bytes(b"b", p)
        assert p.read_bytes() == b"b" and os.listdir(p.parent) == ["report.md"]

    def test_failure_keeps_old_file(self, tmp_path, monkeypatch):
        p = atomic_write_text("old", tmp_path / "report.json")
        monkeypatch.setattr(ffio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
        with pytest.raises(OSError, match="io error"):
            atomic_write_text("new", p)
        assert os.listdir(tmp_path) == ["report.json"] and p.read_text() == "old"

    def test_types(self, tmp_path):
        with pytest.raises(TypeError, match="text"):
            atomic_write_text(b"bytes", tmp_path / "x")
        with pytest.raises(TypeError, match="data"):
            atomic_write_bytes("str", tmp_path / "x")


class TestTrainingState:
    def test_round_trip(self, tmp_path):
        state = {"step": 3, "lr": 1e-4, "name": "fix", "opt": {"m": [torch.ones(2), None]}, "shape": (1, 2)}
        p = atomic_torch_save(state, tmp_path / "state.pt")
        back = load_training_state(p)
        assert back["step"] == 3 and back["name"] == "fix" and back["shape"] == (1, 2)
        assert torch.equal(back["opt"]["m"][0], torch.ones(2))

    def test_refuses_objects_when_saving(self, tmp_path):
        with pytest.raises(TypeError, match=r"obj.*_Evil"):
            atomic_torch_save({"x": _Evil(tmp_path / "m")}, tmp_path / "state.pt")
        assert os.listdir(tmp_path) == []

    def test_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="state.pt"):
            load_training_state(tmp_path / "state.pt")


class TestLoadTensorFile:
    def test_malicious_pickle_not_executed(self, tmp_path):
        marker = tmp_path / "PWNED"
        for suffix in (".pt", ".ckpt"):
            p = tmp_path / f"evil{suffix}"
            torch.save({"w": torch.zeros(1), "x": _Evil(marker)}, p)
            with pytest.raises(ValueError, match="NOT executed") as e:
                load_tensor_file(p)
            assert str(p) in str(e.value)
            assert "weights_only` set to `False`" not in str(e.value)  # no advice to run it anyway
        with pytest.raises(ValueError, match="NOT executed"):
            load_training_state(p)
        assert not marker.exists()

    def test_truncated_safetensors(self, tmp_path):
        p = tmp_path / "w.safetensors"
        save_file({"w": torch.randn(16, 16)}, str(p))
        data = p.read_bytes()
        for n in (5, len(data) - 100):
            p.write_bytes(data[:n])
            with pytest.raises(ValueError, match=r"w\.safetensors.*corrupt or truncated"):
                load_tensor_file(p)

    def test_truncated_pickle(self, tmp_path):
        p = tmp_path / "w.pt"
        torch.save({"w": torch.randn(16, 16)}, p)
        p.write_bytes(p.read_bytes()[:100])
        with pytest.raises(ValueError, match=r"w\.pt"):
            load_tensor_file(p)

    def test_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.safetensors"):
            load_tensor_file(tmp_path / "nope.safetensors")

    def test_a_folder_is_named_a_folder_not_missing(self, tmp_path):
        """CLI bad-input hunt (session 27): `--mask runs/masks` (a folder) said "not found"."""
        from focusfix_core.io import load_mask_image
        folder = tmp_path / "masks.safetensors"
        folder.mkdir()
        for load in (load_tensor_file, load_mask_image):
            with pytest.raises(ValueError, match=rf"file '{re.escape(str(folder))}' is a folder: give the file in it"):
                load(folder)

    def test_unknown_extension(self, tmp_path):
        p = tmp_path / "w.npz"
        p.write_bytes(b"x")
        with pytest.raises(ValueError, match=r"\.npz.*expected \.safetensors"):
            load_tensor_file(p)

    @pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
    def test_pickle_state_dict_unwrapped(self, tmp_path, suffix):
        p = tmp_path / f"w{suffix}"
        torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, p)
        tensors, meta = load_tensor_file_with_metadata(p)
        assert list(tensors) == ["w"] and meta == {}

    def test_pickle_non_tensor_entries(self, tmp_path):
        p = tmp_path / "w.pt"
        torch.save({"w": torch.ones(2), "epoch": 3}, p)
        with pytest.raises(ValueError, match="epoch"):
            load_tensor_file(p)


@pytest.mark.parametrize("values, finite", [
    ([1.0, 2.0], True), ([1.0, float("nan")], False), ([float("inf"), -float("inf")], False),
    ([3e38, 3e38, 3e38], True),  # finite, though their sum overflows: the full look says so
    ([3e38, 3e38, float("nan")], False), ([], True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_check_float_finite_finds_every_non_finite_value_and_only_those(values, finite, dtype):
    """Review (session 27): the check sums each tensor first (fast); a sum that overflowed must not read as inf."""
    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    want = bool(torch.isfinite(t).all())  # 3e38 is inf in fp16
    assert want == finite or dtype == torch.float16
    if want:
        ffio.check_float_finite({"w": t}, "weights", "")
    else:
        with pytest.raises(ValueError, match=r"1 weights hold NaN or inf values, e\.g\. \['w'\]"):
            ffio.check_float_finite({"w": t}, "weights", "")


class TestSafeJoin:
    def test_subfolders_and_suffix(self, tmp_path):
        assert safe_join(tmp_path, "fixes/hands") == tmp_path.resolve() / "fixes" / "hands.safetensors"
        assert safe_join(tmp_path, "a.safetensors") == tmp_path.resolve() / "a.safetensors"
        assert safe_join(tmp_path, "s", suffix=".pt").name == "s.pt"
        assert safe_join(tmp_path, "./a//b") == tmp_path.resolve() / "a" / "b.safetensors"

    @pytest.mark.parametrize(
        "name",
        ["../x", "/abs", "a/../../b", "a/..", "..\\x", "C:x", "c:\\w", "\\\\server\\share\\x",
         "", "  ", "a\0b", "/", "."],
    )
    def test_refuses(self, tmp_path, name):
        with pytest.raises(ValueError, match="filename") as e:
            safe_join(tmp_path / "loras", name)
        assert "loras" in str(e.value)

    def test_symlinked_subfolder_is_followed_a_symlinked_name_refused(self, tmp_path):
        """A subfolder the artist linked into loras/ (a shared drive) takes saves, as ComfyUI's own save
        nodes allow; a name that is itself a link is refused (a save would replace the link)."""
        folder, outside = tmp_path / "loras", tmp_path / "outside"
        folder.mkdir(), outside.mkdir()
        (folder / "shared").symlink_to(outside, target_is_directory=True)
        (folder / "file.safetensors").symlink_to(outside / "f.safetensors")
        path = safe_join(folder, "shared/x")
        assert path == folder.resolve() / "shared" / "x.safetensors"
        assert path.resolve() == (outside / "x.safetensors").resolve()
        with pytest.raises(ValueError, match="is a symlink"):
            safe_join(folder, "file")
        with pytest.raises(ValueError, match="'..' components"):
            safe_join(folder, "shared/../../x")

    def test_symlinked_folder_ok(self, tmp_path):
        (tmp_path / "real").mkdir()
        (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
        assert safe_join(tmp_path / "alias", "x") == (tmp_path / "real" / "x.safetensors").resolve()

    def test_types(self, tmp_path):
        with pytest.raises(TypeError, match="filename"):
            safe_join(tmp_path, None)
        with pytest.raises(TypeError, match="folder"):
            safe_join(3, "x")


class TestUniquePath:
    def test_counters(self, tmp_path):
        p = tmp_path / "fix.safetensors"
        assert unique_path(p) == p
        p.touch()
        assert unique_path(p) == tmp_path / "fix_00001.safetensors"
        assert unique_path(p, overwrite=True) == p
        (tmp_path / "fix_00001.safetensors").touch()
        (tmp_path / "fix_00003.safetensors").touch()
        assert unique_path(p) == tmp_path / "fix_00002.safetensors"

    def test_a_name_whose_companion_remains_is_taken(self, tmp_path):
        """A deleted LoRA's preview stays: a new LoRA of that name would show the old one's thumbnail."""
        p = tmp_path / "fix.safetensors"
        (tmp_path / "fix_00001.preview.png").touch()
        (tmp_path / "fix.preview.png").touch()
        assert unique_path(p) == p  # companions count only when asked for
        assert unique_path(p, companions=(".preview.png",)) == tmp_path / "fix_00002.safetensors"
        assert unique_path(p, overwrite=True, companions=(".preview.png",)) == p

    def test_dangling_symlink_counts_as_taken(self, tmp_path):
        p = tmp_path / "fix.safetensors"
        p.symlink_to(tmp_path / "gone")
        assert unique_path(p).name == "fix_00001.safetensors"


def test_a_file_under_the_wrong_extension_is_named_for_what_it_is(tmp_path):
    """A torch.save pickle named .safetensors, or a .safetensors named .pth: refused with what the file really
    is (never unpickled), not as corrupt or as a malicious pickle."""
    import pytest
    import torch
    from safetensors.torch import save_file

    from focusfix_core.io import load_tensor_file
    pickled = tmp_path / "lora.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(ValueError, match=r"is a PyTorch pickle \(torch.save\) named .safetensors: it was not loaded"):
        load_tensor_file(pickled)
    st = tmp_path / "head.pth"
    save_file({"w": torch.zeros(2)}, str(st))
    with pytest.raises(ValueError, match="is a .safetensors file named .pth: rename it"):
        load_tensor_file(st)


def test_names_windows_cannot_hold_or_too_long_are_refused(tmp_path):
    import pytest

    from focusfix_core.io import MAX_NAME_BYTES, atomic_write_text, safe_join
    for bad, why in (("fix:stream", "':' is not allowed"), ("a*b", "'\\*' is not allowed"),
                     ("tab\tname", "not allowed"), ("CON", "not a usable file name"), ("sub./x", "not a usable file name"),
                     ("sub/.safetensors", "not a usable file name"), ("x" * 250, f"more than the {MAX_NAME_BYTES}"),
                     ("CONIN$", "not a usable file name"), ("conout$.x", "not a usable file name"),
                     ("COM\u00b9", "not a usable file name"), ("lpt\u00b3", "not a usable file name"),
                     ("sub/", "ends in a folder separator: add the file's name, e.g. 'sub/fix'"),
                     ("a\\b\\", "ends in a folder separator")):
        with pytest.raises(ValueError, match=why):
            safe_join(tmp_path, bad)
    ok = safe_join(tmp_path, "fixes/hands v2_final-1")
    assert ok.name == "hands v2_final-1.safetensors"
    deep = "/".join(["z" * 150] * 30)  # every folder name is fine; the whole path is over Linux's PATH_MAX
    with pytest.raises(ValueError, match="over Linux's PATH_MAX .* fewer subfolders"):
        safe_join(tmp_path, deep)
    long_ok = safe_join(tmp_path, "y" * (MAX_NAME_BYTES - len(".safetensors")))
    assert atomic_write_text("x", long_ok).read_text() == "x"  # the temp file's name fits too
    for reserved in ("CON .x", "nul  .safetensors", "COM1 "):  # Windows strips the spaces: still the device
        with pytest.raises(ValueError, match="not a usable file name"):
            safe_join(tmp_path, reserved)
    assert safe_join(tmp_path, "CONSOLE fix").name == "CONSOLE fix.safetensors"


def test_paths_over_another_systems_limit_are_refused_at_once(tmp_path, monkeypatch):
    """A portable ComfyUI's loras folder is ~90 characters deep: a 180-character name passed the Linux limit and
    failed only when the LoRA was saved, after training, on Windows (260 characters without long paths)."""
    from focusfix_core.io import safe_join
    folder = "C:/Users/artist/Downloads/ComfyUI_windows_portable/ComfyUI/models/loras"
    name = "focusfix/" + "n" * 180
    assert safe_join(folder, name)  # fine on Linux
    monkeypatch.setattr(ffio, "_PLATFORM", "win32")  # no winreg here: long paths count as off, as by default
    with pytest.raises(ValueError, match=r"over Windows' MAX_PATH \(260 characters"):
        safe_join(folder, name)
    path = safe_join(folder, "focusfix/" + "n" * 100)  # the counter and the temp name still fit
    assert len(str(path)) + len("_00001") <= 259
    assert ffio._size("fix\U0001f3a8") == 5  # Windows counts UTF-16 units: an emoji is 2
    monkeypatch.setattr(ffio, "_PLATFORM", "darwin")
    with pytest.raises(ValueError, match="macOS's PATH_MAX"):
        safe_join(tmp_path, "/".join(["m" * 150] * 7))


def test_a_file_in_use_is_named_and_no_temp_file_is_left(tmp_path, monkeypatch):
    """Windows refuses to replace a LoRA another program holds open (a cached Load LoRA, another UI): the
    error names the file and why; the temp file goes, even when it took a read-only mode (the target made
    read-only while the save wrote; one read-only before is kept: `test_a_read_only_file_is_kept_even_with_...`)."""
    path = tmp_path / "fix.safetensors"
    path.write_bytes(b"theirs")
    real_unlink, real_mode = Path.unlink, ffio._file_mode

    def windows_replace(src, dst):
        raise PermissionError(13, "Access is denied", str(src))

    def windows_unlink(self, missing_ok=False):  # Windows deletes no read-only file
        if self.exists() and not os.stat(self).st_mode & 0o200:
            raise PermissionError(13, "Access is denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    def made_read_only(p):
        os.chmod(p, 0o444)
        return real_mode(p)

    monkeypatch.setattr(os, "replace", windows_replace)
    monkeypatch.setattr(Path, "unlink", windows_unlink)
    monkeypatch.setattr(ffio, "_file_mode", made_read_only)
    with pytest.raises(PermissionError, match="could not be replaced; is it open in another program"):
        atomic_write_bytes(b"ours", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix.safetensors"]
    assert path.read_bytes() == b"theirs"


# ---------------------------------------------------------------- a name taken while the file is written
@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
def test_a_save_without_overwrite_keeps_a_file_that_appears_while_it_writes(tmp_path, monkeypatch, links):
    """`unique_path` then a save is not atomic: another process (a second ComfyUI on the same loras folder) may
    take the name in between. The save must then fail and keep that file, leaving no temp file behind."""
    if not links:  # FAT/exFAT and some shares have no hard links: the O_EXCL claim must hold the same way
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(PermissionError("no links here")))
    path = tmp_path / "fix.safetensors"
    theirs = b"another process's file"

    def write_and_race(tmp):
        tmp.write_bytes(b"ours")
        path.write_bytes(theirs)  # the other writer wins the name while ours is being written

    with pytest.raises(FileExistsError, match="fix.safetensors' exists and was kept"):
        ffio._atomic_write(path, write_and_race, overwrite=False)
    assert path.read_bytes() == theirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix.safetensors"]
    free = tmp_path / "free.safetensors"  # a free name is written, complete, and nothing else is left
    assert ffio._atomic_write(free, lambda tmp: tmp.write_bytes(b"ours"), overwrite=False) == free
    assert free.read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix.safetensors", "free.safetensors"]
    atomic_write_bytes(b"new", path)  # overwrite (the default) still replaces
    assert path.read_bytes() == b"new"


def test_a_file_where_a_subfolder_must_be_is_named_before_anything_is_written(tmp_path):
    """Standards audit 2: with a file `afile` in the loras folder, 'afile/ckpt' passed the queue-time check and
    failed after training (Save LoRA said every free name was taken). safe_join now refuses it; a direct save
    names the file in the way."""
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"filename 'afile/ckpt': 'afile' is a file in folder .*, not a subfolder"):
        safe_join(tmp_path, "afile/ckpt")
    assert safe_join(tmp_path, "sub/ckpt") == tmp_path.resolve() / "sub" / "ckpt.safetensors"  # to be created
    with pytest.raises(NotADirectoryError, match=r"cannot write .*/afile' is a file, not a folder"):
        atomic_write_bytes(b"y", tmp_path / "afile" / "deeper" / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_interrupted_save_without_hard_links_leaves_no_empty_file(tmp_path, monkeypatch):
    """Standards audit 8: without hard links the name is claimed with an empty file, then replaced; a Ctrl-C
    between the two left that empty file, which then loaded as corrupt and blocked the name."""
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(PermissionError("no links here")))
    real_replace = os.replace

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ffio._atomic_write(tmp_path / "fix.safetensors", lambda tmp: tmp.write_bytes(b"ours"), overwrite=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", real_replace)
    ffio._atomic_write(tmp_path / "fix.safetensors", lambda tmp: tmp.write_bytes(b"ours"), overwrite=False)
    assert (tmp_path / "fix.safetensors").read_bytes() == b"ours"


def test_a_file_this_user_may_not_read_is_named_as_an_input(tmp_path, monkeypatch, capsys):
    """A LoRA, reward, model or state file without read permission raised PermissionError from inside the reader:
    the command line said "cannot write <the input>: Permission denied (check --out / the output path)"."""
    import builtins
    import re

    from focusfix_core import cli
    from focusfix_core.lora import read_focusfix_lora

    locked = tmp_path / "locked.safetensors"
    save_file({"w": torch.zeros(2)}, str(locked))

    def no_read(file, *a, **kw):  # as for a chmod 000 file (root reads every file, so the test cannot chmod)
        if str(file) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, *a, **kw)
    monkeypatch.setattr(ffio, "open", no_read, raising=False)
    message = (f"cannot read tensor file {str(locked)!r}: Permission denied (check that this user may read it; on "
               f"Windows, that no other program holds it)")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_focusfix_lora(locked)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_tensor_file(locked)
    assert cli.main(["train-fnf", "--prompt", "a red circle", "--reward", str(locked), "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot write" not in err, err


def test_a_read_only_file_is_kept_even_with_overwrite(tmp_path):
    """On Linux and macOS a save with overwrite replaced a file marked read-only (chmod a-w), which Windows refuses:
    the same node or command kept or replaced an artist's protected LoRA depending on the system."""
    import stat

    path = tmp_path / "keep.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    before = path.read_bytes()
    path.chmod(0o444)
    try:
        with pytest.raises(PermissionError, match="it is read-only, and was kept: make it writable") as e:
            atomic_save_safetensors({"w": torch.zeros(2)}, path, overwrite=True)
        assert e.value.filename == str(path)
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
        path.chmod(0o644)  # writable again: replaced
        atomic_save_safetensors({"w": torch.zeros(2)}, path, overwrite=True)
        assert torch.equal(load_tensor_file(path)["w"], torch.zeros(2))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        path.chmod(0o644)


def test_under_a_umask_that_makes_every_file_read_only_our_own_files_are_replaced(tmp_path, monkeypatch):
    """Under umask 0222 every new file is 0444, FocusFix's own checkpoints too: refusing to replace them failed every
    state.pt checkpoint after the first (review of session 19). Read-only is no mark there."""
    monkeypatch.setattr(ffio, "_umask", lambda: 0o222)
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)
    path.chmod(0o444)  # what the umask gave it (chmod: mkstemp's own mode does not follow the umask)
    atomic_torch_save({"step": 2}, path)
    assert load_training_state(path)["step"] == 2


def test_a_folder_this_user_may_not_write_to_is_named_by_the_file_being_saved(tmp_path, monkeypatch):
    """The temp file's creation failed first, so the error named `.focusfix-xxxxxxxx.tmp`, a name the artist never
    gave (seen as a non-root user saving into a read-only folder)."""
    def refused(dir=None, prefix="", suffix=""):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "abcd1234" + suffix))
    monkeypatch.setattr(ffio.tempfile, "mkstemp", refused)
    target = tmp_path / "lora.safetensors"
    with pytest.raises(PermissionError) as e:
        atomic_write_text("x", target)
    assert e.value.filename == str(target)
    assert e.value.strerror == f"Permission denied (no file can be made in {str(tmp_path)!r})"


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def test_a_suffix_in_other_case_is_not_added_twice(tmp_path):
    """`fix.SAFETENSORS` already ends in the suffix (mutant: a case-sensitive check gave fix.SAFETENSORS.safetensors)."""
    assert safe_join(tmp_path, "fix.SAFETENSORS").name == "fix.SAFETENSORS"
    assert safe_join(tmp_path, "sub/Fix.SafeTensors").name == "Fix.SafeTensors"


def test_the_name_limit_counts_bytes_not_characters(tmp_path):
    """MAX_NAME_BYTES is in bytes: 150 'é' are 300 bytes, over every file system's 255 (mutant: len(part) counted
    150 characters, so the save failed after training with "File name too long")."""
    name = "é" * 150
    assert len(name) + len(".safetensors") <= MAX_NAME_BYTES < len((name + ".safetensors").encode())
    with pytest.raises(ValueError, match="bytes long"):
        safe_join(tmp_path, name)
    assert safe_join(tmp_path, "e" * 150).name == "e" * 150 + ".safetensors"  # the same length in ASCII fits


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_file_someone_may_still_write_is_not_read_only(tmp_path, monkeypatch):
    """Read-only means nobody may write (no w bit at all): a file only its group may write is not one the owner
    marked to keep (mutant: only the owner's bit 0o200 was read)."""
    from focusfix_core import io as io_mod
    monkeypatch.setattr(io_mod, "_umask", lambda: 0o022)
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"x")
    os.chmod(path, 0o464)  # r--rw-r--
    assert not is_read_only(path)
    os.chmod(path, 0o444)
    assert is_read_only(path)
    os.chmod(path, 0o644)


def test_a_namedtuple_in_a_training_state_is_refused_when_saving(tmp_path):
    """atomic_torch_save refuses what load_training_state (weights_only) could not read back: a namedtuple needs
    its class (mutant: the plain-list/tuple check removed, so the state was written and then unreadable)."""
    from collections import namedtuple

    from focusfix_core.io import atomic_torch_save
    Pair = namedtuple("Pair", "a b")
    with pytest.raises(TypeError, match=r"plain lists/tuples, got Pair at obj\['x'\]"):
        atomic_torch_save({"x": Pair(1, 2)}, tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()


def test_load_state_checked_names_the_source_for_a_wrong_shape_or_an_extra_weight():
    """A ValueError naming the file, before load_state_dict's RuntimeError (mutant: the name check relaxed to a
    subset, so an extra weight gave a KeyError; the shape half is also pinned by test_reward_model_files.py)."""
    import torch
    from torch import nn

    from focusfix_core.io import load_state_checked
    net = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"^m\.safetensors: weight 'weight' has shape \(3, 3\), expected \(3, 2\)"):
        load_state_checked(net, {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, "m.safetensors")
    with pytest.raises(ValueError, match=r"^m\.safetensors: weight names differ; missing \[\], unexpected \['x'\]"):
        load_state_checked(net, {"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "x": torch.zeros(1)},
                           "m.safetensors")


def test_a_float_mask_image_above_1_is_refused(tmp_path):
    """A 32-bit float greyscale mask must hold 0..1 (mutant: values up to 2 passed, giving M > 1)."""
    import numpy as np
    from PIL import Image

    from focusfix_core.io import load_mask_image
    path = tmp_path / "m.tif"
    Image.fromarray(np.full((4, 4), 1.5, dtype=np.float32), mode="F").save(path)
    with pytest.raises(ValueError, match=r"values 1\.5\.\.1\.5, expected 0\.\.1"):
        load_mask_image(path)


def test_a_mask_image_follows_its_exif_orientation(tmp_path):
    """The EXIF orientation is applied, as Load Image does: a phone photo painted on stays upright (mutant: the
    transpose dropped, so a 2x4 mask tagged 'rotate 90' read as 2x4 instead of 4x2)."""
    import numpy as np
    from PIL import Image

    from focusfix_core.io import load_mask_image
    im = Image.fromarray(np.array([[255, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "m.png"
    im.save(path, exif=exif)
    M = load_mask_image(path)
    assert tuple(M.shape) == (4, 2)
    assert M.sum().item() == 1.0 and M[0, 1].item() == 1.0  # the top-left white pixel lands top-right


def test_the_path_limit_leaves_room_for_the_counter(tmp_path, monkeypatch):
    """A name whose path fits only without the `_00001` counter is refused at once, not when a later save of the
    same name adds the counter (mutant: _path_length without the counter)."""
    from focusfix_core import io as io_mod
    monkeypatch.setattr(io_mod, "_PLATFORM", "darwin")  # macOS's PATH_MAX: 1023 bytes
    root = str(tmp_path.resolve()) + os.sep
    room = 1023 - len(root.encode())  # bytes left for subfolders + the file name
    subs = []
    while room - 3 > MAX_NAME_BYTES:  # subfolders of 150 bytes, then a file name within MAX_NAME_BYTES
        subs.append("d" * 150)
        room -= 151
    name_len = room - len(".safetensors") - 3  # fits by 3 bytes without a counter, over it by 3 with one
    assert 0 < name_len <= MAX_NAME_BYTES - len(".safetensors")
    with pytest.raises(ValueError, match="with a counter or temp suffix"):
        safe_join(tmp_path, "/".join([*subs, "n" * name_len]))
    shorter = "/".join([*subs, "n" * (name_len - 3)])  # exactly at the limit with its counter
    assert safe_join(tmp_path, shorter).name == "n" * (name_len - 3) + ".safetensors"
