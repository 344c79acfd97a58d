"""The pack's nodes when loading the text encoder makes ComfyUI unload the MODEL (little free memory, or
`--disable-smart-memory`): they encode their prompts before they load the MODEL, so the unload can no longer
happen mid-run.

Before, the training nodes loaded the UNet, swapped its weights for trainable copies, and only then encoded the
prompts. On a MODEL with a LoRA patch (Apply LoRA, LoraLoader) the unload put the backed-up base weights back
over the copies: Train Focus-N-Fix failed ("Inference tensors cannot be saved for backward"), Train
Separate-and-Enhance trained a LoRA for the base model, and Attention Maps showed the base model's maps.
Memory pressure is emulated as ComfyUI's `load_models_gpu` meets it on a GPU: loading a text encoder first
frees every other loaded model.
"""
from __future__ import annotations

import pytest
import torch

SIZE = 64


@pytest.fixture
def pressure(monkeypatch):
    """While active, loading a text encoder unloads every other model (what `free_memory` does when the card
    is full); yields the list of loads that unloaded something."""
    import comfy.model_management as mm
    real, evictions = mm.load_models_gpu, []

    def load_models_gpu(models, *args, **kwargs):
        if any("Clip" in type(getattr(m, "model", m)).__name__ for m in models):
            gone = mm.free_memory(float("inf"), torch.device("cpu"))
            evictions.extend(type(g.model.model).__name__ for g in gone if g.model is not None)
        return real(models, *args, **kwargs)
    monkeypatch.setattr(mm, "load_models_gpu", load_models_gpu)
    yield evictions


def _same_lora(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def _patched(comfy, checkpoint, lora):
    (patched,) = comfy.run("FocusFixApplyLoRA", model=checkpoint[0], lora=lora, strength=2.0)
    return patched


def test_focus_n_fix_trains_the_patched_model_when_encoding_unloads_it(fresh, checkpoint, request):
    model, clip, vae = checkpoint
    (reward,) = fresh.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    kw = dict(clip=clip, vae=vae, reward=reward, prompts="a cat", negative_prompt="", seeds="0", width=SIZE,
              height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0, mask_source="heatmap", rank=2, targets="attn", lr=5e-2,
              iterations=2, seed=0)
    upstream = fresh.run("FocusFixTrainFocusNFix", model=model, **kw)[0]
    patched = _patched(fresh, checkpoint, upstream)
    calm = fresh.run("FocusFixTrainFocusNFix", model=patched, **kw)
    evictions = request.getfixturevalue("pressure")
    pressed = fresh.run("FocusFixTrainFocusNFix", model=patched, **kw)
    assert evictions, "the emulated pressure unloaded nothing: the test would show nothing"
    assert _same_lora(pressed[0], calm[0]) and torch.equal(pressed[3], calm[3])  # the LoRA and the after images


def test_separate_enhance_trains_the_patched_model_when_encoding_unloads_it(fresh, checkpoint, request):
    model, clip, _ = checkpoint
    kw = dict(clip=clip, prompts="a cat and a dog | cat, dog", lam_sep=1.0, lam_en=1.0, lam_preserve=1.0,
              resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k", lr=1e-2, iterations=2, seed=0)
    base = fresh.run("FocusFixTrainSeparateEnhance", model=model, **kw)[0]
    patched = _patched(fresh, checkpoint, base)
    calm = fresh.run("FocusFixTrainSeparateEnhance", model=patched, **kw)[0]
    assert not _same_lora(calm, base), "the upstream LoRA must change what is trained, or the test shows nothing"
    evictions = request.getfixturevalue("pressure")
    pressed = fresh.run("FocusFixTrainSeparateEnhance", model=patched, **kw)[0]
    assert evictions and _same_lora(pressed, calm)


def test_attention_maps_keep_the_models_patches_when_encoding_unloads_it(fresh, checkpoint, request):
    model, clip, vae = checkpoint
    (reward,) = fresh.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    lora = fresh.run("FocusFixTrainFocusNFix", model=model, clip=clip, vae=vae, reward=reward, prompts="a cat",
                     negative_prompt="", seeds="0", width=SIZE, height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0,
                     mask_source="heatmap", rank=2, targets="attn", lr=2e-1, iterations=3, seed=0)[0]
    patched = _patched(fresh, checkpoint, lora)
    kw = dict(clip=clip, vae=vae, prompt="a cat and a dog", words="cat, dog", seed=0, steps=3, cfg=3.0, resolution=4,
              width=SIZE, height=SIZE)
    base = fresh.run("FocusFixAttentionMaps", model=model, **kw)[0]
    calm = fresh.run("FocusFixAttentionMaps", model=patched, **kw)[0]
    assert not torch.equal(calm, base), "the LoRA must change the maps, or the test shows nothing"
    evictions = request.getfixturevalue("pressure")
    pressed = fresh.run("FocusFixAttentionMaps", model=patched, **kw)[0]
    assert evictions and torch.equal(pressed, calm)
