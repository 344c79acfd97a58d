"""Files: atomic saves (nothing is lost, nothing half-written), safe paths and safe loading.

A save writes a temporary file in the target folder, fsyncs it and `os.replace`s it over the target,
so a crash leaves either the old file or the new one, never a truncated one (a killed process's temp file is
deleted by a later save into the folder, `_sweep_stale_temps`). A save that must not replace a
file (`overwrite=False`) lands with a hard link instead, which fails if the name was taken meanwhile. Loading never runs
pickled code: `.safetensors` is read by safetensors, `.pt/.pth/.bin/.ckpt` only with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "PICKLE_SUFFIXES",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_float_finite",
    "load_training_state",
    "NameTakenError",
    "safe_join",
    "unique_path",
    "load_tensor_file",
    "load_tensor_file_with_metadata",
    "load_mask_image",
    "is_read_only",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # read only with torch.load(weights_only=True)
_TMP_PREFIX, _TMP_SUFFIX = ".focusfix-", ".tmp"
_TMP_NAME_LEN = len(_TMP_PREFIX) + 8 + len(_TMP_SUFFIX)  # mkstemp's names have 8 random characters
_STALE_TMP_SECONDS = 3600.0
# no bytes: torch pickles b"" as a call of `bytes`, which weights_only refuses (no state stores bytes)
_PLAIN = (type(None), bool, int, float, str, torch.Tensor, torch.dtype, torch.device, torch.Size)


def _atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call `write(tmp)` on a temp file next to `path`, fsync it, then move it onto `path` (see `_publish`)."""
    path = Path(path)
    if overwrite and is_read_only(path):  # Windows refuses to replace it; elsewhere too, so a save acts the same
        raise PermissionError(errno.EACCES, READ_ONLY_KEPT, str(path))
    _make_folder(path)
    try:  # a short temp name: any name the final file may take (up to the file system's 255 bytes) fits
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
    except OSError as e:  # a folder this user may not write to: name the file being saved and its folder
        if e.errno is None:
            raise
        raise type(e)(e.errno, f"{e.strerror} (no file can be made in {str(path.parent)!r})", str(path)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    publishing = False
    try:
        _sweep_stale_temps(tmp)
        try:
            write(tmp)
        except (SafetensorError, RuntimeError) as e:
            failed = _write_failed(e, path)
            if failed is None:  # not a failed write (e.g. safetensors refusing shared tensors): as it is
                raise
            raise failed from e
        with open(tmp, "r+b") as f:  # fsync needs a descriptor that may write on some systems
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp made it 0600; other readers (a server) need the usual mode
        publishing = True
        _publish(tmp, path, overwrite)
    except BaseException as e:  # also KeyboardInterrupt: never leave a temp file behind
        _remove(tmp)
        if publishing and isinstance(e, PermissionError) and overwrite and path.is_file():
            raise PermissionError(e.errno, f"{e.strerror}: {str(path)!r} could not be replaced; is it open in "
                                  f"another program (a Load LoRA node, another UI), or read-only? Close it or "
                                  f"choose another name") from e
        if isinstance(e, OSError) and e.filename in (tmp_name, None) and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from e  # name the file being saved, not our temp file
        raise
    _fsync_dir(path.parent)
    return path


READ_ONLY_KEPT = "it is read-only, and was kept: make it writable to replace it, or choose another name"


def is_read_only(path: Path) -> bool:
    """A file nobody may write to (chmod a-w; on Windows the read-only attribute): its owner marked it to keep.
    Not under a umask that makes every new file so (0222): there it is how our own checkpoints are made."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222 and bool(0o666 & ~_umask() & 0o222)


_WRITE_FAILURES = ("os error", "unexpected pos", "failed writing", "write failed")  # the writers' own words


def _write_failed(e: Exception, path: Path) -> OSError | None:
    """The OSError for a writer's own error on a failed write (safetensors' SafetensorError "No space left on
    device (os error 28)", torch.save's RuntimeError "unexpected pos"): every caller handles a write that
    failed as an OSError (a checkpoint warns and training goes on), and these are not OSErrors. None for an
    error that is not a failed write."""
    text = " ".join(str(e).split())
    try:
        full = "os error 28" in text or shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        full = False
    if not (full or isinstance(e, SafetensorError) or any(w in text for w in _WRITE_FAILURES)):
        return None
    why = "No space left on device" if full else text[:300]
    return OSError(errno.ENOSPC if full else errno.EIO, f"{why} ({type(e).__name__} while writing)", str(path))


def _sweep_stale_temps(own: Path) -> None:
    """Delete the temp files a killed save left in `own`'s folder (power cut, out-of-memory killer, kill -9: no
    cleanup ran), a little litter in the artist's loras folder each (hidden on Linux and macOS, listed on Windows).
    Only plain files with our temp names, unchanged for `_STALE_TMP_SECONDS` by the folder's own clock (`own`, the
    temp file this save just made: a network share's clock may run ahead of ours). A live save writes its file
    within seconds, then renames it. Best effort: a file that cannot be read or deleted stays."""
    folder = own.parent
    try:
        now = own.stat().st_mtime
    except OSError:
        return
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if len(name) != _TMP_NAME_LEN or not name.startswith(_TMP_PREFIX) or not name.endswith(_TMP_SUFFIX):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and (
                            now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TMP_SECONDS):
                        # a plain unlink, not `_remove`: a save killed between its link and unlink left a temp
                        # that is a hard link to the saved file, whose read-only mode a chmod would clear
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass


def _remove(tmp: Path) -> None:
    """Delete our temp file, also when it took a read-only mode (Windows deletes no read-only file)."""
    try:
        tmp.unlink(missing_ok=True)
    except PermissionError:
        try:
            os.chmod(tmp, 0o600)
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _replace(tmp: Path, path: Path) -> None:
    """`os.replace`; on Windows retried for about a second, as a virus scanner or an indexer briefly holding
    the file refuses it there (a program that keeps the file open fails all tries)."""
    for wait in (0.05, 0.1, 0.2, 0.3, 0.4) if os.name == "nt" else ():
        try:
            return os.replace(tmp, path)
        except PermissionError:
            time.sleep(wait)
    os.replace(tmp, path)


class NameTakenError(FileExistsError):
    """A save that must not replace a file found its name taken (see `_publish`)."""


def _file_in_the_way(path: Path) -> Path | None:
    """The first of `path`'s folders, from the top, that exists as a file (so `path` cannot be created); None."""
    return next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)


def _make_folder(path: Path) -> None:
    """Create `path`'s folder; a file where a folder must be is named (mkdir only says "File exists")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _file_in_the_way(path) or path.parent
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder") from None


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished `tmp` onto `path`. Not `overwrite`: in one step that fails when `path` exists, also when
    another process took the name after the caller found it free (`unique_path` then a save is not atomic)."""
    if overwrite:
        _replace(tmp, path)
        return
    try:
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing name
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system (FAT, exFAT, some shares): claim the name, then fill it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            try:
                os.replace(tmp, path)
            except BaseException:  # never leave our empty claim under the name
                path.unlink(missing_ok=True)
                raise
        else:
            tmp.unlink()
    except FileExistsError:
        raise NameTakenError(f"{str(path)!r} exists and was kept (not replaced): choose another name, or allow "
                             f"overwriting") from None


def _file_mode(path: Path) -> int:
    """The replaced file's mode, else what `open()` would give a new file (0o666 minus the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask; 0o022 where it cannot be read (Windows has none)."""
    try:  # reading the umask with os.umask() would briefly change it for every thread
        with open("/proc/self/status") as f:
            return next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), 0o022)
    except (OSError, ValueError):
        return 0o022


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX only; best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `tensors` (moved to CPU, made contiguous) to a .safetensors file atomically.

    Args:
        tensors: name -> tensor.
        path: target file; its folder is created if missing.
        metadata: str -> str header metadata.
        overwrite: replace an existing file (never one marked read-only, `is_read_only`); False:
            FileExistsError when `path` exists, also when it appears while the file is written.

    Returns:
        The path written.

    Raises:
        TypeError: a name, tensor or metadata entry of the wrong type.
        FileExistsError: `path` exists and not `overwrite` (nothing is written).
        PermissionError: `path` is marked read-only (`READ_ONLY_KEPT`; nothing is written), or cannot be written.

    Examples:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> atomic_save_safetensors({"w": torch.zeros(2, 3)}, f"{d}/a.safetensors").name
        'a.safetensors'
        >>> load_tensor_file(f"{d}/a.safetensors")["w"].shape
        torch.Size([2, 3])
    """
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict[str, Tensor], got {type(tensors).__name__}")
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"tensors must be a dict[str, Tensor], got entry {k!r}: {type(v).__name__}")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict[str, str] or None, got {type(metadata).__name__}")
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"metadata must be a dict[str, str], got non-str entries {bad[:5]}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(cpu, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return _atomic_write(path, write, overwrite)


def _sort_metadata(path: Path) -> None:
    """Put the `__metadata__` entries of the safetensors file at `path` in key order, in place.

    safetensors writes them from a Rust HashMap, in another order in every process: the same LoRA trained twice
    gave files of other bytes (another sha256, so another Civitai hash, and Load LoRA ran again downstream).
    Only the order changes, and `json` escapes as serde_json does, so the header keeps its length (padded with
    spaces, as the format allows, should it shrink) and the tensors their offsets."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(ordered) <= n:  # a longer one would move the tensors: keep the file as safetensors wrote it
            f.seek(8)
            f.write(ordered.ljust(n))


def atomic_write_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically (reports, PNGs): readers see the old file or the new one, never half.
    Not `overwrite`: FileExistsError when `path` exists; a read-only file is never replaced (PermissionError), as
    in `atomic_save_safetensors`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite)


def atomic_write_text(text: str, path: str | os.PathLike, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (report.json, report.md); returns the path.

    Examples:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> atomic_write_text("# report", f"{d}/r.md").read_text()
        '# report'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write_bytes(text.encode(encoding), path)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything `torch.load(weights_only=True)` could not read back."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"obj must hold only str/int keys, got key {k!r} at {where}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        if type(obj) not in (list, tuple):  # namedtuples and list subclasses would need their class
            raise TypeError(f"obj must hold plain lists/tuples, got {type(obj).__name__} at {where}")
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"obj must hold only tensors and plain Python values (dict, list, tuple, str, int, float, "
            f"bool, None), got {type(obj).__name__} at {where}"
        )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` a training state (dicts/lists of tensors and plain values) atomically.

    Read it back with `load_training_state`.

    Raises:
        TypeError: `obj` holds something `torch.load(weights_only=True)` would refuse.
    """
    _check_plain(obj, "obj")
    return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_training_state(path: str | os.PathLike) -> Any:
    """Read a file written by `atomic_torch_save` (weights_only, to CPU; never runs pickled code).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is unreadable or corrupt, or holds objects other than tensors and plain values.
    """
    path = _existing_file(path, "training state (torch.save of tensors and plain values)")
    return _torch_load(path, "a training state (torch.save of tensors and plain values)")


def _existing_file(path: str | os.PathLike, expected: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():  # "not found" would send the user looking for a path that is there
        raise ValueError(f"{expected} file {str(path)!r} is a folder: give the file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{expected} file {str(path)!r} not found")
    try:  # an OSError from deep inside a reader would read as a failed write (the CLI), or not name the file
        open(path, "rb").close()
    except OSError as e:
        raise ValueError(f"cannot read {expected} file {str(path)!r}: {e.strerror or e} (check that this user "
                         f"may read it; on Windows, that no other program holds it)") from None
    return path


def load_mask_image(path: str | os.PathLike) -> torch.Tensor:
    """A painted mask M from an image file -> [H,W] float32 in [0,1] (1 = may change).

    An image with transparency reads as ComfyUI's Load Image reads it (what its mask editor saves): M = 1 - alpha,
    so the painted (erased) part may change. Any other image reads as its grey level: white may change, black
    stays. A colour image without transparency is refused: its grey levels are the picture's, not a mask (white
    painted over a `before_N.png` and saved without alpha). The EXIF orientation is applied, as Load Image does
    (a phone photo painted on stays upright).

    Raises:
        FileNotFoundError: no such file. ValueError (naming the file): not an image PIL can read, a colour image
        without transparency, or a 32-bit integer / float greyscale image outside 0..65535 / 0..1.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = _existing_file(path, "mask image")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:  # a palette image's transparency becomes alpha
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA") and im.getchannel("A").getextrema()[0] < 255:
                return 1.0 - torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0)
            mode = im.mode
            # 16-bit PNG (Pillow reads some as "I"), 32-bit TIFF: kept wide, read below
            wide = mode in ("I;16", "I;16B", "I;16L", "I", "F")
            colour = 0.0 if wide or mode in ("1", "L", "LA", "La") else _colour_fraction(im)
            a = np.asarray(im, dtype=np.float64) if wide else np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        # ValueError: what Pillow raises for some damaged headers ("Truncated IHDR chunk")
        raise ValueError(f"could not read {str(path)!r} as a mask image (PNG, JPEG, WebP...): {e}") from None
    if colour > _COLOUR_FRACTION:
        raise ValueError(
            f"{str(path)!r} is a colour image without transparency ({colour:.0%} of its pixels are coloured), not "
            f"a mask: its grey levels would be the picture's. Paint the region that may change white and the rest "
            f"black, or erase the region so it is transparent (as ComfyUI's mask editor saves it)")
    return _wide_grey(a, mode, path) if wide else torch.from_numpy(a)


# A pixel is coloured when its channels differ by more than _COLOUR_SPREAD (of 255). A grey mask is grey to the
# last bit even as a JPEG (Pillow, any quality, 4:2:0 chroma: spread 0; grey with +-3 noise per channel: 0 once
# JPEG'd), so both bounds leave room for other encoders and a few coloured antialiased pixels.
_COLOUR_SPREAD, _COLOUR_FRACTION = 8, 0.01


def _colour_fraction(im) -> float:
    """The fraction of an image's pixels whose red, green and blue differ by more than `_COLOUR_SPREAD`."""
    rgb = np.asarray(im.convert("RGB"))  # [H,W,3] uint8
    if rgb.size == 0:
        return 0.0
    return float(((rgb.max(-1) - rgb.min(-1)) > _COLOUR_SPREAD).mean())


def _wide_grey(a: np.ndarray, mode: str, path: Path) -> torch.Tensor:
    """A greyscale image wider than 8 bits -> [H,W] in [0,1]: integers are 16-bit (0..65535), floats 0..1. Other
    ranges (a 32-bit integer TIFF, a float image in 0..255) have no one reading: refused, not guessed."""
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    top = 1.0 if mode == "F" else 65535.0
    if not (np.isfinite(a).all() and 0.0 <= lo and hi <= top):
        kind = "a floating-point" if mode == "F" else "a 32-bit integer"
        raise ValueError(f"could not read {str(path)!r} as a mask image: it is {kind} greyscale image with values "
                         f"{lo:g}..{hi:g}, expected 0..{top:g}. Save the mask as an 8- or 16-bit PNG")
    return torch.from_numpy((a / top).astype(np.float32))


def _torch_load(path: Path, expected: str) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # keep torch's line naming the refused global, not its advice to retry with weights_only=False
        detail = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise ValueError(
            f"refused to load {str(path)!r}: it contains pickled objects other than tensors and plain "
            f"values, so it was NOT executed (loaded with weights_only=True). Expected {expected}; "
            f"convert trusted files to .safetensors (or it is not a PyTorch file at all). {' '.join(detail)}".rstrip()
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, struct.error, AssertionError,
            AttributeError, TypeError, RecursionError) as e:
        # the weights-only unpickler meets damaged or foreign bytes with whatever error its opcode handling raises
        raise ValueError(f"could not read {str(path)!r} as {expected}: corrupt or truncated, or not a PyTorch file "
                         f"({type(e).__name__}: {e})") from e


def _sniff(path: Path) -> str:
    """What a file holds by its first bytes, whatever its name: "pickle", "torch-zip", "safetensors" or "?"."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode
        return "pickle"
    return "?"


def load_tensor_file_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a tensor file and its metadata (`{}` for pickle formats). Tensors land on CPU.

    Accepts `.safetensors` and, read with `torch.load(weights_only=True)`, `.pt/.pth/.bin/.ckpt`
    (a training checkpoint's `"state_dict"`, or its `"model"` when that holds tensors, is unwrapped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file this user may not read, unknown extension, corrupt/truncated file, pickled objects,
            non-tensor entries.
    """
    path = _existing_file(path, "tensor")
    suffix = path.suffix.lower()
    kind = _sniff(path)
    if suffix in (".safetensors", ".sft") and kind in ("pickle", "torch-zip"):
        raise ValueError(f"{str(path)!r} is a PyTorch pickle (torch.save) named {path.suffix}: it was not loaded. "
                         f"Give it its real extension (.pt or .pth) to read it safely (weights only), or convert "
                         f"it to .safetensors")
    if suffix in PICKLE_SUFFIXES and kind == "safetensors":
        raise ValueError(f"{str(path)!r} is a .safetensors file named {path.suffix}: rename it to .safetensors")
    if suffix in (".safetensors", ".sft"):  # .sft: the short name some ComfyUI models use
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"could not read {str(path)!r} as .safetensors: corrupt or truncated ({e})") from e
        return tensors, metadata
    if suffix in PICKLE_SUFFIXES:
        obj = _torch_load(path, "a dict of tensors")
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif isinstance(obj, dict) and _is_tensor_dict(obj.get("model")):
            # {"model": sd, "optimizer": ..., "epoch": ...}; only tensors, as "model" may also name a config
            obj = obj["model"]
        if not isinstance(obj, dict):
            raise ValueError(f"{str(path)!r} must hold a dict of tensors, got {type(obj).__name__}")
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{str(path)!r} must hold a dict of str -> tensor, got non-tensor entries {bad[:5]}")
        return obj, {}
    raise ValueError(
        f"unknown tensor file extension {path.suffix!r} for {str(path)!r}; "
        f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}"
    )


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load name -> tensor from a file; see `load_tensor_file_with_metadata`."""
    return load_tensor_file_with_metadata(path)[0]


_DRIVE = re.compile(r"^[A-Za-z]:")
# names Windows cannot hold (ComfyUI's folders are shared with Windows machines, and packs move between them)
_NOT_PORTABLE = re.compile(r'[<>:"|?*\x00-\x1f]')
# Windows' device names, also with an extension; COM/LPT with superscript digits and the console's CONIN$/CONOUT$
_RESERVED = re.compile(r"^(con|prn|aux|nul|conin\$|conout\$|com[0-9¹²³]|lpt[0-9¹²³]) *(\..*)?$", re.IGNORECASE)
MAX_NAME_BYTES = 200  # per path component, suffix included: leaves room for a "_00001" counter within 255
_PLATFORM = sys.platform  # read through this name, so tests can ask for another system's limits
_COUNTER_LEN = len("_00001")


def _path_limit() -> tuple[int, str]:
    """(the longest path a file may have here, in UTF-16 units on Windows and bytes elsewhere, what sets it)."""
    if _PLATFORM == "win32":
        try:
            import winreg

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as k:
                if winreg.QueryValueEx(k, "LongPathsEnabled")[0] == 1:
                    return 32000, "Windows' long paths"
        except (ImportError, OSError):
            pass
        return 259, "Windows' MAX_PATH (260 characters, unless long paths are enabled in Windows)"
    if _PLATFORM == "darwin":
        return 1023, "macOS's PATH_MAX (1024 bytes)"
    return 4095, "Linux's PATH_MAX (4096 bytes)"


def _path_length(path: Path) -> int:
    """The length of the longest file a save of `path` writes: the name with a counter, or its temp file."""
    return _size(str(path.parent) + os.sep) + max(_size(path.name) + _COUNTER_LEN, _TMP_NAME_LEN)


def _size(text: str) -> int:
    """A path's length as the system counts it: UTF-16 units on Windows (an emoji is 2), bytes elsewhere."""
    return len(text.encode("utf-16-le")) // 2 if _PLATFORM == "win32" else len(text.encode())


def safe_join(folder: str | os.PathLike, filename: str, suffix: str = ".safetensors") -> Path:
    """`folder / filename (+ suffix)`, refusing any name that could leave `folder`.

    `filename` may hold subfolders ("fixes/hands"; "/" or "\\"). Containment is checked on the name itself
    (no absolute path, drive or `..`), as ComfyUI checks a save's subfolder: a subfolder the user made as a
    symlink (a shared drive linked into `loras/`) is followed, since the name can only reach what the folder's
    owner linked there. A name that is itself a symlink is refused: a save would replace the link.

    Returns:
        The path under the resolved folder (subfolder symlinks kept as named).

    Raises:
        TypeError: folder or filename of the wrong type.
        ValueError: empty name, NUL, absolute path, drive letter, `..` component, or a name that is a
            symlink; a subfolder that is a file; a name Windows cannot hold (`<>:"|?*`, control characters,
            CON/PRN/AUX/NUL/COM1-9/LPT1-9, a trailing dot or space), a component over MAX_NAME_BYTES bytes or
            a path longer than this system allows (Windows' 260 characters; with room for a counter).

    Examples:
        >>> safe_join("/tmp/loras", "fixes/hands").parts[-2:]
        ('fixes', 'hands.safetensors')
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a str or os.PathLike, got {type(folder).__name__}")
    if not isinstance(filename, str):
        raise TypeError(f"filename must be a str, got {type(filename).__name__}")

    def refuse(why: str) -> ValueError:
        return ValueError(f"filename {filename!r} must stay inside folder {str(folder)!r}: {why}")

    if "\0" in filename:
        raise refuse("it contains a NUL character")
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a JSON widget value can hold "\ud800"; no file system can
        raise refuse("it contains a lone surrogate (half of a character): retype the name") from None
    if filename.startswith(("/", "\\")) or _DRIVE.match(filename) or PureWindowsPath(filename).anchor:
        raise refuse("absolute paths and drive letters are not allowed")
    parts = [p for p in re.split(r"[/\\]", filename) if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise refuse("'..' components are not allowed")
    if not parts or not parts[-1].strip():
        raise refuse("the name is empty")
    if filename.rstrip().endswith(("/", "\\")):  # "sub/" names a folder: it would have become sub.safetensors
        raise ValueError(f"filename {filename!r} ends in a folder separator: add the file's name, e.g. "
                         f"{filename.rstrip() + 'fix'!r}")
    if suffix and not parts[-1].lower().endswith(suffix.lower()):
        parts[-1] += suffix
    for part in parts:
        bad = _NOT_PORTABLE.search(part)
        if bad:
            raise ValueError(f"filename {filename!r}: {bad.group()!r} is not allowed in a file name "
                             f"(Windows refuses it); use letters, digits, spaces, '-', '_' and '/' for subfolders")
        if _RESERVED.match(part) or part[-1] in ". " or part.startswith("."):
            raise ValueError(f"filename {filename!r}: {part!r} is not a usable file name (reserved on Windows, "
                             f"ending in a dot or space, or hidden); choose another name")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"filename {filename!r}: {part[:24]!r}... is {len(part.encode())} bytes long, "
                             f"more than the {MAX_NAME_BYTES} a file name may have here; shorten it")
    root = Path(folder).resolve()
    path = root.joinpath(*parts)
    limit, why = _path_limit()
    unit = "characters" if _PLATFORM == "win32" else "bytes"
    # else the save fails after training ("File name too long", or not found). On Windows this also keeps the
    # folder within the 247 characters it allows one: the temp name makes any file 23 longer than its folder
    if _path_length(path) > limit:
        raise ValueError(f"filename {filename!r}: the path in {str(folder)!r} would be {_path_length(path)} {unit} "
                         f"long (with a counter or temp suffix), over {why}; use a shorter name or fewer subfolders")
    if path.is_symlink():
        raise refuse(f"{str(path)!r} is a symlink (to {os.readlink(path)!r}); choose another name")
    blocker = _file_in_the_way(path)
    if blocker is not None and blocker.is_relative_to(root):  # found now, not when a save's mkdir fails after training
        raise ValueError(f"filename {filename!r}: {str(blocker.relative_to(root))!r} is a file in folder "
                         f"{str(folder)!r}, not a subfolder; choose another name")
    return path


def unique_path(path: str | os.PathLike, overwrite: bool = False, companions: Sequence[str] = (),
                also_taken: Callable[[Path], bool] | None = None) -> Path:
    """`path` if free (or `overwrite`), else the first free `stem_00001.ext`, `stem_00002.ext`, ...; a name is
    taken while a companion file of it exists too (`stem` + each suffix in `companions`, e.g. ".preview.png"):
    a new file must not inherit what a deleted one left beside it; and where `also_taken(candidate)` holds (the
    same name in another folder that lists as one with this one).

    Examples:
        >>> unique_path("/nonexistent/fix.safetensors").name
        'fix.safetensors'
    """
    path = Path(path)

    def taken(p: Path) -> bool:  # lexists: a dangling symlink is taken too
        return (os.path.lexists(p) or any(os.path.lexists(p.with_name(p.stem + c)) for c in companions)
                or (also_taken is not None and also_taken(p)))
    if overwrite or not taken(path):
        return path
    i = 1
    while True:
        candidate = path.with_name(f"{path.stem}_{i:05d}{path.suffix}")
        if not taken(candidate):
            return candidate
        i += 1



def check_float_finite(tensors: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """ValueError unless every tensor is float and finite, naming the first keys: an integer tensor is no weight,
    and one NaN weight turns every output it touches NaN. One pass; fp8 (no isfinite kernel) is checked in fp32.
    `what` names the tensors ("LoRA tensors"); `hint` ends the NaN message (what to do)."""
    not_float = [k for k, v in tensors.items() if not v.is_floating_point()]
    if not_float:
        raise ValueError(f"{what} must be float (fp32, fp16 or bf16), got {tensors[not_float[0]].dtype} for "
                         f"{len(not_float)} keys, e.g. {not_float[:3]}")
    nonfinite = [k for k, v in tensors.items() if not _all_finite(v if v.element_size() > 1 else v.float())]
    if nonfinite:
        raise ValueError(f"{len(nonfinite)} {what} hold NaN or inf values, e.g. {nonfinite[:3]}{hint}")


def _all_finite(v: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite. A finite sum says so at once (NaN and inf propagate
    through it), without isfinite's boolean copy of the tensor (a ViT-L tower: ~15x faster); only a sum that
    overflowed needs the full look."""
    return bool(torch.isfinite(v.sum(dtype=torch.float32))) or bool(torch.isfinite(v).all())


def load_state_checked(module: "torch.nn.Module", tensors: dict[str, torch.Tensor], source: str,
                       assign: bool = False) -> "torch.nn.Module":
    """Load `tensors` into `module` after checking every name and shape (nanoGPT-style), as float32. assign: the
    module takes the (float32) tensors themselves, e.g. a module built on the meta device, which allocated nothing.

    Raises:
        ValueError: naming `source` and the first missing/unexpected names, the first wrong shape, or weights that
            are not float (an integer tensor where the module holds float) or hold NaN/inf.
    """
    own = module.state_dict()
    if set(own) != set(tensors):
        raise ValueError(f"{source}: weight names differ; missing {sorted(set(own) - set(tensors))[:5]}, "
                         f"unexpected {sorted(set(tensors) - set(own))[:5]}")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: weight {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    try:  # .float() below would turn an integer tensor into "weights" silently; meta tensors hold no values
        check_float_finite({k: v for k, v in tensors.items() if own[k].is_floating_point() and not v.is_meta},
                           "weights", " (a corrupt file)")
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=assign)
    return module
