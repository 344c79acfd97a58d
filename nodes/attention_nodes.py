"""FocusFix Attention Maps: where each prompt word lands in the image, and the numbers Separate-and-Enhance uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..focusfix_core import viz
from ..focusfix_core.attention import overlay_maps
from ..focusfix_core.losses import overlap_and_peaks
from ..focusfix_core.trainers import split_words
from .adapters import ComfyDiffusionModel, b1hw_to_mask, bchw_to_image, prompt_attention_maps
from .common import (RESOLUTION_TIP, check_map_size, check_widget_ranges, sampler_inputs, sampling_progress, tip,
                     widgets_checked)

__all__ = ["FocusFixAttentionMaps"]


class FocusFixAttentionMaps:
    DESCRIPTION = ("Cross-attention maps of chosen prompt words, averaged over the sampling steps at one map size; "
                   "overlap = Separate loss (0 = words apart), peaks = each word's strongest blurred attention.")
    CATEGORY = "FocusFix/attention"
    FUNCTION = "execute"
    RETURN_TYPES = ("MASK", "IMAGE", "FLOAT", "STRING")
    RETURN_NAMES = ("maps", "overlay", "overlap", "text")
    OUTPUT_TOOLTIPS = ("One map per word, [n_words,H,W], each scaled to [0,1].",
                       "The image (or grey without a VAE), then each word's map over it.",
                       "Separate loss of the maps averaged over the sampling steps (mean pairwise overlap; 0 with "
                       "one word). Training's Separate loss is taken per step on random noisy latents, so its "
                       "numbers differ; compare this one before and after.",
                       "Overlap and per-word peaks, readable.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": tip("MODEL", "The diffusion model (an SD1.x, SD2.x or SDXL-type UNet), with any LoRA "
                         "applied."),
            "clip": tip("CLIP", "The checkpoint's text encoder."),
            "prompt": tip("STRING", "The prompt to sample; the words below must appear in it.", multiline=True,
                          default="a cat and a dog"),
            "words": tip("STRING", "Words to map, separated by ',' or ';', each written as in the prompt. A word's "
                         "first whole-word occurrence is used; a word of several tokens or words ('teddy bear', "
                         "'black cat') sums their maps. Two words must not share a token.", default="cat, dog"),
            "seed": tip("INT", "Noise seed (kept fixed between runs, so before/after maps compare).", default=0, min=0,
                        max=0xFFFFFFFFFFFFFFFF, control_after_generate=False),
            "steps": tip("INT", "Sampler steps (maps are averaged over all of them).", default=20, min=1, max=200),
            "cfg": tip("FLOAT", "Classifier-free guidance scale.", default=5.0, min=1.0, max=30.0, step=0.1),
            "resolution": tip("INT", RESOLUTION_TIP, default=16, min=2, max=128),
            "width": tip("INT", "Image width in pixels.", default=512, min=16, max=4096, step=8),
            "height": tip("INT", "Image height in pixels.", default=512, min=16, max=4096, step=8),
        }, "optional": {"vae": tip("VAE", "Decode the sampled image to draw the maps over it."),
                        **sampler_inputs("The image is sampled"),
                        "negative_prompt": tip("STRING", "Negative prompt for CFG: give your KSampler's, so the "
                                               "maps are of the image it draws.", multiline=True, default="")}}

    @classmethod
    def VALIDATE_INPUTS(cls, resolution, width, height):
        try:  # ComfyUI leaves the min/max of inputs named here to the node
            check_widget_ranges(cls, resolution=resolution, width=width, height=height)
            check_map_size(resolution, width, height)
        except ValueError as e:
            return str(e)
        return True

    @widgets_checked
    def execute(self, model, clip, prompt, words, seed, steps, cfg, resolution, width, height, vae=None,
                sampler_name="ddim", scheduler="normal", negative_prompt=""):
        names = split_words(words)
        if not names:
            raise ValueError("words is empty: give the prompt words to map, e.g. cat, dog")
        dm = ComfyDiffusionModel(model, clip, vae)
        A, z = prompt_attention_maps(dm, prompt, names, seed=seed, steps=steps, cfg_scale=cfg, width=width,
                                     height=height, resolution=resolution, negative=negative_prompt,
                                     sampler_name=sampler_name, scheduler=scheduler,
                                     callback=sampling_progress(model, steps))
        A = A.float().cpu()
        # VAE Decode's own path (no gradient here): ComfyUI's memory estimate, and its tiled decode when short
        I = (vae.decode(dm.latent_format.process_out(z)).float().cpu().clamp(0, 1).movedim(-1, 1)[:, :3]
             if vae is not None else torch.full((1, 3, height, width), 0.5))
        overlap, peaks = overlap_and_peaks(A)
        up = F.interpolate(A, size=(height, width), mode="bilinear", align_corners=False)[0]       # (n, H, W)
        up = up / up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        tiles = torch.cat([I, overlay_maps(I, A)[0]])                                             # (1+n, 3, H, W)
        text = f"overlap {overlap:.4f}\n" + "\n".join(f"{w}: peak {p:.4f}" for w, p in zip(names, peaks))
        return (b1hw_to_mask(up), bchw_to_image(viz.image_grid(tiles, nrow=len(tiles))[None]), overlap, text)
