"""Shared node plumbing: schema helpers, text parsing, and the progress/cancel loop over a trainer."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import os
import time
from typing import Callable, Iterable

import torch

from ..focusfix_core.trainers import parse_ints  # noqa: F401  (the seeds format, shared with the CLI)

__all__ = ["LORA", "REWARD", "tip", "parse_lines", "comment_notes", "parse_ints", "run_with_progress", "log",
           "scheduler_names", "sampler_inputs", "GRAPH_INPUTS", "graph_metadata", "file_fingerprint"]

LORA = "FOCUSFIX_LORA"      # adapters.LoraData
REWARD = "FOCUSFIX_REWARD"  # a focusfix_core Reward module
log = logging.getLogger("FocusFix")


def tip(kind: str, text: str, **options) -> tuple:
    """One V1 input spec: (type, {tooltip, **options})."""
    return (kind, {"tooltip": text, **options})


# hidden inputs: the graph being run, which ComfyUI's own save nodes embed in the files they write
GRAPH_INPUTS = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def graph_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """File metadata holding the graph that made a file, as ComfyUI's checkpoint and image saves embed it:
    `prompt` (API format) and each extra_pnginfo entry (`workflow`, which the editor loads). Empty when ComfyUI
    runs with --disable-metadata."""
    from comfy.cli_args import args
    if args.disable_metadata:
        return {}
    out = {} if prompt is None else {"prompt": json.dumps(prompt)}
    out.update({k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()})
    return out


_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (its `_stamp`, sha256) at its last hash


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    # an atomic replace gives a new inode, and any write or os.utime a new ctime: a file rewritten with the
    # same size on a coarse clock (FAT's 2 s, SMB), or whose old mtime a copy tool put back, is hashed again
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def file_fingerprint(folder: str, name: str) -> str:
    """IS_CHANGED of a node that loads `name` from a models folder: the sha256 of the file's bytes, as LoadImage
    hashes its image. A file rewritten under the same name is read again instead of coming from ComfyUI's
    cache, and one only touched, synced or copied back is not (a needless retrain downstream). Hashed again
    only when its size, times or inode change ("" when missing: the node's execute names it)."""
    import folder_paths
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return ""
    stamp = _stamp(os.stat(path))
    known = _DIGESTS.get(path)
    if known is None or known[0] != stamp:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        known = (stamp, h.hexdigest())
        _DIGESTS[path] = known
    return known[1]


def scheduler_names() -> list[str]:
    """KSampler's scheduler names, also those a custom node registered (the core's SCHEDULERS without ComfyUI)."""
    try:
        import comfy.samplers
    except ImportError:
        from ..focusfix_core.schedules import SCHEDULERS
        return list(SCHEDULERS)
    return list(getattr(comfy.samplers, "SCHEDULER_HANDLERS", None) or comfy.samplers.KSampler.SCHEDULERS)


def sampler_inputs(what: str) -> dict:
    """The optional sampler_name and scheduler inputs (KSampler's names) of a node that samples: `what` says
    what they sample. Optional, so prompts and workflows saved before they existed still load."""
    from ..focusfix_core.sampler import SAMPLERS

    return {
        "sampler_name": tip(list(SAMPLERS), f"{what} with this KSampler sampler (deterministic ones only; ddim and "
                            "euler are the same sampler).", default="ddim"),
        "scheduler": tip(scheduler_names(), f"{what} with this KSampler scheduler.", default="normal"),
    }


def input_specs(node: type) -> dict[str, tuple]:
    """Every input of a V1 node, name -> (type, options), from required, optional and hidden."""
    return {k: v for group in node.INPUT_TYPES().values() if isinstance(group, dict) for k, v in group.items()}


def check_widget_ranges(node: type, **values) -> None:
    """ValueError naming the first of `values` outside its widget's min/max in `node.INPUT_TYPES()`, not one of
    its combo's choices, or not a finite number (JSON's NaN passes ComfyUI's own check): ComfyUI skips that
    check for the inputs a node's VALIDATE_INPUTS names and for linked ones. None (a linked input at queue
    time) is checked when it runs (`widgets_checked`)."""
    _check_ranges(input_specs(node), values)


def _check_ranges(spec: dict[str, tuple], values: dict) -> None:
    for name, value in values.items():
        options = spec[name][1] if len(spec[name]) > 1 else {}
        if value is None:
            continue
        if isinstance(spec[name][0], list):  # a combo: ComfyUI skips its own check for one VALIDATE_INPUTS names
            if value not in spec[name][0]:
                raise ValueError(f"{name} must be one of {spec[name][0]}, got {value!r}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} ({value}) must be a finite number")
        if "min" in options and value < options["min"]:
            raise ValueError(f"{name} ({value}) must be at least {options['min']}")
        if "max" in options and value > options["max"]:
            raise ValueError(f"{name} ({value}) must be at most {options['max']}")


def widgets_checked(execute: Callable) -> Callable:
    """Wrap a node's `execute` so every INT/FLOAT widget value is checked first (`check_widget_ranges`): a value
    that reached it through a link (a PrimitiveInt, another node's output) or in an API prompt skipped ComfyUI's
    min/max check, and would otherwise fail deep inside torch (negative steps, a 2**64 seed) or silently
    (a NaN strength)."""
    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def run(self, *args, **kwargs):
        spec = input_specs(type(self))
        bound = signature.bind(self, *args, **kwargs).arguments
        _check_ranges(spec, {k: v for k, v in bound.items() if k in spec and spec[k][0] in ("INT", "FLOAT")
                             and isinstance(v, (int, float)) and not isinstance(v, bool)})
        return execute(self, *args, **kwargs)
    return run


RESOLUTION_TIP = ("Attention map size r, the maps' shorter side: the image's shorter side / 8 / a power of 2 "
                  "(16 for SD1.5 at 512 px, 32 for SDXL at 1024 px; at 512x768, 16 gives 16x24 maps).")


def check_map_size(resolution: int | None, width: int | None, height: int | None) -> None:
    """At queue time: ValueError unless the UNet has feature maps whose shorter side is `resolution` at this size
    (SD-style latents, 8x smaller than the image). None (a linked input) is checked when the node runs."""
    from ..focusfix_core.attention import map_size
    if None not in (resolution, width, height):
        map_size(resolution, (height // 8, width // 8), latent_scale=8)


def _comment_lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip().startswith("#")]


def parse_lines(text: str, name: str = "prompts") -> list[str]:
    """Non-empty stripped lines that are no comment (# first); ValueError naming `name` when there are none."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        comments = len(_comment_lines(text))
        raise ValueError(f"{name} is empty: write one per line" + (
            f" (its {comments} line{'s' * (comments > 1)} start with #, which marks a comment: remove the # of a "
            f"line to use it)" if comments else ""))
    return lines


def comment_notes(text: str, name: str = "prompts") -> list[str]:
    """A report line naming the comment lines `parse_lines` skipped (a '#1 best photo' prompt drops silently)."""
    comments = _comment_lines(text)
    if not comments:
        return []
    first = comments[0] if len(comments[0]) <= 60 else comments[0][:57] + "..."
    return [f"{name}: {len(comments)} line{'s' * (len(comments) > 1)} starting with # skipped as comment"
            f"{'s' * (len(comments) > 1)} (e.g. {first!r}); remove the # to train on it"]


def clock(seconds: float) -> str:
    """Seconds as a clock: 75 -> '1:15', 3725 -> '1:02:05'; nothing left (an ETA past its end) -> '0:00'."""
    m, s = divmod(int(round(max(seconds, 0))), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def check_cancel(_info: dict | None = None) -> None:
    """Raise ComfyUI's InterruptProcessingException once the cancel button was pressed (a sampler callback)."""
    import comfy.model_management as mm
    mm.throw_exception_if_processing_interrupted()


def sampling_progress(model, total: int) -> Callable[[dict], None]:
    """A callback for the core's `sample` over `total` sampler steps of `model` (a ModelPatcher): KSampler's
    progress bar and latent previews (ComfyUI's preview method), and cancel within one step."""
    import latent_preview
    show, done = latent_preview.prepare_callback(model, total), 0

    def callback(info: dict) -> None:
        nonlocal done
        check_cancel()
        show(done, info["denoised"], info["x"], total)
        done += 1
    return callback


def run_with_progress(records: Iterable, total: int, preview: Callable[[], torch.Tensor | None] | None = None,
                      on_record: Callable | None = None) -> list:
    """Consume a trainer's records with a ComfyUI progress bar (+ JPEG preview of `preview()` [1|B,3,H,W]);
    `on_record(rec)` runs after each step (e.g. a checkpoint save).

    Cancel is checked before every step: `InterruptProcessingException` propagates (never swallowed), so
    the caller's `finally` undoes its patches and no output is produced.
    """
    import comfy.model_management as mm
    import comfy.utils
    from ..focusfix_core.viz import to_pil

    pbar = comfy.utils.ProgressBar(total)
    history, t0 = [], time.perf_counter()
    mm.throw_exception_if_processing_interrupted()
    for rec in records:
        history.append(rec)
        per_step = (time.perf_counter() - t0) / len(history)
        log.info(f"{rec.summary()}  ETA {clock(per_step * (total - rec.step - 1))}")
        if on_record is not None:
            on_record(rec)
        img = preview() if preview is not None else None
        pbar.update_absolute(rec.step + 1, total, None if img is None else ("JPEG", to_pil(img[0]), 512))
        mm.throw_exception_if_processing_interrupted()
    return history
