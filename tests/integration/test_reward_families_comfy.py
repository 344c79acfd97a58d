"""Issue #5 inside a real ComfyUI: aesthetic and safety reward files -> Load Reward -> Score Images -> Saliency
Mask -> Train Focus-N-Fix (mask_source saliency), and workflow 5 run headless through the executor.

Files carry exactly the real key names at reduced width (random weights), built here:
  * aesthetic head: LAION improved-aesthetic-predictor `sac+logos+ava1-l14-linearMSE.pth`, an nn.Sequential
    `layers` -> `layers.{0,2,4,6,7}.{weight,bias}` (real widths 768 -> 1024 -> 128 -> 64 -> 16 -> 1);
  * CLIP vision tower: HF `CLIPVisionModelWithProjection` / ComfyUI clip_vision layout (`vision_model.*`,
    `visual_projection.weight`), loaded by ComfyUI's own `comfy.clip_vision.ClipVisionModel` from a tiny
    json config (ComfyUI's auto-detection only knows full-size towers), so the CLIP_VISION input is the
    object users' Load CLIP Vision gives;
  * safety checker: `CompVis/stable-diffusion-safety-checker` as diffusers saves it (`vision_model.vision_model.*`,
    `visual_projection.weight`, `concept_embeds` [17,D], `special_care_embeds` [3,D], `*_embeds_weights`).
The tower is 64 wide (1 head of 64, as inferred for that width), 2 layers, 32 px, 16-d embeddings.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import reward_files
import torch

from focusfix_core.rewards.clip_vision import CLIPVisionConfig

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_5 = REPO / "workflows" / "api" / "focusfix_5_fix_with_aesthetic_safety.json"
SIZE = 64
WIDTH, LAYERS, PATCH, IMAGE, PROJ, MLP = 64, 2, 8, 32, 16, 128
HEAD = (PROJ, 32, 8, 8, 4)  # the released head is (768, 1024, 128, 64, 16)
TEST_CLIP_VISION = "FocusFixTestTinyCLIPVision"
JUNK = "not_a_reward.safetensors"
LAION_HEAD = "laion_head_full_width.safetensors"  # the released widths, for the checks that need them


def comfy_config(proj: int = PROJ) -> dict:
    """ComfyUI clip_vision json config of the tiny tower (same keys as comfy/clip_vision_config_vitl.json)."""
    return {"hidden_act": "quick_gelu", "hidden_size": WIDTH, "image_size": IMAGE, "intermediate_size": MLP,
            "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 1,
            "num_channels": 3, "num_hidden_layers": LAYERS, "patch_size": PATCH, "projection_dim": proj}


def _tower(proj: int = PROJ) -> CLIPVisionConfig:
    return CLIPVisionConfig(width=WIDTH, layers=LAYERS, heads=1, patch=PATCH, image_size=IMAGE, proj_dim=proj,
                            mlp_width=MLP)


def tower_sd(proj: int = PROJ, seed: int = 0) -> dict:
    return reward_files.tower_sd(_tower(proj), seed)


def head_sd(seed: int = 1) -> dict:
    return reward_files.head_sd(seed, HEAD)


def safety_sd(seed: int = 2) -> dict:
    return reward_files.safety_sd(seed, _tower(), concepts=(17, 3))


class FocusFixTestTinyCLIPVision:
    """TEST ONLY: Load CLIP Vision for a tiny tower. Same steps as CLIPVisionLoader (ComfyUI's ClipVisionModel +
    load_sd), with the tiny json config instead of auto-detection. `config` is set by the fixture."""

    CATEGORY = "FocusFix/testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP_VISION",)
    config: Path

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    def load(self, clip_name):
        import comfy.clip_vision
        import comfy.utils
        import folder_paths
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("clip_vision", clip_name))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(self.config))
        missing, unexpected = clip_vision.load_sd(sd)
        assert not missing and not unexpected, (missing, unexpected)
        return (clip_vision,)


@pytest.fixture(scope="module")
def files(comfy, bw, tmp_path_factory):
    """The workflow's file names in temp model folders, holding tiny files; the test CLIP vision loader node."""
    import folder_paths
    from safetensors.torch import save_file
    rewards = Path(folder_paths.get_folder_paths("focusfix_rewards")[0])
    save_file(head_sd(), str(rewards / bw.AESTHETIC_FILE))
    save_file(safety_sd(), str(rewards / bw.SAFETY_FILE))
    save_file({"encoder.blocks.0.weight": torch.zeros(4, 4)}, str(rewards / JUNK))  # no layout FocusFix knows
    clip_dir = tmp_path_factory.mktemp("clip_vision")
    save_file(tower_sd(), str(clip_dir / bw.CLIP_VISION_FILE))
    save_file(tower_sd(proj=8, seed=3), str(clip_dir / "clip_vision_8d.safetensors"))
    (clip_dir / "config.json").write_text(json.dumps(comfy_config()))
    (clip_dir / "config_8d.json").write_text(json.dumps(comfy_config(proj=8)))
    old = folder_paths.folder_names_and_paths["clip_vision"]
    folder_paths.folder_names_and_paths["clip_vision"] = ([str(clip_dir)], old[1])
    FocusFixTestTinyCLIPVision.config = clip_dir / "config.json"
    comfy.nodes.NODE_CLASS_MAPPINGS[TEST_CLIP_VISION] = FocusFixTestTinyCLIPVision
    yield clip_dir
    del comfy.nodes.NODE_CLASS_MAPPINGS[TEST_CLIP_VISION]
    folder_paths.folder_names_and_paths["clip_vision"] = old


@pytest.fixture(scope="module")
def clip_vision(comfy, bw, files):
    (cv,) = comfy.run(TEST_CLIP_VISION, clip_name=bw.CLIP_VISION_FILE)
    return cv


@pytest.fixture(scope="module")
def rewards(comfy, bw, clip_vision):
    """{family: REWARD} as the nodes build them: aesthetic (+ CLIP_VISION), safety, and their weighted sum."""
    (aesthetic,) = comfy.run("FocusFixLoadReward", reward_name=bw.AESTHETIC_FILE, clip_vision=clip_vision)
    (safety,) = comfy.run("FocusFixLoadReward", reward_name=bw.SAFETY_FILE)
    (both,) = comfy.run("FocusFixCombineRewards", reward_a=aesthetic, weight_a=1.0, reward_b=safety, weight_b=10.0)
    return {"aesthetic": aesthetic, "safety": safety, "combined": both}


@pytest.fixture(scope="module")
def sd15(comfy):
    return comfy.run("FocusFixTestTinyCheckpoint", layout="sd15", seed=0)


def _images(b=2, seed=0):
    return torch.rand(b, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ loading


def test_files_load_as_their_families(rewards):
    # class names: the pack's focusfix_core (imported by ComfyUI under the pack's module name) is its own copy
    kinds = {family: type(r).__name__ for family, r in rewards.items()}
    assert kinds == {"aesthetic": "AestheticReward", "safety": "SafetyReward", "combined": "WeightedSum"}
    assert rewards["combined"].weights == [1.0, 10.0]
    assert rewards["combined"].name == "1*aesthetic + 10*safety"
    for r in rewards.values():
        assert not r.has_heatmap
        assert not any(p.is_inference() or p.requires_grad for p in r.parameters()), "frozen, autograd-safe weights"


def test_aesthetic_tower_is_comfyuis_clip_vision(rewards, clip_vision):
    """The CLIP_VISION input is used as is: our tower's embeddings equal ComfyUI's encode_image (an image at
    the tower's size, 8-bit, so ComfyUI's preprocessing is exact; its CPU weights are fp16, ours their fp32 copy)."""
    image = torch.randint(0, 256, (2, IMAGE, IMAGE, 3), generator=torch.Generator().manual_seed(1)).float() / 255
    with torch.inference_mode():
        theirs = clip_vision.encode_image(image)["image_embeds"].float()
    with torch.no_grad():
        ours = rewards["aesthetic"].tower.image_embeds(image.movedim(-1, 1))
    assert clip_vision.dtype == torch.float16 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, theirs.roll(1, 0), atol=1e-2), "the two images must embed differently"


def test_combine_rewards_is_the_weighted_sum(comfy, rewards):
    I = _images().movedim(-1, 1)
    with torch.no_grad():
        want = rewards["aesthetic"](I) + 10.0 * rewards["safety"](I)
        torch.testing.assert_close(rewards["combined"](I), want)


# ------------------------------------------------------------------------------------------------ nodes


@pytest.mark.parametrize("family", ["aesthetic", "safety", "combined"])
def test_score_images_and_saliency_mask(comfy, rewards, family):
    reward, img = rewards[family], _images()
    scores, text, heat, overlay = comfy.run("FocusFixScoreImages", image=img, reward=reward)
    assert len(scores) == 2 and all(isinstance(s, float) and s == s for s in scores) and scores[0] != scores[1]
    assert reward.name in text and "image 0" in text and "image 1" in text
    # no heatmap: the overlay shows gradient saliency, normalised per image
    assert heat.shape == (2, SIZE, SIZE) and overlay.shape == (2, SIZE, SIZE, 3)
    assert all(float(h.max()) == pytest.approx(1.0) and float(h.min()) == 0.0 for h in heat)
    assert not torch.equal(overlay, img), "the saliency overlay must show something"
    mask, mask_overlay = comfy.run("FocusFixSaliencyMask", image=img, reward=reward, mask_source="saliency",
                                   saliency_method="grad", blur_sigma=1.0, threshold_mode="top_percent",
                                   threshold=0.15, dilation=1, feather=0.0)
    assert mask.shape == (2, SIZE, SIZE) and mask_overlay.shape == (2, SIZE, SIZE, 3)
    for m in mask:
        assert 0.05 < float(m.mean()) < 0.9, "a non-empty mask that holds part of the image"
    # auto picks saliency for rewards without a heatmap
    auto, _ = comfy.run("FocusFixSaliencyMask", image=img, reward=reward, mask_source="auto", saliency_method="grad",
                        blur_sigma=1.0, threshold_mode="top_percent", threshold=0.15, dilation=1, feather=0.0)
    assert torch.equal(auto, mask)


@pytest.mark.parametrize("family", ["aesthetic", "safety", "combined"])
def test_train_focus_n_fix_with_saliency_mask(fresh, rewards, sd15, family):
    model, clip, vae = sd15
    lora, curve, before, after, mask, report = fresh.run(
        "FocusFixTrainFocusNFix", model=model, clip=clip, vae=vae, reward=rewards[family], prompts="a portrait",
        negative_prompt="", seeds="0, 1", width=SIZE, height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0,
        mask_source="saliency", rank=2, targets="attn", lr=1e-2, iterations=2, seed=0, threshold_mode="top_percent",
        threshold=0.15, dilation=2)
    assert lora.method == "focus-n-fix" and lora.tensors and "step 2/2" in report
    assert before.shape == after.shape == (2, SIZE, SIZE, 3) and not torch.equal(before, after)
    assert mask.shape == (2, SIZE, SIZE) and all(0.05 < float(m.mean()) < 0.9 for m in mask)
    assert rewards[family].name in json.dumps(lora.metadata), "the LoRA records which reward it was fixed for"
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters()) and not model.patches


def test_precision_bf16_halves_the_towers_and_trains(fresh, bw, clip_vision, rewards, sd15):
    """Load Reward's precision bf16: the CLIP towers (the aesthetic one from ComfyUI's fp16 CLIP_VISION, and the
    safety checker's own) load in bf16, heads and concepts stay fp32, scores stay close to fp32's, and a
    Focus-N-Fix run on their sum trains (finite losses, an image that changed)."""
    dtype, precision = torch.bfloat16, "bf16"
    (aesthetic,) = fresh.run("FocusFixLoadReward", reward_name=bw.AESTHETIC_FILE, precision=precision,
                             clip_vision=clip_vision)
    (safety,) = fresh.run("FocusFixLoadReward", reward_name=bw.SAFETY_FILE, precision=precision)
    img = _images()
    for half, full in ((aesthetic, rewards["aesthetic"]), (safety, rewards["safety"])):
        assert {p.dtype for p in half.tower.parameters()} == {dtype}
        assert {p.dtype for n, p in [*half.named_parameters(), *half.named_buffers()]
                if not n.startswith("tower.")} == {torch.float32}
        assert not any(p.is_inference() or p.requires_grad for p in half.parameters())
        (s_half, _, _, _), (s_full, _, _, _) = (fresh.run("FocusFixScoreImages", image=img, reward=r)
                                                for r in (half, full))
        scale = max(abs(v) for v in s_full) + 1e-3
        assert max(abs(a - b) for a, b in zip(s_half, s_full)) < 0.05 * scale, (s_half, s_full)
    (both,) = fresh.run("FocusFixCombineRewards", reward_a=aesthetic, weight_a=1.0, reward_b=safety, weight_b=10.0)
    model, clip, vae = sd15
    lora, curve, before, after, mask, report = fresh.run(
        "FocusFixTrainFocusNFix", model=model, clip=clip, vae=vae, reward=both, prompts="a portrait",
        negative_prompt="", seeds="0", width=SIZE, height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0,
        mask_source="saliency", rank=2, targets="attn", lr=1e-2, iterations=2, seed=0)
    assert "step 2/2" in report and "nan" not in report.lower(), report
    assert not torch.equal(before, after) and torch.isfinite(after).all()


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_layout_and_missing_tower_are_clear_errors(comfy, bw, files, clip_vision):
    with pytest.raises(ValueError, match=f"{JUNK}.*unknown reward file layout; known formats: aesthetic.*safety.*"
                                         "First keys: \\['encoder.blocks.0.weight"):
        comfy.run("FocusFixLoadReward", reward_name=JUNK)
    with pytest.raises(ValueError, match="aesthetic head needs a CLIP ViT-L/14 image tower and this file holds none: "
                                         "connect OpenAI CLIP ViT-L/14 at 224 px \\(in ComfyUI: Load CLIP Vision "
                                         "with clip-vit-large-patch14.safetensors.*\\) to the clip_vision input"):
        comfy.run("FocusFixLoadReward", reward_name=bw.AESTHETIC_FILE)
    FocusFixTestTinyCLIPVision.config = files / "config_8d.json"
    try:
        (wrong,) = comfy.run(TEST_CLIP_VISION, clip_name="clip_vision_8d.safetensors")
    finally:
        FocusFixTestTinyCLIPVision.config = files / "config.json"
    with pytest.raises(ValueError, match="takes 16-d embeddings but the clip_vision input gives 8-d"):
        comfy.run("FocusFixLoadReward", reward_name=bw.AESTHETIC_FILE, clip_vision=wrong)


# ------------------------------------------------------------------------------------------------ workflow 5


def _workflow(wt, layout="sd15", tiny_clip_vision=True):
    api = wt.swap_loader(json.loads(WORKFLOW_5.read_text()), layout)
    if tiny_clip_vision:
        for node in api.values():
            if node["class_type"] == "CLIPVisionLoader":
                node["class_type"] = TEST_CLIP_VISION
    return api


def test_workflow_5_validates_at_full_size(comfy, wt, files):
    """ComfyUI's own validation accepts the shipped widget values, the stock Load CLIP Vision included."""
    import asyncio
    import execution
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("v", _workflow(wt, tiny_clip_vision=False),
                                                                          None))
    assert ok, (err, node_errors)
    assert outputs


def test_workflow_5_precision_old_prompts_and_bf16(fresh, wt, files):
    """An API prompt saved before Load Reward had `precision` still validates; fp16 is refused by ComfyUI's
    validation, naming the input; the workflow runs headless with both towers in bf16."""
    import asyncio
    import execution
    api = wt.shrink(_workflow(wt))
    loaders = [k for k, n in api.items() if n["class_type"] == "FocusFixLoadReward"]
    assert len(loaders) == 2 and all(api[k]["inputs"]["precision"] == "fp32" for k in loaders)
    old = json.loads(json.dumps(api))
    for k in loaders:
        del old[k]["inputs"]["precision"]
    ok, err, _, node_errors = asyncio.run(execution.validate_prompt("old", old, None))
    assert ok, (err, node_errors)
    bad = json.loads(json.dumps(api))
    bad[loaders[0]]["inputs"]["precision"] = "fp16"
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("bad", bad, None))  # ok: other outputs still run
    assert list(node_errors) == [loaders[0]] and "precision: 'fp16' not in" in json.dumps(node_errors), node_errors
    for k in loaders:
        api[k]["inputs"]["precision"] = "bf16"
    ex = fresh.execute(api)
    errors = [d for e, d in ex.status_messages if e == "execution_error"]
    assert ex.success and not errors, errors[:1]
    assert len(list(fresh.loras.rglob("*.safetensors"))) == 1


def test_workflow_5_runs_headless(fresh, wt, files, layout):
    api = wt.shrink(_workflow(wt, layout))
    ex = fresh.execute(api)
    errors = [d for e, d in ex.status_messages if e == "execution_error"]
    assert ex.success and not errors, errors[:1]
    outputs = ex.history_result["outputs"]
    previews = [nid for nid, node in api.items() if node["class_type"] in ("PreviewImage", "SaveImage", "PreviewAny")]
    assert previews and all(nid in outputs for nid in previews), set(previews) - set(outputs)
    texts = [json.dumps(outputs[nid]) for nid in previews if api[nid]["class_type"] == "PreviewAny"]
    assert any("1*aesthetic + 10*safety: mean" in t for t in texts), texts
    save = next(n for n in api.values() if n["class_type"] == "FocusFixSaveLoRA")
    names = [p.relative_to(fresh.loras).as_posix() for p in fresh.loras.rglob("*.safetensors")]
    assert names == [save["inputs"]["filename"] + ".safetensors"]


def test_workflow_5_with_an_unknown_file_reports_the_node(fresh, wt, bw, files):
    api = wt.shrink(_workflow(wt))
    node_id = next(k for k, n in api.items() if n["inputs"].get("reward_name") == bw.SAFETY_FILE)
    api[node_id]["inputs"]["reward_name"] = JUNK
    ex = fresh.execute(api)
    (error,) = [d for e, d in ex.status_messages if e == "execution_error"]
    assert error["node_id"] == node_id and error["node_type"] == "FocusFixLoadReward"
    assert "unknown reward file layout" in error["exception_message"] and JUNK in error["exception_message"]
    assert not list(fresh.loras.rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ review of the reward side


def _pack_module(comfy, name: str):
    import sys
    return sys.modules[f"{comfy.pack.__name__}.{name}"]


def test_train_puts_the_reward_back_where_it_was(fresh, sd15):
    """Load Reward's cached reward is no ModelPatcher, so ComfyUI never unloads it: a Train run, finished or
    cancelled, moves it to the device for the run and back afterwards."""
    import comfy.model_management as mm

    class Spy(_pack_module(fresh, "focusfix_core.rewards.image").SharpnessReward):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, *args, **kwargs):
            self.moves.append(str(args[0]))
            return super().to(*args, **kwargs)

    model, clip, vae = sd15
    kw = dict(model=model, clip=clip, vae=vae, prompts="a portrait", negative_prompt="", seeds="0", width=SIZE,
              height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0, mask_source="heatmap", rank=2, targets="attn", lr=1e-2,
              iterations=1, seed=0)
    device = str(mm.get_torch_device())
    done = Spy()
    fresh.run("FocusFixTrainFocusNFix", reward=done, **kw)
    assert done.moves == [device, "cpu"]
    cancelled = Spy()
    fresh.interrupt_at = 1
    with pytest.raises(mm.InterruptProcessingException):
        fresh.run("FocusFixTrainFocusNFix", reward=cancelled, **{**kw, "iterations": 3})
    assert cancelled.moves == [device, "cpu"]


class _CountingCLIPVision:
    """A CLIP_VISION that counts reads of its weights (ViT-L/14: a 1.2 GB copy each)."""

    def __init__(self, clip_vision):
        self.clip_vision, self.reads = clip_vision, 0

    def get_sd(self):
        self.reads += 1
        return self.clip_vision.get_sd()


def test_clip_vision_is_read_only_for_a_lone_head_and_noted_when_ignored(comfy, bw, clip_vision, caplog):
    cv = _CountingCLIPVision(clip_vision)
    with caplog.at_level(logging.INFO, logger="FocusFix"):
        comfy.run("FocusFixLoadReward", reward_name=bw.SAFETY_FILE, clip_vision=cv)
        comfy.run("FocusFixLoadReward", reward_name="builtin:sharpness", clip_vision=cv)
    assert cv.reads == 0, "a reward that does not use the connected tower never copies it"
    notes = [r.getMessage() for r in caplog.records if "the clip_vision input is ignored" in r.getMessage()]
    assert len(notes) == 2, notes
    assert bw.SAFETY_FILE in notes[0] and "brings its own CLIP image tower" in notes[0]
    assert "builtin:sharpness" in notes[1] and "uses no CLIP image tower" in notes[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="FocusFix"):
        (r,) = comfy.run("FocusFixLoadReward", reward_name=bw.AESTHETIC_FILE, clip_vision=cv)
    assert cv.reads == 1 and type(r).__name__ == "AestheticReward"
    assert not [m for m in caplog.messages if "ignored" in m]


@pytest.fixture(scope="module")
def laion_head(files):
    """A head of the released widths (768 -> 1024 -> 128 -> 64 -> 16 -> 1), random weights."""
    import folder_paths
    from safetensors.torch import save_file
    widths, sd = (768, 1024, 128, 64, 16, 1), {}
    for i, n, o in zip((0, 2, 4, 6, 7), widths, widths[1:]):
        sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"] = torch.randn(o, n) * 0.01, torch.zeros(o)
    save_file(sd, str(Path(folder_paths.get_folder_paths("focusfix_rewards")[0]) / LAION_HEAD))
    return LAION_HEAD


@pytest.mark.parametrize("config, match", [
    ("clip_vision_siglip_384.json", "is not a CLIP image tower FocusFix can read \\(a SigLIP image tower\\)"),
    ("image_encoders/dino2_large.json", "is not a CLIP image tower FocusFix can read \\(a DINOv2 image encoder\\)"),
    ("clip_vision_config_vitl_336_llava.json", "is not a CLIP image tower FocusFix can read \\(a LLaVA image tower\\)"),
    ("clip_vision_config_vitl_336.json", "is ViT-L/14 at 336 px \\(768-d embeddings\\), but the LAION aesthetic head"),
    ("clip_vision_config_h.json", "is ViT-H/14 at 224 px \\(1024-d embeddings\\), but the LAION aesthetic head"),
])
def test_other_image_encoders_on_clip_vision_are_refused_naming_the_input(comfy, laion_head, config, match):
    """What Load CLIP Vision gives for other files an artist has (Redux's SigLIP, DINOv2, LLaVA's ViT-L-336,
    ViT-L/14-336, ViT-H), at full size on the meta device: refused with the input named and the file to use."""
    import os
    import comfy.clip_vision as cvm
    with torch.device("meta"):  # the real layouts and shapes, without their memory
        cv = cvm.ClipVisionModel(os.path.join(os.path.dirname(cvm.__file__), config))
    with pytest.raises(ValueError, match=f"{laion_head}': the clip_vision input {match}.*Load CLIP Vision with "
                                         "clip-vit-large-patch14.safetensors"):
        comfy.run("FocusFixLoadReward", reward_name=laion_head, clip_vision=cv)


def test_vit_l14_at_224_on_clip_vision_is_accepted(comfy, laion_head):
    import os
    import comfy.clip_vision as cvm
    with torch.device("meta"):
        cv = cvm.ClipVisionModel(os.path.join(os.path.dirname(cvm.__file__), "clip_vision_config_vitl.json"))
    with torch.no_grad():  # ComfyUI's ops leave weights uninitialised: memory that may read as NaN (refused)
        for v in cv.get_sd().values():
            if v.device.type != "meta" and v.is_floating_point():
                v.zero_()
    (r,) = comfy.run("FocusFixLoadReward", reward_name=laion_head, clip_vision=cv)
    assert r.tower.cfg.image_size == 224 and r.tower.cfg.layers == 24


def _combine_prompt(weight_a: float, weight_b: float) -> dict:
    """Load Reward (sharpness) and Load Reward (a file that is no reward) -> Combine Rewards -> Score Images."""
    return {
        "1": {"class_type": "FocusFixLoadReward", "inputs": {"reward_name": "builtin:sharpness"}},
        "2": {"class_type": "FocusFixLoadReward", "inputs": {"reward_name": JUNK}},
        "3": {"class_type": "FocusFixCombineRewards", "inputs": {"reward_a": ["1", 0], "weight_a": weight_a,
                                                                 "reward_b": ["2", 0], "weight_b": weight_b}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
        "5": {"class_type": "FocusFixScoreImages", "inputs": {"image": ["4", 0], "reward": ["3", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def test_combine_rewards_never_loads_a_zero_weight_reward(fresh, files):
    """weight 0 leaves a reward out: its Load Reward does not run at all (its file here would fail to load)."""
    ex = fresh.execute(_combine_prompt(1.0, 0.0))
    errors = [d for e, d in ex.status_messages if e == "execution_error"]
    assert ex.success and not errors, errors[:1]
    assert "1*sharpness: mean" in json.dumps(ex.history_result["outputs"]["6"])
    ex = fresh.execute(_combine_prompt(1.0, -2.0))  # with a weight, the bad file is loaded and reported
    (error,) = [d for e, d in ex.status_messages if e == "execution_error"]
    assert error["node_id"] == "2" and "unknown reward file layout" in error["exception_message"]


def test_combine_rewards_with_both_weights_zero_is_refused_at_queue_time(comfy, files):
    import asyncio
    import execution
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("zero", _combine_prompt(0.0, 0.0), None))
    assert list(node_errors) == ["3"] and "weight_a and weight_b are both 0" in json.dumps(node_errors), node_errors
