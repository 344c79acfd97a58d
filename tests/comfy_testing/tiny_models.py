"""Tiny SD1.5- and SDXL-layout MODEL/CLIP/VAE built in code with ComfyUI's own classes (tests only).

Shapes follow the real families (attn2 layers named `input_blocks.N.1.transformer_blocks.M.attn2`,
SDXL `y` = pooled + 6 size embeddings), but every width is tiny so a CPU test takes seconds.
Importing this module requires ComfyUI on sys.path.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base

__all__ = ["tiny_sd15", "tiny_sdxl", "tiny_sdxl_refiner", "tiny_vae", "tiny_checkpoint", "narrow_real_layout",
           "LAYOUTS"]

LAYOUTS = ("sd15", "sdxl")
WIDTH = 32  # text width of every tiny CLIP tower
_CLIP_CFG = {"hidden_size": WIDTH, "intermediate_size": 64, "num_attention_heads": 2,
             "num_hidden_layers": 3, "projection_dim": WIDTH}


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI ops skip weight init (torch.empty): give every parameter a deterministic, well-scaled value."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        elif name.endswith("weight"):
            v = torch.ones(p.shape)
        else:
            v = torch.randn(p.shape, generator=g) * 0.01
        p.copy_(v)
    return module


def _unet(config_cls, cfg: dict, seed: int, weight_dtype: torch.dtype = torch.float32, state_dict: dict | None = None):
    """weight_dtype float8_*: weights stored in fp8 and cast to fp32 per layer (ComfyUI's manual cast), as the
    "Load Diffusion Model" node's weight_dtype fp8_e4m3fn gives. float16 / bfloat16: stored and computed in it,
    as ComfyUI runs SD1.5 and SDXL UNets on most GPUs (fp16). state_dict: the keys a checkpoint's model type is
    read from (e.g. Playground v2.5's edm_mean/edm_std)."""
    mc = config_cls(cfg)
    native = weight_dtype in (torch.float32, torch.float16, torch.bfloat16)
    mc.set_inference_dtype(weight_dtype, None if native else torch.float32)
    for k, v in cfg.items():  # unet_extra_config overrides num_heads/num_head_channels: put ours back
        mc.unet_config[k] = v
    mc.unet_config["dtype"] = weight_dtype
    model = mc.get_model(state_dict or {})
    randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


_COMMON = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "dtype": torch.float32, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
           "use_temporal_attention": False, "use_temporal_resblock": False}


def tiny_sd15(seed: int = 0, weight_dtype: torch.dtype = torch.float32, in_channels: int = 4):
    """SD1.5 layout: attn2 in every level, context 32, eps prediction (in_channels 9: an inpainting UNet, the
    latent + mask + masked image). -> (MODEL, CLIP)."""
    cfg = {**_COMMON, "in_channels": in_channels, "adm_in_channels": None, "context_dim": WIDTH, "use_linear_in_transformer": False,
           "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
           "num_heads": 2, "num_head_channels": -1}
    model = _unet(comfy.supported_models.SD15, cfg, seed, weight_dtype)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(_CLIP_CFG)})
    randomize(clip.cond_stage_model, seed + 1)
    return model, clip


def tiny_sdxl(seed: int = 0, weight_dtype: torch.dtype = torch.float32, playground: bool = False):
    """SDXL layout: no attention in level 0, linear proj_in, context = clip_l + clip_g (64), y = pooled + 6x256.
    playground: as a Playground v2.5 checkpoint loads (EDM parameterisation, its own latent format with a
    per-channel mean and std). -> (MODEL, CLIP)."""
    cfg = {**_COMMON, "adm_in_channels": WIDTH + 6 * 256, "num_classes": "sequential", "context_dim": 2 * WIDTH,
           "use_linear_in_transformer": True, "transformer_depth": [0, 2], "transformer_depth_middle": 1,
           "transformer_depth_output": [0, 0, 2, 2], "num_heads": -1, "num_head_channels": 16}
    edm = {"edm_mean": torch.zeros(4), "edm_std": torch.ones(4)} if playground else None
    model = _unet(comfy.supported_models.SDXL, cfg, seed, weight_dtype, edm)
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(_CLIP_CFG), "clip_g_model_config": dict(_CLIP_CFG)})
    randomize(clip.cond_stage_model, seed + 1)
    return model, clip


def tiny_sdxl_refiner(seed: int = 0):
    """SDXL refiner layout: context = clip_g alone (32), y = pooled + 5x256 (sizes, crops and an aesthetic score,
    which encode_adm sets by prompt type: 6 for the prompt, 2.5 for the negative prompt). -> (MODEL, CLIP)."""
    cfg = {**_COMMON, "adm_in_channels": WIDTH + 5 * 256, "num_classes": "sequential", "context_dim": WIDTH,
           "use_linear_in_transformer": True, "transformer_depth": [0, 2], "transformer_depth_middle": 1,
           "transformer_depth_output": [0, 0, 2, 2], "num_heads": -1, "num_head_channels": 16}
    model = _unet(comfy.supported_models.SDXLRefiner, cfg, seed)
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLRefinerClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_g_model_config": dict(_CLIP_CFG)})
    randomize(clip.cond_stage_model, seed + 1)
    return model, clip


def tiny_flux(seed: int = 0):
    """A Flux transformer (a DiT, not an SD-style UNet) at toy width: a MODEL FocusFix must refuse by name."""
    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": WIDTH, "context_in_dim": WIDTH,
           "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
           "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def narrow_real_layout(family: str = "sd15", seed: int = 0):
    """The real SD1.5 / SDXL block layout (depths, levels, attention placement: kohya keys and attention
    resolutions as in the real checkpoints) at narrow widths. -> (MODEL, CLIP, VAE)."""
    if family == "sd15":
        cfg = {**_COMMON, "adm_in_channels": None, "context_dim": WIDTH, "use_linear_in_transformer": False,
               "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
               "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "num_heads": 8, "num_head_channels": -1}
        model, clip = _unet(comfy.supported_models.SD15, cfg, seed), tiny_sd15(seed)[1]
    elif family == "sdxl":
        cfg = {**_COMMON, "adm_in_channels": WIDTH + 6 * 256, "num_classes": "sequential", "context_dim": 2 * WIDTH,
               "use_linear_in_transformer": True, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
               "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
               "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "num_heads": -1, "num_head_channels": 16}
        model, clip = _unet(comfy.supported_models.SDXL, cfg, seed), tiny_sdxl(seed)[1]
    else:
        raise ValueError(f"family must be 'sd15' or 'sdxl', got {family!r}")
    return model, clip, tiny_vae(seed)


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """AutoencoderKL with `latent_channels` latent channels (4: SD1.5/SDXL; 16: Flux/SD3) and an 8x downscale,
    32 channels wide."""
    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 64, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    logging.disable(logging.WARNING)  # "Missing VAE keys": expected, the weights are randomised next
    try:
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": latent_channels, "ddconfig": ddconfig}})
    finally:
        logging.disable(logging.NOTSET)
    vae.latent_channels = latent_channels  # as ComfyUI sets it when it detects a VAE from its weights
    randomize(vae.first_stage_model, seed + 2)
    return vae


def tiny_checkpoint(layout: str = "sd15", seed: int = 0, weight_dtype: torch.dtype = torch.float32):
    """(MODEL, CLIP, VAE) like CheckpointLoaderSimple returns, for layout 'sd15' or 'sdxl'."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    model, clip = (tiny_sd15 if layout == "sd15" else tiny_sdxl)(seed, weight_dtype)
    return model, clip, tiny_vae(seed)
