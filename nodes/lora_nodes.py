"""FocusFix Apply LoRA and FocusFix Save LoRA: use a trained LoRA now, or write it for the stock Load LoRA."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..focusfix_core.lora import family_mismatch
from .adapters import LoraData, image_to_bchw, model_family
from .common import GRAPH_INPUTS, LORA, file_fingerprint, graph_metadata, log, tip, widgets_checked

__all__ = ["FocusFixApplyLoRA", "FocusFixLoadLoRA", "FocusFixSaveLoRA", "lora_path", "lora_patches", "loras_name",
           "save_lora_data", "save_preview", "write_lora"]

PREVIEW_SUFFIX = ".preview.png"  # beside <name>.safetensors: the thumbnail A1111/Forge (and LoRA managers) show


def lora_patches(model, lora: LoraData) -> dict:
    """ComfyUI weight patches for `lora` on `model`, converted by ComfyUI's own LoRA code (as Load LoRA does).

    Raises:
        ValueError: layers that match no layer of this MODEL by name or by shape (a LoRA trained on another
            architecture; an SD1.5 LoRA on SD2.x has the same names and other text widths).
    """
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    tensors = comfy.lora_convert.convert_lora(dict(lora.tensors))
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    names = sorted(k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight"))
    missing = [n for n in names if n not in key_map]
    why = family_mismatch(lora.metadata, model_family(getattr(model.model, "model_config", None)))
    if missing:
        raise ValueError(f"{len(missing)} of {len(names)} LoRA layers match no layer of this MODEL ({why}), "
                         f"e.g. {missing[:3]}")
    # ComfyUI would skip a layer of another shape while sampling, with only a log line: a partly applied fix
    wrong = []
    for n in names:
        up, down = tensors[f"{n}.lora_up.weight"], tensors[f"{n}.lora_down.weight"]
        weight = comfy.utils.get_attr(model.model, key_map[n])
        if up.shape[0] != weight.shape[0] or up.shape[0] * down[0].numel() != weight.numel():
            wrong.append(f"{n} ({up.shape[0]}x{down[0].numel()} vs {'x'.join(map(str, weight.shape))})")
    if wrong:
        why = "trained on another model type, e.g. SD1.5 against SD2.x?" if why.endswith("?") else why
        raise ValueError(f"{len(wrong)} of {len(names)} LoRA layers have another shape than this MODEL's "
                         f"({why}), e.g. {wrong[:2]}")
    return patches


def _lora_weights(patch):
    """(up, down, ...) of a ComfyUI LoRA weight patch (a LoRAAdapter, or the ("lora", weights) tuple of older
    ComfyUI versions); None for any other kind of patch."""
    weights = getattr(patch, "weights", None)
    if weights is None and isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    ok = isinstance(weights, (tuple, list)) and len(weights) >= 2
    return weights if ok and all(isinstance(w, torch.Tensor) for w in weights[:2]) else None


def layers_applied(model, lora: LoraData) -> int:
    """How many of `lora`'s layers the MODEL (a ModelPatcher) already carries as a weight patch of the same values
    at a strength other than 0: Load LoRA or Apply LoRA of this LoRA (or of the file it was saved to) upstream.
    0 for a LoRA that does not fit the MODEL (the training run names that)."""
    try:
        ours = lora_patches(model, lora)
    except ValueError:
        return 0
    found = 0
    for key, patch in ours.items():
        mine = _lora_weights(patch)
        if mine is None or not mine[0].any():  # a zero layer adds nothing, applied once or twice
            continue
        key = key if isinstance(key, str) else key[0]
        for strength, theirs, *_ in model.patches.get(key, ()):
            theirs = _lora_weights(theirs)
            if theirs is None or strength == 0:
                continue
            # fp16/bf16 rounding of a saved copy; another LoRA's random start is nowhere near
            if all(a.shape == b.shape and torch.allclose(a.detach().float().cpu(), b.detach().float().cpu(),
                                                          rtol=1e-2, atol=1e-6) for a, b in zip(mine[:2], theirs[:2])):
                found += 1
                break
    return found


def lora_path(filename: str, overwrite: bool = False, folder: str | None = None) -> Path:
    """`<loras folder>/<filename>.safetensors`, or the first free `<filename>_00001...` when that file (or a
    preview of that name, left by a deleted LoRA) exists and not `overwrite`. A file of that name in another of
    ComfyUI's loras folders (extra_model_paths.yaml's) takes the name too: loaders list the folders as one, and the
    first folder's file (where saves go) would hide that one from every loader; `overwrite` replaces only a file
    in `folder`, so it refuses such a name. ValueError for a name that would leave the folder, that Windows cannot
    hold, or that `overwrite` would hide that way."""
    from ..focusfix_core.io import safe_join, unique_path
    folders = _loras_folders()
    if folder is None and not folders:
        raise ValueError("no loras folder: ComfyUI's folder_paths lists none (or is not loaded)")
    folder = folders[0] if folder is None else folder
    root = Path(folder).resolve()
    resolved = [Path(f).resolve() for f in folders]
    # only a folder ComfyUI lists with the others can hide them (a folder of a caller's own hides nothing)
    others = [Path(f) for f, r in zip(folders, resolved) if r != root] if root in resolved else []
    path = safe_join(folder, filename.strip())

    def elsewhere(p: Path) -> Path | None:  # the other loras folder holding p's name as a file, as loaders read it
        return next((o for o in others if os.path.isfile(o / p.relative_to(root))), None)
    if overwrite and not os.path.lexists(path) and (other := elsewhere(path)) is not None:
        raise ValueError(f"filename {filename!r}: {str(path.relative_to(root))!r} is a LoRA in another loras folder, "
                         f"{str(other)!r}; a save goes to {str(root)!r}, where it would hide that file from every "
                         f"loader (the folders list as one). Choose another name, or turn overwrite off for a counter")
    return unique_path(path, overwrite=overwrite, companions=(PREVIEW_SUFFIX,),
                       also_taken=lambda p: elsewhere(p) is not None)


def _loras_folders() -> list[str]:
    """ComfyUI's loras folders, the first where saves go ([] without ComfyUI, where a caller names its folder)."""
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_folder_paths("loras")


def write_lora(lora: LoraData, path: Path, extra_metadata: dict[str, str] | None = None,
               overwrite: bool = True) -> Path:
    """Write `lora` to `path` atomically: kohya keys + metadata, plus `extra_metadata` (the graph that made it).
    Not `overwrite`: FileExistsError when `path` exists, also when it appeared while the file was written."""
    from ..focusfix_core.io import atomic_save_safetensors
    return atomic_save_safetensors(lora.tensors, path, {**(extra_metadata or {}), **lora.metadata}, overwrite)


def save_lora_data(lora: LoraData, filename: str, overwrite: bool = False, folder: str | None = None,
                   extra_metadata: dict[str, str] | None = None) -> Path:
    """`write_lora` to `lora_path(filename, overwrite, folder)`: never onto an existing file unless `overwrite`.
    A name another save takes between the look and the write (a second ComfyUI on the same folder) is kept: the
    save moves on to the next free name."""
    from ..focusfix_core.io import READ_ONLY_KEPT, NameTakenError, is_read_only
    for _ in range(100):
        path = lora_path(filename, overwrite, folder)
        # the LoRA and its thumbnail are replaced together or not at all: a read-only one keeps both
        kept = next((p for p in (path, preview_path(path)) if overwrite and is_read_only(p)), None)
        if kept is not None:
            raise PermissionError(errno.EACCES, READ_ONLY_KEPT, str(kept))
        try:
            return write_lora(lora, path, extra_metadata, overwrite)
        except NameTakenError:
            continue
    raise FileExistsError(f"filename {filename!r}: every free name was taken by another save while writing")


def preview_path(lora_path: Path) -> Path:
    """Where a LoRA's thumbnail lives: `<name>.preview.png` beside `<name>.safetensors`."""
    return lora_path.with_name(lora_path.stem + PREVIEW_SUFFIX)


def save_preview(I: torch.Tensor, lora_path: Path, overwrite: bool = False) -> Path | None:
    """Write I[0] ([B,3,H,W] in [0,1]) beside the LoRA as `<name>.preview.png`, the thumbnail A1111/Forge,
    ComfyUI's model library and LoRA managers show, atomically. None (nothing written) when that file exists
    and not `overwrite`: a LoRA saved with a counter may sit beside an image that is not its own."""
    from ..focusfix_core.viz import save_png
    path = preview_path(lora_path)
    try:
        return save_png(I[0], path, overwrite)
    except FileExistsError:
        return None


def drop_preview(lora_path: Path) -> bool:
    """Remove `<name>.preview.png` beside a LoRA saved over another without a preview of its own, so loaders do
    not show the replaced LoRA's thumbnail for it. True when one was removed; a symlink or folder there is left."""
    path = preview_path(lora_path)
    if not path.is_file() or path.is_symlink():
        return False
    try:
        path.unlink()
    except OSError as e:
        log.warning(f"could not remove the replaced LoRA's preview {path.name}: {e}")
        return False
    return True


class FocusFixApplyLoRA:
    DESCRIPTION = "Apply a FocusFix LoRA to a MODEL without saving it (same result as saving + Load LoRA)."
    CATEGORY = "FocusFix/lora"
    FUNCTION = "execute"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the MODEL (the input MODEL is not changed).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": tip("MODEL", "The diffusion model the LoRA was trained on."),
            "lora": tip(LORA, "The LoRA from a FocusFix training node."),
            "strength": tip("FLOAT", "LoRA strength: 1 = as trained, 0 = off, negative = reversed.",
                            default=1.0, min=-10.0, max=10.0, step=0.01),
        }}

    @widgets_checked
    def execute(self, model, lora, strength):
        m = model.clone()
        m.add_patches(lora_patches(model, lora), strength)
        return (m,)


class FocusFixLoadLoRA:
    DESCRIPTION = ("Load a LoRA that FocusFix saved (models/loras), to train it further (a Train node's "
                   "continue_from) or to apply it with FocusFix Apply LoRA.")
    CATEGORY = "FocusFix/lora"
    FUNCTION = "execute"
    RETURN_TYPES = (LORA,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The LoRA, as a Train node gives it.",)

    @classmethod
    def INPUT_TYPES(cls):
        try:
            import folder_paths
            names = folder_paths.get_filename_list("loras")
        except ImportError:  # the pack imports without ComfyUI (tests, schema tools)
            names = []
        return {"required": {
            "lora_name": tip(names, "A LoRA file FocusFix saved (Save LoRA or a checkpoint), in the loras folder."),
        }}

    @classmethod
    def IS_CHANGED(cls, lora_name):
        # a training checkpoint is rewritten under its name every checkpoint_every steps
        return file_fingerprint("loras", lora_name)

    def execute(self, lora_name):
        import folder_paths
        path = folder_paths.get_full_path_or_raise("loras", lora_name)  # a name cannot leave the folder
        lora = LoraData.from_file(path)
        log.info(f"loaded LoRA {lora_name} ({lora!r})")
        return (lora,)


class FocusFixSaveLoRA:
    DESCRIPTION = ("Save a FocusFix LoRA into ComfyUI's loras folder as a kohya .safetensors that the stock "
                   "Load LoRA node (and A1111/Forge) loads.")
    CATEGORY = "FocusFix/lora"
    FUNCTION = "execute"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name relative to the loras folder (what Load LoRA lists).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": tip(LORA, "The LoRA from a FocusFix training node."),
            "filename": tip("STRING", "File name inside the loras folder; subfolders allowed (fixes/hands), "
                            "'..' and absolute paths are refused. .safetensors is added.", default="focusfix/fix"),
            "overwrite": tip("BOOLEAN", "Replace an existing file of that name, and its thumbnail (removed when no "
                             "preview is connected: it showed the replaced LoRA). Off: a counter is added "
                             "(fix_00001.safetensors), also for a name a LoRA in another loras folder has (the new "
                             "file would hide it); overwrite refuses such a name.", default=False),
        }, "optional": {
            "preview": tip("IMAGE", "Saved beside the LoRA as <name>.preview.png (the first image, e.g. the Train "
                           "node's after image): the thumbnail A1111/Forge, ComfyUI's model library and LoRA "
                           "managers show."),
        }, "hidden": GRAPH_INPUTS}

    @classmethod
    def VALIDATE_INPUTS(cls, filename=None, overwrite=None):
        # at queue time, like the Train nodes' checkpoint_name: a name that would leave the loras folder (or, to
        # overwrite, hide a LoRA in another loras folder) fails now, not after the training that feeds this node
        # (None: linked, known only when it runs)
        if filename is not None:
            try:
                lora_path(filename, overwrite=bool(overwrite))
            except ValueError as e:
                return str(e)  # it starts "filename '...'"
        return True

    def execute(self, lora, filename, overwrite, preview=None, prompt=None, extra_pnginfo=None):
        folder = _loras_folders()[0]
        if preview is not None:  # a wrong input is refused before anything is written
            preview = image_to_bchw(preview, "preview")
        path = save_lora_data(lora, filename, overwrite, folder, graph_metadata(prompt, extra_pnginfo))
        name = loras_name(path, folder)
        notes = []
        if preview is not None and save_preview(preview, path, overwrite) is None:
            notes.append(f"kept the existing {path.stem}.preview.png: turn overwrite on to replace it")
        elif preview is None and overwrite and drop_preview(path):
            notes.append(f"removed {path.stem}.preview.png: it showed the LoRA this one replaced")
        log.info(f"saved LoRA {name} in {folder} ({lora!r})")
        for note in notes:  # the core frontend draws no text a node returns: the log is where an artist sees it
            log.warning(f"Save LoRA: {note}")
        return {"ui": {"text": ["\n".join([name, *(f"({n})" for n in notes)])]}, "result": (name,)}


def loras_name(path: Path, folder: str | None = None) -> str:
    """A file's name as Load LoRA lists it: relative to the loras folder (`folder`; None = ComfyUI's first),
    with the OS's separator as ComfyUI's list has it (`focusfix\\x.safetensors` on Windows)."""
    root = Path(_loras_folders()[0] if folder is None else folder).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
