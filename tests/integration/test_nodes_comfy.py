"""Each FocusFix node on tiny SD1.5- and SDXL-layout models inside a real ComfyUI (in-process, CPU)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch_versions import compile_checked

REPO = Path(__file__).resolve().parents[2]

SIZE = 64  # pixels: latents 8x8, attention maps 8x8 (level 0, SD1.5 only) and 4x4


def _image(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, SIZE, SIZE, 3, generator=g)


def _hooks(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def _weights_untouched(model):
    return all(p.is_inference() for p in model.model.diffusion_model.parameters())


def test_pack_lists_every_node(comfy):
    from_pack = set(comfy.pack.NODE_CLASS_MAPPINGS)
    assert len(from_pack) == 11
    assert from_pack <= set(comfy.nodes.NODE_CLASS_MAPPINGS)
    for k in from_pack:
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[k].startswith("FocusFix ")


def test_reward_folder_registered(comfy):
    import folder_paths
    assert "focusfix_rewards" in folder_paths.folder_names_and_paths
    with pytest.raises(Exception):
        folder_paths.get_full_path_or_raise("focusfix_rewards", "../../etc/passwd")


def test_reward_folder_keeps_models_folder_beside_an_extra_model_paths_entry(comfy, tmp_path):
    """Review s29: ComfyUI reads extra_model_paths.yaml before it loads node packs (add_model_folder_path, as here),
    and enters a `focusfix_rewards` folder it names with no extensions. The pack then kept that entry alone:
    models/focusfix_rewards went unread, and every file in the shared folder (notes, previews) was a choice."""
    import folder_paths
    adapters = sys.modules[f"{comfy.pack.__name__}.nodes.adapters"]
    shared = tmp_path / "rewards"
    shared.mkdir()
    (shared / "shared_head.safetensors").write_bytes(b"")
    (shared / "README.txt").write_text("where these heads came from")
    mine = Path(folder_paths.models_dir) / "focusfix_rewards" / "mine.safetensors"
    mine.write_bytes(b"")
    old = folder_paths.folder_names_and_paths.pop("focusfix_rewards")
    try:
        folder_paths.add_model_folder_path("focusfix_rewards", str(shared))
        adapters.register_reward_folder()
        adapters.register_reward_folder()  # once per Load Reward schema: nothing added twice
        paths, _ = folder_paths.folder_names_and_paths["focusfix_rewards"]
        assert paths == [str(shared), os.path.join(folder_paths.models_dir, "focusfix_rewards")]
        files = [c for c in adapters.reward_choices() if not c.startswith("builtin:")]
        assert {"mine.safetensors", "shared_head.safetensors"} <= set(files) and "README.txt" not in files, files
    finally:
        folder_paths.folder_names_and_paths["focusfix_rewards"] = old
        folder_paths.filename_list_cache.pop("focusfix_rewards", None)
        mine.unlink()


def test_score_saliency_compare(comfy):
    (reward,) = comfy.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    img = _image()
    scores, text, heat, overlay = comfy.run("FocusFixScoreImages", image=img, reward=reward)
    assert len(scores) == 2 and "sharpness" in text
    assert heat.shape == (2, SIZE, SIZE) and overlay.shape == (2, SIZE, SIZE, 3)
    mask, ov = comfy.run("FocusFixSaliencyMask", image=img, reward=reward, mask_source="saliency",
                         saliency_method="grad", blur_sigma=1.0, threshold_mode="top_percent", threshold=0.2,
                         dilation=1, feather=0.0)
    assert mask.shape == (2, SIZE, SIZE) and 0 < float(mask.mean()) < 1
    # the mask is a plain MASK: core mask nodes take it
    (grown,) = comfy.run("GrowMask", mask=mask, expand=2, tapered_corners=True)
    assert grown.sum() >= mask.sum()
    (cut,) = comfy.run("ThresholdMask", mask=grown, value=0.5)
    (both,) = comfy.run("MaskComposite", destination=cut, source=mask, x=0, y=0, operation="add")
    assert both.shape == mask.shape and float(both.max()) <= 1.0
    grid, text, rb, ra, inside, outside = comfy.run("FocusFixCompare", before=img, after=img.flip(0), mask=mask,
                                                    reward=reward)
    assert grid.ndim == 4 and grid.shape[-1] == 3 and "reward before" in text and inside >= 0 and outside >= 0


def test_mask_of_wrong_size_is_resized_with_a_note(comfy):
    img = _image(b=1)
    grid, text, *_ = comfy.run("FocusFixCompare", before=img, after=img, mask=torch.ones(1, 16, 16))
    assert "resized from 16x16" in text


def test_attention_maps(comfy, checkpoint, layout):
    model, clip, vae = checkpoint
    maps, overlay, overlap, text = comfy.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog",
                                             words="cat, dog", seed=0, steps=3, cfg=3.0, resolution=4, width=SIZE,
                                             height=SIZE, vae=vae)
    assert maps.shape == (2, SIZE, SIZE) and overlay.shape[-1] == 3
    assert 0 <= overlap <= 1 and "cat: peak" in text
    assert _hooks(model.model.diffusion_model) == 0
    kw = dict(model=model, clip=clip, prompt="a cat and a dog", words="cat, dog", steps=3, cfg=3.0, resolution=4,
              width=SIZE, height=SIZE)
    assert comfy.run("FocusFixAttentionMaps", seed=2**64 - 1, **kw)[0].shape == (2, SIZE, SIZE)  # KSampler's max
    with pytest.raises(ValueError, match=r"seed \(18446744073709551616\) must be at most"):  # linked, out of range
        comfy.run("FocusFixAttentionMaps", seed=2**64, **kw)


def test_attention_maps_sample_the_image_ksampler_draws_with_its_negative_prompt(comfy, checkpoint):
    """The node sampled with an empty negative prompt only: against a KSampler with "blurry, low quality" its
    image differed by 0.44, so the maps were of an image the artist never saw (review E3)."""
    model, clip, vae = checkpoint
    negative = "blurry, low quality"
    kw = dict(model=model, clip=clip, prompt="a cat and a dog", words="cat, dog", seed=3, steps=3, cfg=4.0,
              resolution=4, width=SIZE, height=SIZE, vae=vae)
    latent = comfy.run("KSampler", model=model, seed=3, steps=3, cfg=4.0, sampler_name="ddim", scheduler="normal",
                       positive=comfy.run("CLIPTextEncode", clip=clip, text="a cat and a dog")[0],
                       negative=comfy.run("CLIPTextEncode", clip=clip, text=negative)[0], denoise=1.0,
                       latent_image={"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)})[0]
    image = comfy.run("VAEDecode", samples=latent, vae=vae)[0][0]

    def drawn(**extra):  # the overlay grid's first tile: the sampled image
        return comfy.run("FocusFixAttentionMaps", **kw, **extra)[1][0, 2:2 + SIZE, 2:2 + SIZE]
    torch.testing.assert_close(drawn(negative_prompt=negative), image, rtol=0, atol=1e-4)
    assert (drawn() - image).abs().max() > 1e-2


def test_attention_maps_sample_with_ksamplers_sampler_and_scheduler(comfy, checkpoint):
    """The maps come from the image KSampler draws with the same seed, steps, cfg, sampler_name and scheduler
    (here dpmpp_2m on karras): the node's sampled image equals KSampler's, and differs from ddim/normal's."""
    import sys
    model, clip, vae = checkpoint
    adapters = sys.modules[f"{comfy.pack.__name__}.nodes.adapters"]
    dm = adapters.ComfyDiffusionModel(model, clip, vae)
    kw = dict(seed=5, steps=4, cfg_scale=3.0, width=SIZE, height=SIZE, resolution=4)
    with torch.inference_mode():
        _, z = adapters.prompt_attention_maps(dm, "a cat and a dog", ["cat", "dog"], sampler_name="dpmpp_2m",
                                              scheduler="karras", **kw)
        _, z_ddim = adapters.prompt_attention_maps(dm, "a cat and a dog", ["cat", "dog"], **kw)
    positive = comfy.run("CLIPTextEncode", clip=clip, text="a cat and a dog")[0]
    negative = comfy.run("CLIPTextEncode", clip=clip, text="")[0]
    latent = comfy.run("KSampler", model=model, seed=5, steps=4, cfg=3.0, sampler_name="dpmpp_2m", scheduler="karras",
                       positive=positive, negative=negative, denoise=1.0,
                       latent_image={"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)})[0]
    image = comfy.run("VAEDecode", samples=latent, vae=vae)[0]
    with torch.inference_mode():
        ours, ours_ddim = (adapters.bchw_to_image(dm.decode(x).float().cpu()) for x in (z, z_ddim))
    torch.testing.assert_close(ours, image, rtol=0, atol=1e-4)
    assert (ours_ddim - image).abs().max() > 1e-2
    maps, *_ = comfy.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog", words="cat, dog",
                         seed=5, steps=4, cfg=3.0, resolution=4, width=SIZE, height=SIZE, sampler_name="dpmpp_2m",
                         scheduler="karras")
    assert maps.shape == (2, SIZE, SIZE)


def test_attention_maps_show_a_step_bar_and_cancel_within_sampling(fresh, checkpoint):
    """As KSampler: one progress update per sampler step (with the latent preview ComfyUI is set to), and cancel
    stops the sampling at the next step with the attention hooks removed."""
    import comfy.model_management as mm
    model, clip, _ = checkpoint
    kw = dict(model=model, clip=clip, prompt="a cat and a dog", words="cat, dog", seed=0, steps=4, cfg=3.0,
              resolution=4, width=SIZE, height=SIZE)
    fresh.run("FocusFixAttentionMaps", **kw)
    assert [(v, t) for v, t, _ in fresh.progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    fresh.progress.clear()
    fresh.interrupt_at = 2
    with pytest.raises(mm.InterruptProcessingException):
        fresh.run("FocusFixAttentionMaps", **kw)
    assert [v for v, _, _ in fresh.progress] == [1, 2]
    assert _hooks(model.model.diffusion_model) == 0


def test_attention_maps_missing_word(comfy, checkpoint):
    model, clip, _ = checkpoint
    with pytest.raises(ValueError, match="'horse' not found"):
        comfy.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog", words="cat, horse",
                  seed=0, steps=2, cfg=3.0, resolution=4, width=SIZE, height=SIZE)


def _train_fix(comfy, checkpoint, **over):
    model, clip, vae = checkpoint
    (reward,) = comfy.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    kw = dict(model=model, clip=clip, vae=vae, reward=reward, prompts="a cat\na dog", negative_prompt="", seeds="0, 1",
              width=SIZE, height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0, mask_source="heatmap", rank=2, targets="attn",
              lr=1e-2, iterations=2, seed=0)
    kw.update(over)
    return comfy.run("FocusFixTrainFocusNFix", **kw)


def test_train_focus_n_fix(fresh, checkpoint, layout):
    model = checkpoint[0]
    lora, curve, before, after, mask, report = _train_fix(fresh, checkpoint)
    assert lora.method == "focus-n-fix" and lora.tensors
    # kohya's layer names for the model: diffusers names for SD1.x (its tools find nothing else), LDM ones for SDXL
    block = "lora_unet_down_blocks_" if layout == "sd15" else "lora_unet_input_blocks_"
    assert all(k.startswith("lora_unet_") for k in lora.tensors) and any(k.startswith(block) for k in lora.tensors)
    assert not any(k.startswith("lora_unet_input_blocks_" if layout == "sd15" else "lora_unet_down_blocks_")
                   for k in lora.tensors)
    assert before.shape == after.shape == (4, SIZE, SIZE, 3) and mask.shape == (4, SIZE, SIZE)
    assert not torch.equal(before, after), "two steps at lr 1e-2 should change the images"
    assert curve.ndim == 4 and "step 2/2" in report and "trained 2 steps in 0:" in report
    # progress: one update per step, with a JPEG preview
    training = [(v, t, p) for v, t, p in fresh.progress if t == 2]  # then the before/after images' step bar
    assert training[-1][:2] == (2, 2) and training[-1][2][0] == "JPEG"
    # the user's MODEL is untouched: no hooks left, original (inference) weights back, no patches
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model) and not model.patches


def test_a_reward_turning_nan_mid_run_keeps_the_steps_trained(fresh, checkpoint, monkeypatch):
    """A NaN score at step 3 of 4 failed the node: no outputs, and with checkpoints off steps 1-2 were gone, while
    the message said the LoRA was kept (review extreme-F1). The outputs now hold step 2's LoRA and its images,
    the report starts with why, and the checkpoint holds step 2."""
    import sys
    trainers = sys.modules[f"{fresh.pack.__name__}.focusfix_core.trainers"]
    real, calls = trainers.FixTrainer.train_step, []

    def nan_score_at_step_3(self):
        calls.append(1)
        if len(calls) != 3:
            return real(self)
        score = self.reward.forward
        self.reward.forward = lambda I, *a, **k: score(I, *a, **k) * float("nan")
        try:
            return real(self)
        finally:
            self.reward.forward = score
    monkeypatch.setattr(trainers.FixTrainer, "train_step", nan_score_at_step_3)
    lora, curve, before, after, mask, report = _train_fix(fresh, checkpoint, iterations=4, checkpoint_every=1,
                                                          checkpoint_name="ff/ck")
    assert report.startswith("WARNING: training stopped after 2 of 4 iterations: scores must be finite")
    assert "the LoRA keeps the weights of step 2" in report and "step 2/4" in report
    assert lora.metadata["focusfix_steps_trained"] == "2"
    assert all(torch.isfinite(v).all() for v in lora.tensors.values()) and torch.isfinite(after).all()
    assert not torch.equal(before, after), "two steps were trained"
    saved = fresh.pack.nodes.adapters.LoraData.from_file(fresh.loras / "ff" / "ck.safetensors")
    assert saved.metadata["focusfix_steps_trained"] == "2"
    assert all(torch.equal(saved.tensors[k], v) for k, v in lora.tensors.items())
    assert "ck.safetensors (after the last good step" in report


def test_train_focus_n_fix_on_fp8_weights(fresh, tiny_models):
    """SDXL on a 12 GB card is often loaded with weight_dtype fp8_e4m3fn (weights stored in fp8, computed in
    a wider dtype per layer). Training must work there, and the LoRA must act in every sampler step."""
    with torch.inference_mode():
        checkpoint = tiny_models.tiny_checkpoint("sdxl", 0, weight_dtype=torch.float8_e4m3fn)
    model = checkpoint[0]
    weights = {n: p.view(torch.uint8).clone() for n, p in model.model.diffusion_model.named_parameters()}
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {torch.float8_e4m3fn}
    lora, curve, before, after, mask, report = _train_fix(fresh, checkpoint, iterations=3)
    # KSampler with the LoRA rounds it into the fp8 weights: after 7e-4 from KSampler's, 4x the fix (review E1)
    assert "the MODEL's weights are stored in fp8: Load LoRA (and Apply LoRA) round the LoRA into them" in report
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in lora.tensors.items())
    assert not torch.equal(before, after), "the fp8 model's images should change"
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model) and not model.patches
    assert all(torch.equal(p.view(torch.uint8), weights[n]) for n, p in model.model.diffusion_model.named_parameters())


def test_fp16_unet_trains_with_loss_scaling(fresh, tiny_models, monkeypatch):
    """ComfyUI computes SD1.5/SDXL UNets in fp16 on most GPUs. Without loss scaling a reward's small gradients
    underflow on the way back through fp16 activations (here the gradient norm comes out 2.4x off; with the
    harness's aesthetic reward it is exactly 0); with it the adapters get the gradients the fp32 model gives."""
    import sys
    pack = fresh.pack.__name__
    runs, adapters = sys.modules[f"{pack}.nodes.runs"], sys.modules[f"{pack}.nodes.adapters"]
    trainers = sys.modules[f"{pack}.focusfix_core.trainers"]

    def train(dtype):
        with torch.inference_mode():
            model, clip, vae = tiny_models.tiny_checkpoint("sd15", 0, weight_dtype=dtype)
        dm = adapters.ComfyDiffusionModel(model, clip, vae)
        assert dm.compute_dtypes[0] == dtype
        return runs.run_focus_n_fix(dm, adapters.load_reward_by_name("builtin:sharpness"), lambda: trainers.FixConfig(
            prompts=("a cat",), seeds=(0, 1), height=SIZE, width=SIZE, steps=3, cfg_scale=3.0, K=1, lam=1.0,
            mask_source="heatmap", rank=2, targets="attn", lr=1e-2, iterations=2, batch_size=2)).history

    fp32, fp16 = train(torch.float32), train(torch.float16)
    assert fp32[0].loss_scale is None and fp16[0].loss_scale == 2.0**16
    assert fp16[0].grad_norm == pytest.approx(fp32[0].grad_norm, rel=0.01), (fp16[0], fp32[0])
    *_, report = _train_fix(fresh, tiny_models.tiny_checkpoint("sd15", 0, weight_dtype=torch.float16), iterations=1)
    assert "fp16 in the gradient path (UNet or VAE): loss scaling on (last scale 65536); 0 of 1 updates skipped" in report
    monkeypatch.setattr(trainers, "_fp16_in_gradient_path", lambda model: False)  # the trainer before
    unscaled = train(torch.float16)[0].grad_norm
    assert abs(unscaled - fp32[0].grad_norm) > 0.5 * fp32[0].grad_norm, (unscaled, fp32[0].grad_norm)


def test_train_focus_n_fix_painted_mask_and_conditioning(fresh, checkpoint, layout):
    model, clip, vae = checkpoint
    with torch.inference_mode():
        pos = fresh.node("CLIPTextEncode")().encode(clip, "a cat")[0]
        neg = fresh.node("CLIPTextEncode")().encode(clip, "")[0]
    painted = torch.zeros(1, 32, 32)
    painted[:, 8:24, 8:24] = 1
    lora, curve, before, after, mask, report = _train_fix(fresh, checkpoint, mask=painted, mask_source="heatmap",
                                                          positive=pos, negative=neg, seeds="3")
    assert mask.shape == (1, SIZE, SIZE) and "resized from 32x32" in report and "MASK is connected" in report


def test_an_empty_painted_mask_is_refused_and_a_full_one_noted(fresh, checkpoint):
    """The mask editor saved nothing (or the mask is inverted): refused before training, by name. A mask that
    covers everything trains as plain DRaFT, and the report says so."""
    model = checkpoint[0]
    with pytest.raises(ValueError, match=r"mask M\[0\] is empty \(every value 0\).*paint the region that may change"):
        _train_fix(fresh, checkpoint, mask=torch.zeros(1, SIZE, SIZE), mask_source="mask")
    assert _hooks(model.model.diffusion_model) == 0 and not fresh.progress
    *_, report = _train_fix(fresh, checkpoint, mask=torch.ones(1, SIZE, SIZE), mask_source="mask", iterations=1)
    assert "M[0] is full (every value 1): nothing is held" in report


def test_a_flat_map_met_only_after_training_keeps_the_lora_and_is_noted(fresh, checkpoint, monkeypatch):
    """An item no step drew whose heatmap is flat made before_after() raise after the whole training: the node
    failed and its LoRA was lost (review C3). The node now returns it, and its report names the item."""
    import sys
    trainers = sys.modules[f"{fresh.pack.__name__}.focusfix_core.trainers"]
    real = trainers.FixTrainer.before_after

    def flat_from_now(self, *a, **kw):
        monkeypatch.setattr(self.reward, "heatmap", lambda I: I[:, :1] * 0)
        return real(self, *a, **kw)
    monkeypatch.setattr(trainers.FixTrainer, "before_after", flat_from_now)
    lora, curve, before, after, mask, report = _train_fix(fresh, checkpoint, iterations=1, seeds="0, 1, 2",
                                                          prompts="a cat")
    assert lora.tensors and before.shape[0] == 3
    assert report.count("no mask (the reward's heatmap of its image is flat); training never drew it") == 2
    assert sorted(bool(m.any()) for m in mask) == [False, False, True]


def test_train_focus_n_fix_plain_draft(fresh, checkpoint):
    lora, *_, report = _train_fix(fresh, checkpoint, mask_source="none", iterations=1, seeds="0", prompts="a cat")
    assert lora.method == "draft"


@pytest.mark.parametrize("bad, match", [
    (dict(prompts="  \n "), "prompts is empty"),
    (dict(mask_source="mask"), "no MASK is connected"),
    (dict(K=5), "K"),
    (dict(seeds="1, x"), "seeds"),
])
def test_train_focus_n_fix_bad_input(fresh, checkpoint, bad, match):
    model = checkpoint[0]
    with pytest.raises(ValueError, match=match):
        _train_fix(fresh, checkpoint, **bad)
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


def test_inpainting_model_is_refused_by_name(fresh, tiny_models):
    model, clip = tiny_models.tiny_sd15(in_channels=9)
    vae = tiny_models.tiny_vae()
    with pytest.raises(ValueError, match="inpainting or image-conditioned model: its UNet takes 9 input channels"):
        _train_fix(fresh, (model, clip, vae))
    with pytest.raises(ValueError, match="load the checkpoint's base"):
        fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog", words="cat, dog",
                  seed=0, steps=2, cfg=3.0, resolution=4, width=SIZE, height=SIZE)


def test_non_unet_model_is_refused_by_name(fresh, checkpoint, tiny_models):
    _, clip, vae = checkpoint
    with pytest.raises(ValueError, match=r"this MODEL \(Flux, Flux\) is not an SD-style UNet"):
        _train_fix(fresh, (tiny_models.tiny_flux(), clip, vae))


def test_a_vae_for_other_latents_is_refused_by_name(fresh, checkpoint, tiny_models):
    """A Flux/SD3 VAE (16 channels) beside an SD1.5/SDXL MODEL: refused before anything samples, naming both."""
    model, clip, _ = checkpoint
    flux_vae = tiny_models.tiny_vae(latent_channels=16)
    with pytest.raises(ValueError, match=r"this VAE decodes 16-channel latents, but the MODEL \(SD\w+\) makes "
                                         r"4-channel image latents"):
        _train_fix(fresh, (model, clip, flux_vae))
    with pytest.raises(ValueError, match="this VAE decodes 16-channel latents"):
        fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog", words="cat, dog", seed=0,
                  steps=2, cfg=3.0, resolution=4, width=SIZE, height=SIZE, vae=flux_vae)
    assert not fresh.progress  # nothing sampled
    assert _hooks(model.model.diffusion_model) == 0


def test_a_clip_for_another_model_is_refused_by_name(fresh, tiny_models):
    """SDXL's CLIP beside an SD1.5 MODEL and the other way round, typed prompts or CONDITIONING: refused with both
    widths named (was a matmul shape error in the first attention layer)."""
    sd15, sdxl = tiny_models.tiny_checkpoint("sd15"), tiny_models.tiny_checkpoint("sdxl")
    for (model, _, vae), (_, clip, _) in ((sd15, sdxl), (sdxl, sd15)):
        with pytest.raises(ValueError, match=r"the text encoding is \d+ wide, but this MODEL \(SD\w+\) reads "
                                             r"\d+-wide text: encode the prompts with the CLIP of the MODEL's"):
            _train_fix(fresh, (model, clip, vae))
        with torch.inference_mode():
            pos, neg = (fresh.node("CLIPTextEncode")().encode(clip, t)[0] for t in ("a cat", ""))
        with pytest.raises(ValueError, match="the text encoding is"):
            _train_fix(fresh, (model, None, vae), positive=pos, negative=neg)
        with pytest.raises(ValueError, match="the text encoding is"):
            fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog", words="cat, dog",
                      seed=0, steps=2, cfg=3.0, resolution=4, width=SIZE, height=SIZE)
        assert _hooks(model.model.diffusion_model) == 0
    assert not fresh.progress


def test_validate_inputs_k_larger_than_steps(comfy):
    cls = comfy.node("FocusFixTrainFocusNFix")
    assert "K (now 5) must be between 1 and steps (now 3)" in cls.VALIDATE_INPUTS(steps=3, K=5)
    assert cls.VALIDATE_INPUTS(steps=3, K=3) is True


def test_queue_time_checks_name_the_input(comfy):
    """What VALIDATE_INPUTS catches before anything loads: out-of-range widgets it names (ComfyUI skips their
    min/max), a threshold its mode cannot use, a checkpoint name leaving the loras folder, and an attention map
    size the image does not have."""
    fix = comfy.node("FocusFixTrainFocusNFix")
    assert "steps (500) must be at most 200" in fix.VALIDATE_INPUTS(steps=500, K=1)
    assert "threshold must be a fraction in (0,1] for 'top_percent'" in fix.VALIDATE_INPUTS(
        steps=3, K=1, mask_source="saliency", threshold_mode="top_percent", threshold=0.0)
    assert fix.VALIDATE_INPUTS(steps=3, K=1, mask_source="none", threshold_mode="top_percent", threshold=0.0) is True
    assert fix.VALIDATE_INPUTS(steps=3, K=1, mask_source="saliency", threshold_mode="top_percent", threshold=0.0,
                               mask=None) is True  # a connected MASK replaces mask_source: its threshold is unused
    assert "checkpoint_name: filename '../x' must stay inside" in fix.VALIDATE_INPUTS(
        steps=3, K=1, checkpoint_every=5, checkpoint_name="../x")
    assert fix.VALIDATE_INPUTS(steps=3, K=1, checkpoint_every=0, checkpoint_name="../x") is True  # off: unused
    se = comfy.node("FocusFixTrainSeparateEnhance")
    assert "resolution 16: at this size (width 64, height 64 px)" in se.VALIDATE_INPUTS(
        prompts="a cat and a dog | cat, dog", resolution=16, width=64, height=64)
    assert se.VALIDATE_INPUTS(prompts="a cat and a dog | cat, dog", resolution=16, width=512, height=768) is True
    maps = comfy.node("FocusFixAttentionMaps")
    assert "resolution 3" in maps.VALIDATE_INPUTS(resolution=3, width=64, height=64)
    save = comfy.node("FocusFixSaveLoRA")  # not after the training that feeds it
    assert save.VALIDATE_INPUTS(filename="../../x").startswith("filename '../../x' must stay inside")
    assert save.VALIDATE_INPUTS(filename="fixes/hands") is True and save.VALIDATE_INPUTS(filename=None) is True


def test_checkpoints_keep_an_existing_file_and_a_bad_name_fails_before_training(fresh, checkpoint):
    """A checkpoint never replaces a file it did not write (the artist's LoRA, another run's checkpoint): the run
    takes a counter name and the report says which; a name that would leave the folder fails before any step."""
    theirs = fresh.loras / "ckpt" / "fix.safetensors"
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(b"the artist's own file")
    *_, report = _train_fix(fresh, checkpoint, iterations=2, checkpoint_every=1, checkpoint_name="ckpt/fix")
    assert theirs.read_bytes() == b"the artist's own file"
    assert (fresh.loras / "ckpt" / "fix_00001.safetensors").is_file()
    assert "checkpoint: ckpt/fix_00001.safetensors (every 1 iterations and after the last;" in report
    *_, report = _train_fix(fresh, checkpoint, iterations=1, checkpoint_every=3, checkpoint_name="ckpt/late")
    assert "checkpoint: ckpt/late.safetensors (after the last iteration;" in report
    fresh.progress.clear()
    with pytest.raises(ValueError, match="checkpoint_name: filename '../escape' must stay inside"):
        _train_fix(fresh, checkpoint, iterations=2, checkpoint_every=1, checkpoint_name="../escape")
    assert not fresh.progress, "no training step may run before the name is refused"


def test_a_checkpoint_that_cannot_be_written_does_not_stop_training(fresh, checkpoint, monkeypatch):
    """Standards audit 3: a checkpoint write that fails (disk full) stopped the run and lost it. Training now
    goes on, and the report says which write failed and what the checkpoint file holds."""
    runs = sys.modules[f"{fresh.pack.__name__}.nodes.runs"]
    real, calls = runs.write_lora, []

    def full_disk_on_second_write(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(runs, "write_lora", full_disk_on_second_write)
    lora, *_, report = _train_fix(fresh, checkpoint, iterations=3, checkpoint_every=1, checkpoint_name="ckpt/full")
    assert "step 3/3" in report and len(calls) == 3
    assert "checkpoint: ckpt/full.safetensors (every 1 iterations and after" in report  # the third worked again
    calls.clear()
    monkeypatch.setattr(runs, "write_lora", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    *_, report = _train_fix(fresh, checkpoint, iterations=2, checkpoint_every=1, checkpoint_name="ckpt/none")
    assert ("checkpoint: the checkpoint after step 2 was not written ([Errno 28] No space left); training went on "
            "(no checkpoint was written; the LoRA output holds every step trained)") in report


def test_a_file_where_a_checkpoint_or_lora_subfolder_must_be_is_refused_at_queue_time(fresh, checkpoint):
    """Standards audit 2: with a file `afile` in the loras folder, 'afile/ckpt' passed the queue-time check and the
    run failed after training saying every free name was taken."""
    (fresh.loras / "afile").write_bytes(b"x")
    fix = fresh.node("FocusFixTrainFocusNFix")
    assert "'afile' is a file in folder" in fix.VALIDATE_INPUTS(steps=3, K=1, checkpoint_every=1,
                                                                checkpoint_name="afile/ckpt")
    (lora, *_) = _train_fix(fresh, checkpoint, iterations=1)
    with pytest.raises(ValueError, match="'afile' is a file in folder"):
        fresh.run("FocusFixSaveLoRA", lora=lora, filename="afile/x", overwrite=False)


def test_separate_enhance_and_attention_maps_at_a_landscape_size(fresh, checkpoint, layout):
    """resolution is the maps' shorter side: at 96x64 px (latents 8x12) resolution 4 is the 4x6 level (before:
    "no cross-attention layer matched resolution (4, 4)" once the model had loaded)."""
    model, clip, _ = checkpoint
    lora, _, before, after, report = fresh.run(
        "FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
        lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=96, height=64, rank=2, targets="to_k",
        lr=1e-2, iterations=1, seed=0)
    assert lora.tensors and before.shape == after.shape
    maps, *_ = fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a cat and a dog", words="cat, dog",
                         seed=0, steps=2, cfg=3.0, resolution=4, width=96, height=64)
    assert maps.shape == (2, 64, 96)  # one MASK per word at the image size (before: no 4x4 layer, an error)
    assert _hooks(model.model.diffusion_model) == 0


def test_report_notes_split_conditioning_repeated_seeds_and_the_mask_rule(fresh, checkpoint):
    model, clip, _ = checkpoint
    with torch.inference_mode():
        enc = fresh.node("CLIPTextEncode")()
        pos = fresh.node("ConditioningCombine")().combine(enc.encode(clip, "a cat")[0], enc.encode(clip, "a dog")[0])[0]
        neg = enc.encode(clip, "blurry")[0]
    lora, _, before, *_, report = _train_fix(fresh, checkpoint, positive=pos, negative=neg, seeds="0-1, 1",
                                             mask=torch.ones(3, SIZE, SIZE), iterations=1)
    assert before.shape[0] == 6
    assert "positive has 2 entries: each is trained as its own prompt" in report
    assert "seeds repeat [1]" in report and "3 masks: one per seed, for every prompt" in report
    import json
    config = json.loads(lora.metadata["focusfix_config"])
    assert config["negative_prompt"] == "negative[0]"  # not the unused widget's text


def test_train_nodes_batch_size(fresh, checkpoint):
    """batch_size reaches both trainers: one Focus-N-Fix step on all 4 (prompt, seed) items gives another LoRA
    than one step on one item, and the saved settings say so; a batch larger than the items gets a report note.
    Separate-and-Enhance batches prompts, each with its own noise."""
    import json
    model, clip, _ = checkpoint
    loras = {b: _train_fix(fresh, checkpoint, iterations=1, batch_size=b)[0] for b in (1, 4)}
    assert json.loads(loras[4].metadata["focusfix_config"])["batch_size"] == 4
    assert any(not torch.equal(loras[1].tensors[k], loras[4].tensors[k]) for k in loras[1].tensors)
    report = _train_fix(fresh, checkpoint, iterations=1, seeds="0", prompts="a cat", batch_size=2)[-1]
    assert "batch_size 2 is more than the 1 (prompt, seed) items" in report
    lora = fresh.run("FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
                     lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2,
                     targets="to_k", lr=1e-2, iterations=1, seed=0, batch_size=2)[0]
    assert json.loads(lora.metadata["focusfix_config"])["batch_size"] == 2


def test_train_focus_n_fix_reward_target(fresh, checkpoint):
    """reward_target: with one every image is already above there is nothing to push, and the region term holds
    I0 exactly (after == before; the region's gradient is exactly 0 while I == I0, since each I0 is sampled in the
    batch that first trains it); the widget's default is "no target"."""
    import json
    lora, _, before, after, _, report = _train_fix(fresh, checkpoint, reward_target=-1000.0)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert json.loads(lora.metadata["focusfix_config"])["reward_target"] == -1000.0
    assert "loss 1000.0000" in report and "region 0.0000" in report  # -min(r, -1000) + lam * 0
    assert "the LoRA did not change: every step's gradient was 0 (every image's reward was already at or above " \
           "reward_target (-1000" in report  # a wasted run says so (fuzz review)
    free = _train_fix(fresh, checkpoint)
    assert not torch.equal(free[2], free[3]) and "did not change" not in free[5]
    assert json.loads(free[0].metadata["focusfix_config"])["reward_target"] is None


def test_train_separate_enhance(fresh, checkpoint, layout):
    model, clip, _ = checkpoint
    lora, curve, before, after, report = fresh.run(
        "FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
        lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k",
        lr=1e-2, iterations=2, seed=0)
    assert lora.method == "separate-and-enhance"
    assert lora.tensors and all("attn2_to_k" in k for k in lora.tensors)
    assert before.shape == after.shape and not torch.equal(before, after)
    # a to_k LoRA: every attn2 of ComfyUI's UNet reads the text alone, so preservation runs on the keys
    assert lora.metadata["focusfix_preservation"] == "keys" and "preservation: keys" in report
    assert "trained 2 steps in 0:" in report
    # the numbers the maps show, before -> after, and what keeps KSampler from drawing them (review F2, F3)
    num = r"[0-9.e-]+"
    assert re.search(rf"maps of 'a cat and a dog': overlap {num} -> {num}; peaks cat {num} -> {num}, dog {num} -> "
                     rf"{num}", report), report
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


def test_separate_enhance_report_names_fp8_weights(fresh, tiny_models):
    """The S&E report left out the redraw caveats the Focus-N-Fix report gives: on fp8 weights the stock Load
    LoRA's maps were as far from attention_after as the whole fix (review F2)."""
    with torch.inference_mode():
        model, clip, _ = tiny_models.tiny_checkpoint("sd15", 0, weight_dtype=torch.float8_e4m3fn)
    *_, report = fresh.run(
        "FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
        lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k",
        lr=1e-2, iterations=1, seed=0)
    assert "the MODEL's weights are stored in fp8" in report


def test_separate_enhance_preservation_on_outputs_for_attn_targets(fresh, checkpoint):
    model, clip, _ = checkpoint
    lora, *_, report = fresh.run(
        "FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
        lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2, targets="attn",
        lr=1e-2, iterations=1, seed=0)
    assert lora.metadata["focusfix_preservation"] == "outputs" and "preservation: outputs" in report
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


def test_separate_enhance_missing_word(fresh, checkpoint):
    model, clip, _ = checkpoint
    with pytest.raises(ValueError, match="'horse' not found"):
        fresh.run("FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, horse",
                  lam_sep=1.0, lam_en=1.0, lam_preserve=0.0, resolution=4, width=SIZE, height=SIZE, rank=2,
                  targets="to_k", lr=1e-2, iterations=1, seed=0)
    assert _hooks(model.model.diffusion_model) == 0


def test_cancel_mid_training_leaves_nothing(fresh, checkpoint):
    import comfy.model_management as mm
    model = checkpoint[0]
    fresh.interrupt_at = 1
    with pytest.raises(mm.InterruptProcessingException):
        _train_fix(fresh, checkpoint, iterations=5)
    assert not any(fresh.loras.rglob("*.safetensors"))
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)
    assert max(v for v, _, _ in fresh.progress) < 5


def test_cancel_during_separate_enhance_set_up_stops_within_one_unet_call(fresh, checkpoint):
    """Standards audit 4: the preservation set-up and the before maps run UNet passes with no progress bar, and a
    cancel pressed there let 17 more passes run (8 prompts). The adapter now checks cancel at every UNet call."""
    import comfy.model_management as mm
    model, clip, _ = checkpoint
    calls = []

    def press_cancel_at_first_call(module, args):
        calls.append(1)
        mm.interrupt_current_processing(True)

    handle = model.model.diffusion_model.register_forward_pre_hook(press_cancel_at_first_call)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fresh.run("FocusFixTrainSeparateEnhance", model=model, clip=clip,
                      prompts="\n".join(f"a {a} and a {b} | {a}, {b}" for a, b in
                                        (("cat", "dog"), ("cat", "bird"), ("dog", "bird"), ("cup", "cat"))),
                      lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2,
                      targets="to_k", lr=1e-2, iterations=2, seed=0, batch_size=1)
    finally:
        handle.remove()
    assert len(calls) == 1 and fresh.progress == []
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


def test_before_after_images_show_a_step_bar_and_cancel_within_it(fresh, checkpoint):
    """After training, the before/after images sample with a step bar: 3 steps x (4 items' I + the I0 of the 2
    items training never drew). Cancel there stops at the next step, returns nothing and leaves the MODEL clean."""
    import comfy.model_management as mm
    model = checkpoint[0]
    _train_fix(fresh, checkpoint)  # 4 items, batch 1, 2 iterations
    assert [(v, t) for v, t, _ in fresh.progress if t != 2] == [(v, 18) for v in range(1, 19)]
    fresh.progress.clear()
    fresh.interrupt_at, fresh.interrupt_total = 5, 18
    with pytest.raises(mm.InterruptProcessingException):
        _train_fix(fresh, checkpoint)
    assert max(v for v, t, _ in fresh.progress if t == 18) == 5
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


def test_cancel_stops_a_training_step_within_one_sampler_step(fresh, checkpoint):
    """Cancel pressed while a training step samples (here during I0's second UNet call) ends the run at the end
    of that sampler step, not after the whole training step."""
    import comfy.model_management as mm
    model, clip, vae = checkpoint
    calls = []

    def unet(apply_model, args):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])
    patched = model.clone()
    patched.set_model_unet_function_wrapper(unet)
    with pytest.raises(mm.InterruptProcessingException):
        _train_fix(fresh, (patched, clip, vae), steps=10, iterations=3)
    assert len(calls) == 2, len(calls)  # one UNet call per sampler step (CFG batched): it stopped right after
    assert not fresh.progress  # before the first training step ended
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


@pytest.mark.parametrize("node", ["FocusFixTrainFocusNFix", "FocusFixTrainSeparateEnhance"])
def test_out_of_memory_is_comfyuis_oom_with_what_to_lower(fresh, checkpoint, node):
    """A device OOM in a training step stays ComfyUI's OOM_EXCEPTION (the executor then unloads every model and
    adds its tips) and names the step and the inputs that lower the memory; the MODEL is left clean."""
    import comfy.model_management as mm
    model, clip, vae = checkpoint

    def unet(apply_model, args):
        if torch.is_grad_enabled():  # the first differentiated UNet call: inside training step 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
        return apply_model(args["input"], args["timestep"], **args["c"])
    patched = model.clone()
    patched.set_model_unet_function_wrapper(unet)
    with pytest.raises(mm.OOM_EXCEPTION) as info:
        if node == "FocusFixTrainFocusNFix":
            _train_fix(fresh, (patched, clip, vae), batch_size=2)
        else:
            fresh.run(node, model=patched, clip=clip, prompts="a cat and a dog | cat, dog", lam_sep=1.0, lam_en=1.0,
                      lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k", lr=1e-2,
                      iterations=2, seed=0)
    msg = str(info.value)
    advice = ("lower batch_size (now 2) or K (now 1), then width and height (now 64x64)"
              if node == "FocusFixTrainFocusNFix" else "lower batch_size (now 1), then width and height (now 64x64)")
    assert msg.startswith(f"out of device memory in training step 1 of 2: {advice}"), msg
    assert "Tried to allocate 20.00 MiB" in msg
    assert _hooks(model.model.diffusion_model) == 0 and _weights_untouched(model)


def test_load_reward_files_from_the_rewards_folder(fresh):
    """A tiny-world reward file in models/focusfix_rewards loads through the node; junk is refused clearly."""
    import shutil
    import folder_paths
    folder = Path(folder_paths.get_folder_paths("focusfix_rewards")[0])
    shutil.copy(REPO / "focusfix_core" / "tiny" / "weights" / "tiny_artifact.safetensors", folder / "artifact.safetensors")
    from safetensors.torch import save_file
    save_file({"foo": torch.zeros(2)}, str(folder / "junk.safetensors"))
    choices = fresh.node("FocusFixLoadReward").INPUT_TYPES()["required"]["reward_name"][0]
    assert {"artifact.safetensors", "junk.safetensors", "builtin:sharpness"} <= set(choices)
    (reward,) = fresh.run("FocusFixLoadReward", reward_name="artifact.safetensors")
    assert not any(p.is_inference() for p in reward.parameters()), "reward weights must be autograd-safe"
    scores, text, heat, overlay = fresh.run("FocusFixScoreImages", image=torch.rand(1, 16, 16, 3), reward=reward)
    assert len(scores) == 1
    with pytest.raises(ValueError, match="unknown reward file layout"):
        fresh.run("FocusFixLoadReward", reward_name="junk.safetensors")
    with pytest.raises(ValueError, match="unknown built-in reward"):
        fresh.run("FocusFixLoadReward", reward_name="builtin:nope")


def test_load_reward_reads_a_rewritten_file_again(fresh):
    """As Load LoRA: IS_CHANGED follows a reward file's bytes, so a file converted again under the same name is not
    served from ComfyUI's cache, and a touched one is; built-in rewards are their name."""
    import os
    import shutil
    import folder_paths
    node = fresh.node("FocusFixLoadReward")
    folder = Path(folder_paths.get_folder_paths("focusfix_rewards")[0])
    path = folder / "rewritten.safetensors"
    shutil.copy(REPO / "focusfix_core" / "tiny" / "weights" / "tiny_artifact.safetensors", path)
    before = node.IS_CHANGED(reward_name="rewritten.safetensors", precision="fp32", clip_vision=None)
    assert before and node.IS_CHANGED(reward_name="rewritten.safetensors") == before
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 7))  # touched: same bytes
    assert node.IS_CHANGED(reward_name="rewritten.safetensors") == before
    shutil.copy(REPO / "focusfix_core" / "tiny" / "weights" / "tiny_attribute.safetensors", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime even on a coarse clock
    assert node.IS_CHANGED(reward_name="rewritten.safetensors") != before
    assert node.IS_CHANGED(reward_name="builtin:sharpness") == "builtin:sharpness"
    assert node.IS_CHANGED(reward_name="missing.safetensors") == ""
    path.unlink()


def test_cancel_with_checkpoints_keeps_the_last_complete_lora(fresh, checkpoint):
    import comfy.model_management as mm
    from safetensors import safe_open
    fresh.interrupt_at = 3
    with pytest.raises(mm.InterruptProcessingException):
        _train_fix(fresh, checkpoint, iterations=6, checkpoint_every=2, checkpoint_name="ckpt/fix")
    files = list(fresh.loras.rglob("*.safetensors"))
    assert [p.relative_to(fresh.loras).as_posix() for p in files] == ["ckpt/fix.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["focusfix_steps_trained"] == "2"
    assert not [p for p in fresh.loras.rglob("*") if p.suffix == ".tmp"]


def test_a_cancel_while_the_before_after_images_are_drawn_keeps_all_of_training(fresh, checkpoint):
    """The run checkpoints after its last step too: 3 iterations with checkpoint_every 2 used to leave a 2-step
    checkpoint, and a cancel while the before/after images were drawn lost the third step (the LoRA output is
    never returned after a cancel). The checkpoint now holds all 3, the same LoRA a full run returns."""
    import comfy.model_management as mm
    from safetensors import safe_open
    lora, *_, report = _train_fix(fresh, checkpoint, iterations=3, checkpoint_every=2, checkpoint_name="ckpt/full",
                                  batch_size=1)
    assert "checkpoint: ckpt/full.safetensors (every 2 iterations and after the last;" in report
    (images_bar,) = {t for _, t, _ in fresh.progress if t != 3}  # the before/after images' step bar
    fresh.progress.clear()
    fresh.interrupt_at, fresh.interrupt_total = 2, images_bar
    with pytest.raises(mm.InterruptProcessingException):
        _train_fix(fresh, checkpoint, iterations=3, checkpoint_every=2, checkpoint_name="ckpt/cancelled",
                   batch_size=1)
    assert max(v for v, t, _ in fresh.progress if t == 3) == 3 and max(v for v, t, _ in fresh.progress
                                                                        if t == images_bar) == 2
    with safe_open(str(fresh.loras / "ckpt" / "cancelled.safetensors"), "pt") as f:
        assert f.metadata()["focusfix_steps_trained"] == "3"
        kept = {k: f.get_tensor(k) for k in f.keys()}
    assert kept.keys() == lora.tensors.keys()
    assert all(torch.equal(kept[k], lora.tensors[k].to(kept[k].dtype)) for k in kept)


def test_train_focus_n_fix_without_clip_needs_conditioning(fresh, checkpoint):
    model, clip, vae = checkpoint
    with torch.inference_mode():
        pos = fresh.node("CLIPTextEncode")().encode(clip, "a cat")[0]
        neg = fresh.node("CLIPTextEncode")().encode(clip, "")[0]
    lora, *_ = _train_fix(fresh, checkpoint, clip=None, positive=pos, negative=neg, iterations=1, seeds="0")
    assert lora.tensors
    with pytest.raises(ValueError, match="connect the checkpoint's CLIP"):
        _train_fix(fresh, checkpoint, clip=None, iterations=1, seeds="0")
    # positive alone: the negative_prompt widget still needs the text encoder, and the message says so
    with pytest.raises(ValueError, match="encode the negative_prompt, or connect both positive and negative"):
        _train_fix(fresh, checkpoint, clip=None, positive=pos, iterations=1, seeds="0")
    assert _hooks(model.model.diffusion_model) == 0


def test_training_is_reproducible_and_returns_plain_data(fresh, checkpoint):
    a = _train_fix(fresh, checkpoint, iterations=1, seeds="0", prompts="a cat")[0]
    b = _train_fix(fresh, checkpoint, iterations=1, seeds="0", prompts="a cat")[0]
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors), "same seed, same LoRA"
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.requires_grad for v in a.tensors.values())
    assert all(isinstance(v, str) for v in a.metadata.values())
    # and the same file, byte for byte (same sha256: the same Civitai hash, no re-run of a Load LoRA downstream)
    names = [fresh.run("FocusFixSaveLoRA", lora=lora, filename=f"repro/{k}", overwrite=False)[0]
             for k, lora in enumerate((a, b))]
    assert (fresh.loras / names[0]).read_bytes() == (fresh.loras / names[1]).read_bytes()


class _LittleFreeMemory:
    """comfy.model_management as ComfyUI's attention module sees it, with 1 MiB free: sub-quadratic
    attention then splits keys into chunks (its path for large images on a CPU or a small card)."""

    def __init__(self, mm):
        self._mm = mm

    def __getattr__(self, name):
        return getattr(self._mm, name)

    def get_free_memory(self, dev=None, torch_free_too=False):
        return (2**20, 2**20) if torch_free_too else 2**20


def test_training_through_chunked_sub_quadratic_attention(fresh, checkpoint, monkeypatch):
    """ComfyUI's CPU default attention breaks autograd once it chunks keys (exp(out=) on a tensor that
    needs grad): a training run sends every call through an attention with a backward."""
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(attention, "model_management", _LittleFreeMemory(attention.model_management))
    used, sub_quad = [], attention.attention_sub_quad

    @attention.wrap_attn
    def attention_sub_quad(*args, **kwargs):  # ComfyUI's own, recording every call that reaches it
        used.append(torch.is_grad_enabled())
        return sub_quad(*args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", attention_sub_quad)
    model, clip, _ = checkpoint
    lora, *_ = fresh.run(
        "FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
        lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2, targets="attn",
        lr=1e-2, iterations=1, seed=0)
    assert lora.tensors
    lora, *_ = _train_fix(fresh, checkpoint, iterations=1)
    assert lora.tensors and not used  # not even the graph-free calls: I0 and I come from one kernel


def test_untrained_lora_gives_the_base_image_exactly(fresh, checkpoint):
    """Step 0 of Focus-N-Fix: the LoRA is still zero, so I == I0 and the region term is exactly 0, although
    the base image comes from graph-free calls and I's last step from a call with gradients."""
    import sys
    pack = fresh.pack.__name__
    runs, adapters = sys.modules[f"{pack}.nodes.runs"], sys.modules[f"{pack}.nodes.adapters"]
    FixConfig = sys.modules[f"{pack}.focusfix_core.trainers"].FixConfig
    model, clip, vae = checkpoint
    dm = adapters.ComfyDiffusionModel(model.clone(), clip, vae)
    run = runs.run_focus_n_fix(dm, adapters.load_reward_by_name("builtin:sharpness"), lambda: FixConfig(
        prompts=("a cat",), seeds=(0,), height=SIZE, width=SIZE, steps=3, cfg_scale=3.0, K=1, lam=1.0,
        mask_source="heatmap", rank=2, targets="attn", lr=1e-2, iterations=1))
    assert run.history[0].region == 0.0


def test_sdxl_size_embeddings_are_built_once_per_cond(fresh, monkeypatch):
    """prepare_cond: SDXL's y (ComfyUI's encode_adm: CPU ops and a copy of the pooled output to the CPU) is built
    once per cond row, not in every denoiser call, with the same x0; a cond prepared for another latent size
    is never read at this one."""
    import sys
    pack = fresh.pack.__name__
    runs, adapters = sys.modules[f"{pack}.nodes.runs"], sys.modules[f"{pack}.nodes.adapters"]
    FixConfig = sys.modules[f"{pack}.focusfix_core.trainers"].FixConfig
    model, clip, vae = fresh.run("FocusFixTestTinyCheckpoint", layout="sdxl", seed=0)
    dm = adapters.ComfyDiffusionModel(model.clone(), clip, vae)
    calls = []
    real = dm.base.encode_adm
    monkeypatch.setattr(dm.base, "encode_adm", lambda **kw: calls.append(1) or real(**kw))
    g = torch.Generator().manual_seed(0)
    with adapters.training_session(dm), torch.no_grad():
        cond = dm.encode_prompts(["a cat", "a dog"])
        prepared = dm.prepare_cond(cond, (8, 8))
        assert len(calls) == 2 and all(v.device == dm.device for v in prepared.values())
        for side in (8, 4):  # the prepared size, and another one (built per call from "pooled", as before)
            x, sigma = torch.randn(2, 4, side, side, generator=g), torch.tensor([3.0, 3.0])
            assert torch.equal(dm.denoise(x, sigma, prepared), dm.denoise(x, sigma, cond))
        assert len(calls) == 2 + 2 * 2 + 2       # the unprepared calls and the 4x4 call built their own
    calls.clear()
    run = runs.run_focus_n_fix(dm, adapters.load_reward_by_name("builtin:sharpness"), lambda: FixConfig(
        prompts=("a cat", "a dog"), seeds=(0,), height=SIZE, width=SIZE, steps=3, cfg_scale=3.0, K=1, lam=1.0,
        mask_source="heatmap", rank=2, targets="attn", lr=1e-2, iterations=2, batch_size=2))
    assert len(run.history) == 2
    assert len(calls) == 3                        # two prompts and the negative, once each; before: every call


@compile_checked
def test_compiled_sampler_holds_inside_comfyui(fresh, checkpoint, monkeypatch):
    """FixConfig.compile through ComfyUI's UNet (GPU-free: dynamo with an eager backend that rounds 1e-3 off,
    as compiled kernels round differently): one graph for I0, every training trajectory and the final
    images, no break and no recompile; I == I0 exactly at step 0; the LoRA still trains."""
    import sys

    import torch._dynamo
    pack = fresh.pack.__name__
    runs, adapters = sys.modules[f"{pack}.nodes.runs"], sys.modules[f"{pack}.nodes.adapters"]
    trainers = sys.modules[f"{pack}.focusfix_core.trainers"]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return lambda *args: type(out := gm.forward(*args))(o * 1.001 if o.is_floating_point() else o for o in out)

    monkeypatch.setattr(trainers, "compile_denoiser", lambda denoiser, mode: torch.compile(
        lambda x, s, c: denoiser(x, s, c), backend=backend, dynamic=False))
    model, clip, vae = checkpoint

    def train(prompt, cfg_scale):
        dm = adapters.ComfyDiffusionModel(model.clone(), clip, vae)
        return runs.run_focus_n_fix(dm, adapters.load_reward_by_name("builtin:sharpness"), lambda: trainers.FixConfig(
            prompts=(prompt,), seeds=(0,), height=SIZE, width=SIZE, steps=3, cfg_scale=cfg_scale, K=1, lam=1.0,
            mask_source="heatmap", rank=2, targets="attn", lr=1e-2, iterations=3, compile="reduce-overhead"))

    torch._dynamo.reset()
    try:
        run = train("a cat", 3.0)
        assert len(graphs) == 1, graphs
        train("a dog", 5.0)  # queued again with other settings, on a fresh clone: no recompile
        assert len(graphs) == 1, graphs
    finally:
        torch._dynamo.reset()
    assert run.history[0].region == 0.0
    assert run.history[-1].region > 0 and all(torch.isfinite(torch.tensor(r.loss)) for r in run.history)
    assert (run.I - run.I0).abs().max() > 0


def test_training_unloads_idle_models_and_keeps_its_own(fresh, checkpoint):
    """Once the prompts are encoded, the text encoder (and any other idle model) leaves the device for the run;
    the MODEL and VAE stay, and a later text encode loads the text encoder again."""
    import comfy.model_management as mm
    model, clip, vae = checkpoint

    def loaded(patcher):
        return any(lm.model is patcher for lm in mm.current_loaded_models)

    fresh.run("CLIPTextEncode", clip=clip, text="a cat")
    assert loaded(clip.patcher)
    lora, *_ = _train_fix(fresh, checkpoint, iterations=1)
    assert lora.tensors and not loaded(clip.patcher)
    assert loaded(vae.patcher)
    (cond,) = fresh.run("CLIPTextEncode", clip=clip, text="a dog")
    assert loaded(clip.patcher) and torch.isfinite(cond[0][0]).all()


# -- Separate-and-Enhance and Attention Maps review; cat_cond (core review, 2) ------------------------------------
def _adapters(comfy):
    import sys
    return sys.modules[f"{comfy.pack.__name__}.nodes.adapters"]


LONG = ", ".join(["a very detailed oil painting of a quiet harbour at dawn"] * 8)  # over 75 tokens: 154


@pytest.mark.parametrize("prompt, negatives", [
    ("a cat and a dog", ("blurry", LONG)),                              # 77 beside 154: the prompt's row repeated
    (LONG + ", a cat and a dog", (LONG, LONG + ", " + LONG)),           # 154 beside 231: lcm 462
], ids=["long negative", "longer negative"])
def test_attention_maps_beside_a_longer_negative_prompt(fresh, checkpoint, prompt, negatives):
    """A negative prompt longer than the prompt: CFG repeats the prompt's context (as ComfyUI's concat), and its
    maps sum each token's copies, so at the first step (steps=1: the same x) they equal the maps beside a negative
    prompt of the prompt's own length (the prompt padded with its last token gave other maps)."""
    import comfy.model_management as mm
    model, clip, _ = checkpoint
    ad = _adapters(fresh)
    dm = ad.ComfyDiffusionModel(model, clip)
    lengths = [dm.encode_prompts([p])["context"].shape[1] for p in (prompt, *negatives)]
    assert lengths[0] == lengths[1] < lengths[2], lengths
    mm.load_models_gpu([model])
    maps = [ad.prompt_attention_maps(dm, prompt, ["cat", "dog"], seed=0, steps=1, cfg_scale=3.0, width=SIZE,
                                     height=SIZE, resolution=4, negative=n)[0] for n in negatives]
    torch.testing.assert_close(maps[1], maps[0], rtol=1e-4, atol=1e-6)


def test_separate_enhance_batches_prompts_of_different_lengths_as_each_alone(fresh, checkpoint):
    """Training prompts of 77 and 154 tokens in one batch: each prompt's maps are those it has alone."""
    import sys
    from dataclasses import replace
    model, clip, _ = checkpoint
    ad = _adapters(fresh)
    tr = sys.modules[f"{fresh.pack.__name__}.focusfix_core.trainers"]
    dm = ad.ComfyDiffusionModel(model.clone(), clip)
    cfg = tr.SeparateEnhanceConfig(prompts=("a cat and a dog", LONG + ", a dog and a cat"),
                                   objects=(("cat", "dog"), ("dog", "cat")), resolution=4, height=SIZE, width=SIZE,
                                   rank=2, lam_preserve=0.0)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0)) * 5
    sigma = dm.sigmas[[600, 600]]
    maps = []
    with ad.training_session(dm), torch.no_grad():
        for rows, c in (([0, 1], cfg), ([0], replace(cfg, prompts=cfg.prompts[:1], objects=cfg.objects[:1])),
                        ([1], replace(cfg, prompts=cfg.prompts[1:], objects=cfg.objects[1:]))):
            trainer = tr.SeparateEnhanceTrainer(dm, c)  # the last two: each prompt trained alone
            try:
                maps.append(trainer.attention_maps(list(range(len(rows))), x[rows].to(dm.device),
                                                   sigma[rows].to(dm.device), keep_grad=False).cpu())
            finally:
                trainer.lora.remove()
    torch.testing.assert_close(maps[0], torch.cat(maps[1:]), rtol=1e-4, atol=1e-6)
    assert [len(dm.encode_prompts([p])["context"][0]) for p in cfg.prompts] == [77, 154]


def test_a_map_size_the_model_lacks_is_refused_before_sampling(fresh):
    """S&E review 3: the tiny SDXL UNet has cross-attention only at its second level (4x4 at 64 px): resolution 8
    passes the queue-time check (layout unknown there), then is refused with the sizes it has, before a step."""
    model, clip, _ = fresh.run("FocusFixTestTinyCheckpoint", layout="sdxl", seed=0)
    assert fresh.node("FocusFixAttentionMaps").VALIDATE_INPUTS(resolution=8, width=SIZE, height=SIZE) is True
    fresh.assert_map_size_refused(model, clip, 8, SIZE, r"resolution 8: at this size \(width 64, height 64 px\) "
                                                        r"this model has cross-attention only in maps of 4x4: set "
                                                        r"resolution to 4")
    assert _hooks(model.model.diffusion_model) == 0


def test_object_words_after_an_embedding_the_encoder_leaves_out_are_found_where_it_puts_them(fresh, tmp_path,
                                                                                             tiny_models):
    """An embedding of another width (an SD2/SDXL one on SD1.5) is left out by ComfyUI's encoder, which moves the
    later tokens up: 'cat' was trained on dog's token and 'dog' on padding (review F1). One of the encoder's width
    counts its vectors."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from safetensors.torch import save_file
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(3, 48)}, str(folder / "other.safetensors"))          # another width
    save_file({"emb_params": torch.randn(2, tiny_models.WIDTH)}, str(folder / "mine.safetensors"))
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=str(folder),
                         model_options={"clip_l_model_config": dict(tiny_models._CLIP_CFG)})
    tiny_models.randomize(clip.cond_stage_model, 1)
    model, _, _ = fresh.run("FocusFixTestTinyCheckpoint", layout="sd15", seed=0)
    dm = _adapters(fresh).ComfyDiffusionModel(model, clip)
    with torch.inference_mode():
        plain = dm.encode_prompts(["a cat and a dog"])["context"][0]
        other = dm.encode_prompts(["embedding:other a cat and a dog"])["context"][0]
    torch.testing.assert_close(other, plain)  # the encoder left it out: 'cat' is at 2 again
    assert dm.token_indices("embedding:other a cat and a dog", ["cat", "dog"]) == [[2], [5]]
    assert dm.token_indices("embedding:mine a cat and a dog", ["cat", "dog"]) == [[4], [7]]  # 2 vectors in


def test_object_words_with_accents_and_other_scripts(fresh, checkpoint):
    """S&E review 4: words are matched on the decoded text (CLIP's byte-level pieces as UTF-8), also a character
    split over several tokens; a missing word's error shows the tokens as written, not as 'cafÃ©</w>'."""
    model, clip, _ = checkpoint
    dm = _adapters(fresh).ComfyDiffusionModel(model, clip)
    assert dm.token_indices("a café and a dog", ["café", "dog"]) == [[2], [5]]
    assert dm.token_indices("a Pokémon and a cat", ["pokémon", "Cat"]) == [[2], [5]]
    assert dm.token_indices("a 猫 and a dog", ["猫", "dog"]) == [[2, 3, 4], [7]]
    brulee, cat = dm.token_indices("a crème brûlée and a cat", ["crème brûlée", "cat"])
    assert brulee == list(range(2, 2 + len(brulee))) and cat == [brulee[-1] + 3]
    with pytest.raises(ValueError, match=r"'cafe' not found in the prompt's tokens \['<\|startoftext\|>', 'a', "
                                         r"'café'"):
        dm.token_indices("a café and a dog", ["cafe", "dog"])
    maps, *_ = fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a café and a crème brûlée",
                         words="café; crème brûlée", seed=0, steps=1, cfg=3.0, resolution=4, width=SIZE,
                         height=SIZE)
    assert maps.shape == (2, SIZE, SIZE)  # ';' separates words as in the Train node's lines


def test_the_same_word_twice_is_refused_with_distinct_words_suggested(fresh, checkpoint):
    """S&E review 5: 'cat, cat' gave two identical maps (and trained Separate between a map and itself)."""
    model, clip, _ = checkpoint
    with pytest.raises(ValueError, match="words 'cat' and 'cat' both land on the prompt's token.*black cat, white cat"):
        fresh.run("FocusFixAttentionMaps", model=model, clip=clip, prompt="a black cat and a white cat",
                  words="cat, cat", seed=0, steps=1, cfg=3.0, resolution=4, width=SIZE, height=SIZE)
    node = fresh.node("FocusFixTrainSeparateEnhance")
    assert "names the object 'cat' twice" in node.VALIDATE_INPUTS(prompts="a black cat and a white cat | cat, cat")
    kw = dict(model=model, clip=clip, lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE,
              height=SIZE, rank=2, targets="to_k", lr=1e-2, iterations=1, seed=0)
    with pytest.raises(ValueError, match="'black cat' and 'cat' both land"):
        fresh.run("FocusFixTrainSeparateEnhance", prompts="a black cat and a dog | black cat, cat", **kw)
    assert _hooks(model.model.diffusion_model) == 0


def test_separate_enhance_report_and_maps_grid_for_mixed_object_counts(fresh, checkpoint):
    """S&E review 1 and 6: the preservation prompts name one object each and are listed in the report; in the
    maps grid a prompt with fewer objects gets a blank tile, not a copy of its last map."""
    model, clip, _ = checkpoint
    lora, _, before, after, report = fresh.run(
        "FocusFixTrainSeparateEnhance", model=model, clip=clip,
        prompts="a cat next to a dog | cat, dog\na bird, a cat and a dog | bird, cat, dog", lam_sep=1.0, lam_en=1.0,
        lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k", lr=1e-2, iterations=1,
        seed=0)
    tile = 128  # square maps: 128 x 128 tiles, 2 px apart
    for grid in (before, after):
        row0 = grid[0, 2:2 + tile]                                         # (tile, W, 3)
        third = row0[:, 2 + 2 * (tile + 2):2 + 2 * (tile + 2) + tile]
        second = row0[:, 2 + (tile + 2):2 + (tile + 2) + tile]
        assert torch.all(third == 0.5) and not torch.all(second == 0.5)
    assert "preservation: keys, on 'a cat', 'a dog', 'a bird'" in report


def test_training_on_a_comfyui_older_than_0_3_60_is_refused_by_name(fresh, checkpoint, monkeypatch):
    """ComfyUI before 0.3.60 ignores the attention kernel training chooses: sage or flash attention then pass no
    gradient to the LoRA's q/k/v (a silently partial fix). Both Train nodes say which version they need."""
    import comfy.ldm.modules.attention as attention
    monkeypatch.delattr(attention, "wrap_attn")  # what ComfyUI 0.3.59 and older lack
    with pytest.raises(RuntimeError, match=r"FocusFix training needs ComfyUI 0\.3\.60 or newer \(this is 0\.3\."):
        _train_fix(fresh, checkpoint)
    model, clip = checkpoint[0], checkpoint[1]
    with pytest.raises(RuntimeError, match="needs ComfyUI 0.3.60"):
        fresh.run("FocusFixTrainSeparateEnhance", model=model, clip=clip, prompts="a cat and a dog | cat, dog",
                  lam_sep=1.0, lam_en=1.0, lam_preserve=1.0, resolution=4, width=SIZE, height=SIZE, rank=2,
                  targets="to_k", lr=1e-3, iterations=1, seed=0)


def test_idle_models_are_released_on_a_comfyui_without_model_patches(comfy, checkpoint):
    """`ModelPatcher.model_patches_models` came with ComfyUI 0.3.52: before it, both Train nodes failed at once
    with an AttributeError. A MODEL and VAE whose patchers lack it (as every one did then) are kept loaded."""
    import comfy.model_management as mm

    class OldPatcher:  # ComfyUI's patcher as 0.3.51 and older have it: no model_patches_models
        def __init__(self, patcher):
            self.__dict__["_patcher"] = patcher

        def __getattr__(self, name):
            if name == "model_patches_models":
                raise AttributeError(name)
            return getattr(self._patcher, name)

    adapters = comfy.pack.nodes.adapters
    model, clip, vae = checkpoint
    dm = adapters.ComfyDiffusionModel(model.clone(), clip, vae)
    mm.load_models_gpu([dm.patcher, vae.patcher])
    ours = {id(dm.patcher.model), id(vae.patcher.model)}
    vae_patcher = vae.patcher
    dm.patcher, dm.vae.patcher = OldPatcher(dm.patcher), OldPatcher(vae_patcher)
    try:
        assert not hasattr(dm.patcher, "model_patches_models")
        adapters.release_idle_models(dm)  # no AttributeError, and our MODEL and VAE stay loaded
        assert ours <= {id(lm.model.model) for lm in mm.current_loaded_models}
    finally:  # dm.vae is the shared fixture's VAE: later tests must get its real patcher back
        vae.patcher = vae_patcher


def test_saliency_mask_node_shows_the_mask_the_train_node_trains_with(fresh, checkpoint):
    """smoothgrad's noise is the same for every image in both nodes: the Train node's `before` images through
    Saliency Mask with the same settings give its `mask` (the Train node seeded it by seed and image seed, so
    about a tenth of the pixels differed)."""
    model, clip, vae = checkpoint
    (reward,) = fresh.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    settings = dict(threshold_mode="top_percent", threshold=0.15, dilation=1, blur_sigma=2.0, feather=0.0)
    out = fresh.run("FocusFixTrainFocusNFix", model=model, clip=clip, vae=vae, reward=reward, prompts="a cat",
                    negative_prompt="", seeds="1, 2", width=SIZE, height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0,
                    mask_source="saliency", saliency_method="smoothgrad", rank=2, targets="attn", lr=1e-3,
                    iterations=1, seed=7, **{k: settings[k] for k in ("threshold_mode", "threshold", "dilation")})
    before, train_mask = out[2], out[4]
    mask, _ = fresh.run("FocusFixSaliencyMask", image=before, reward=reward, mask_source="saliency",
                        saliency_method="smoothgrad", **settings)
    assert torch.equal(mask, train_mask)
