"""Stand-ins for ComfyUI modules, shared by the tests that run the nodes without ComfyUI."""
from __future__ import annotations

import os
import types
from pathlib import Path


def folder_paths_stub(folder: Path, *more: Path) -> types.ModuleType:
    """A stand-in `folder_paths` whose loras folders are `folder` (where saves go) and `more` (those of an
    extra_model_paths.yaml), looking files up as ComfyUI's does (`get_full_path`: the name joined under each folder in turn, the first file;
    `get_filename_list`: every file below the folders, links followed, as one list)."""
    fp = types.ModuleType("folder_paths")
    folders = [str(f) for f in (folder, *more)]
    fp.get_folder_paths = lambda name: folders[:] if name == "loras" else []

    def get_full_path(name, filename):
        if name != "loras":
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")  # as ComfyUI: a name cannot leave the folder
        return next((full for f in folders if os.path.isfile(full := os.path.join(f, filename))), None)

    def get_full_path_or_raise(name, filename):
        full = get_full_path(name, filename)
        if full is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return full

    def get_filename_list(name):
        out = set()
        for f in folders:
            for dirpath, _, files in os.walk(f, followlinks=True):
                out |= {os.path.relpath(os.path.join(dirpath, n), f) for n in files}
        return sorted(f for f in out if os.path.splitext(f)[1].lower() in (".safetensors", ".pt", ".ckpt"))

    fp.get_full_path, fp.get_full_path_or_raise, fp.get_filename_list = get_full_path, get_full_path_or_raise, \
        get_filename_list
    return fp
