"""The real SD1.5 / SDXL block layouts (16 / 70 cross-attention layers, real kohya key names and attention
resolutions) at narrow widths: attention maps, both trainers, and the LoRA through the stock loader."""
from __future__ import annotations

import logging

import pytest
import torch

SIZE = 128  # latents 16x16: SD1.5 maps at 16/8/4/2, SDXL at 8/4


@pytest.fixture(scope="module", params=[("sd15", 16, 4), ("sdxl", 70, 8)], ids=["sd15", "sdxl"])
def real(request, tiny_models):
    family, n_attn2, resolution = request.param
    with torch.inference_mode():
        model, clip, vae = tiny_models.narrow_real_layout(family)
    return family, n_attn2, resolution, model, clip, vae


def test_real_layout_end_to_end(fresh, real, caplog):
    import comfy.sd
    import comfy.utils
    family, n_attn2, res, model, clip, vae = real
    net = model.model.diffusion_model
    assert sum(1 for n, _ in net.named_modules() if n.endswith("attn2")) == n_attn2
    maps, _, overlap, text = fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog",
                                       words="cat, dog", seed=0, steps=2, cfg=3.0, resolution=res, width=SIZE,
                                       height=SIZE, vae=vae)
    assert maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all()
    se = fresh.run("FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
                   lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=res, width=SIZE, height=SIZE, rank=2,
                   targets="to_k", lr=1e-2, iterations=1, seed=0)[0]
    assert sum(1 for k in se.tensors if k.endswith(".lora_down.weight")) == n_attn2
    assert se.metadata["focusfix_preservation"] == "keys"
    (name,) = fresh.run("FocusFixSaveLoRA", lora=se, filename=f"real_{family}", overwrite=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(fresh.loras / name)), 1.0, 0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert len(patched.patches) == n_attn2
    (reward,) = fresh.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    fix = fresh.run("FocusFixTrainFocusNFix", model=model, clip=clip, vae=vae, reward=reward, prompts="a cat",
                    negative_prompt="", seeds="0", width=SIZE, height=SIZE, steps=2, cfg=3.0, K=1, lam=1.0,
                    mask_source="saliency", rank=2, targets="attn", lr=1e-2, iterations=1, seed=0)[0]
    (applied,) = fresh.run("FocusFixApplyLoRA", model=model, lora=fix, strength=1.0)
    assert len(applied.patches) == 8 * n_attn2  # to_q, to_k, to_v, to_out.0 of attn1 and attn2


def test_real_layout_attention_levels_and_a_map_size_without_cross_attention(fresh, real):
    """S&E review 3: the levels with cross-attention are read from the UNet (SD1.5: all four; SDXL: not the
    latents' own size), and a resolution at a level without any is refused before anything samples, with the
    sizes this MODEL has."""
    import sys
    family, _, res, model, clip, vae = real
    adapters = sys.modules[f"{fresh.pack.__name__}.nodes.adapters"]
    levels = adapters.ComfyDiffusionModel(model, clip).attention_levels()
    assert levels == ([0, 1, 2, 3] if family == "sd15" else [1, 2])
    if family == "sdxl":  # 128 px: latents 16x16, and SDXL has no cross-attention at that level
        fresh.assert_map_size_refused(model, clip, 16, SIZE,
                                      r"resolution 16: .* only in maps of 8x8, 4x4: set resolution to 8 or 4")
