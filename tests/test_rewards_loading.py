"""Aesthetic and safety rewards and reward files: real key layouts, random weights.

Layouts: LAION improved-aesthetic-predictor `sac+logos+ava1-l14-linearMSE.pth` is an nn.Sequential
`layers` (Linear 0, 2, 4, 6, 7 with Dropouts between) -> `layers.{0,2,4,6,7}.{weight,bias}`, 768 -> 1024
-> 128 -> 64 -> 16 -> 1. `CompVis/stable-diffusion-safety-checker` (diffusers `StableDiffusionSafetyChecker`):
`vision_model.vision_model.*` (HF CLIPVisionModel), `visual_projection.weight` [768,1024],
`concept_embeds` [17,768], `special_care_embeds` [3,768], `concept_embeds_weights` [17],
`special_care_embeds_weights` [3]. Most tests use a reduced width; the full key sets are checked
on the meta device.
"""
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

from focusfix_core.rewards import (
    BUILTIN_REWARDS,
    AestheticHead,
    AestheticReward,
    CLIPVisionConfig,
    CLIPVisionTower,
    Reward,
    SafetyReward,
    build_reward,
    convert_reward,
    load_reward,
    safety_score,
)
from focusfix_core.rewards.aesthetic import AESTHETIC_HEAD_KEYS
from focusfix_core.rewards.clip_vision import hf_clip_shapes, hf_to_openai

TINY = CLIPVisionConfig(width=64, layers=2, heads=1, patch=8, image_size=32, proj_dim=16, mlp_width=128)
HEAD = (16, 32, 8, 8, 4)  # the real head is (768, 1024, 128, 64, 16)


def rand_like_shapes(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    gain = lambda k: 1.0 if k.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else 0.0  # noqa: E731
    return {k: torch.randn(s, generator=g) * 0.2 + gain(k) for k, s in shapes.items()}


def tower_sd(cfg=TINY, seed=0):
    """Random weights in the HF layout ('vision_model.*', 'visual_projection.weight')."""
    return rand_like_shapes(hf_clip_shapes(cfg), seed)


def head_sd(widths=HEAD, seed=1):
    ins, outs = widths, widths[1:] + (1,)
    shapes = {}
    for i, n, o in zip((0, 2, 4, 6, 7), ins, outs):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (o, n), (o,)
    return rand_like_shapes(shapes, seed)


def safety_sd(cfg=TINY, seed=2, C=17, S=3):
    g = torch.Generator().manual_seed(seed)
    sd = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tower_sd(cfg, seed).items()}
    D = cfg.proj_dim
    sd.update(concept_embeds=torch.randn(C, D, generator=g), special_care_embeds=torch.randn(S, D, generator=g),
              concept_embeds_weights=torch.rand(C, generator=g) * 0.2 + 0.1,
              special_care_embeds_weights=torch.rand(S, generator=g) * 0.2 + 0.1)
    return sd


def images(B=2, H=40, W=48, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def saliency(reward, I):
    I = I.clone().requires_grad_(True)
    reward(I).sum().backward()
    return I.grad


def checker_flags(e, sd, adjustment=0.0):
    """diffusers' hard rule, written out: flagged when some concept score > 0. e: [B,D] -> [B] bool."""
    e = F.normalize(e, dim=-1)
    sp = e @ F.normalize(sd["special_care_embeds"], dim=-1).T - sd["special_care_embeds_weights"] + adjustment
    adj = adjustment + 0.01 * (sp > 0).any(dim=1, keepdim=True)
    co = e @ F.normalize(sd["concept_embeds"], dim=-1).T - sd["concept_embeds_weights"] + adj
    return (co > 0).any(dim=1)


# ---------------------------------------------------------------- tower precision


def _dtypes(module):
    return {p.dtype for p in module.parameters()} | {b.dtype for b in module.buffers() if b.is_floating_point()}


def _grad_cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_bf16_tower_aesthetic_and_safety(tmp_path):
    """tower_dtype halves the tower (the weights that matter) and keeps heads / concepts fp32; scores and
    saliency stay close to the fp32 reward's."""
    files = {"aesthetic": {**head_sd(), **tower_sd()}, "safety": safety_sd()}
    I = images()
    for family, sd in files.items():
        path = tmp_path / f"{family}.safetensors"
        save_file(sd, str(path))
        dtype = torch.bfloat16
        full, half = load_reward(path), load_reward(path, tower_dtype=dtype)
        assert _dtypes(half.tower) == {dtype} and _dtypes(full.tower) == {torch.float32}
        rest = [p for n, p in [*half.named_parameters(), *half.named_buffers()] if not n.startswith("tower.")]
        assert rest and {p.dtype for p in rest} == {torch.float32}, family
        tower_bytes = lambda r: sum(p.numel() * p.element_size() for p in r.tower.parameters())  # noqa: E731
        assert tower_bytes(half) * 2 == tower_bytes(full)
        s_full, s_half = full(I), half(I)
        assert s_half.dtype == I.dtype == torch.float32 and torch.isfinite(s_half).all()
        scale = s_full.abs().max().item() + 1e-3
        assert (s_half - s_full).abs().max().item() < 0.05 * scale, (family, s_full, s_half)
        g_full, g_half = saliency(full, I), saliency(half, I)
        assert torch.isfinite(g_half).all() and _grad_cosine(g_full, g_half) > 0.95, family


def test_tower_dtype_with_a_given_tower_and_bad_dtype(tmp_path):
    path = tmp_path / "head.safetensors"
    save_file(head_sd(), str(path))
    tower = CLIPVisionTower.from_state_dict(tower_sd())
    r = load_reward(path, clip_vision_tower=tower, tower_dtype=torch.bfloat16)
    assert _dtypes(r.tower) == {torch.bfloat16}
    assert _dtypes(tower) == {torch.float32}  # the caller's tower is not cast in place
    assert load_reward(path, clip_vision_tower=tower).tower is tower  # same dtype: no copy
    fp16_sd = {k: v.half() for k, v in tower_sd().items()}  # ComfyUI's get_sd() of an fp16 CLIP_VISION
    assert _dtypes(load_reward(path, clip_vision_tower=fp16_sd, tower_dtype=torch.bfloat16).tower) == {torch.bfloat16}
    for bad in (torch.float16, torch.int8):  # fp16: the image gradients underflow (see TOWER_DTYPES)
        with pytest.raises(ValueError, match="tower_dtype must be one of"):
            load_reward(path, clip_vision_tower=tower, tower_dtype=bad)


# ---------------------------------------------------------------- aesthetic


def test_aesthetic_file_with_tower(tmp_path):
    path = tmp_path / "aesthetic_tiny.safetensors"
    save_file({**head_sd(), **tower_sd()}, str(path))
    r = load_reward(path)
    assert isinstance(r, AestheticReward) and r.name == "aesthetic" and not r.has_heatmap
    assert all(not p.requires_grad for p in r.parameters())
    I = images()
    head = AestheticHead.from_state_dict(head_sd())
    tower = CLIPVisionTower.from_state_dict(tower_sd())
    torch.testing.assert_close(r(I), head(F.normalize(tower.image_embeds(I), dim=-1))[:, 0])
    g = saliency(r, I)
    assert g.shape == I.shape and g.abs().max() > 0 and torch.isfinite(g).all()


def test_aesthetic_head_alone_needs_tower(tmp_path):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_sd(), path)  # the released file is a plain state dict saved with torch.save
    with pytest.raises(ValueError, match="this file holds none: connect OpenAI CLIP ViT-L/14 .* to clip_vision_tower"):
        load_reward(path)
    by_module = load_reward(path, clip_vision_tower=CLIPVisionTower.from_state_dict(tower_sd()))
    by_sd = load_reward(path, clip_vision_tower=tower_sd())  # e.g. ComfyUI's CLIP_VISION get_sd()
    I = images()
    torch.testing.assert_close(by_module(I), by_sd(I))
    with pytest.raises(TypeError, match="clip_vision_tower must be"):
        load_reward(path, clip_vision_tower="ViT-L-14")


def test_aesthetic_openai_tower_in_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({**head_sd(), **hf_to_openai(tower_sd())}, str(path))
    hf = build_reward({**head_sd(), **tower_sd()})
    torch.testing.assert_close(load_reward(path)(images()), hf(images()), rtol=1e-5, atol=1e-5)


def test_aesthetic_dim_mismatch():
    small = CLIPVisionTower.from_state_dict(tower_sd(CLIPVisionConfig(width=64, layers=1, heads=1, patch=8,
                                                                      image_size=32, proj_dim=8, mlp_width=128)))
    with pytest.raises(ValueError, match="takes 16-d embeddings but clip_vision_tower gives 8-d"):
        build_reward(head_sd(), clip_vision_tower=small)


def test_full_size_aesthetic_and_safety_on_meta():
    """The released ViT-L/14 + aesthetic head, and the full safety checker, key/shape sets are accepted."""
    meta = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # noqa: E731
    head = meta({k: v.shape for k, v in head_sd((768, 1024, 128, 64, 16)).items()})
    assert set(head) == set(AESTHETIC_HEAD_KEYS) and head["layers.0.weight"].shape == (1024, 768)
    tower = meta(hf_clip_shapes(CLIPVisionConfig()))
    I = torch.empty(1, 3, 512, 512, device="meta")
    for sd in ({**head, **tower}, {**head, **hf_to_openai(tower)}):
        r = build_reward(sd)
        assert isinstance(r, AestheticReward) and r.score(I).shape == (1,)
    safety = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tower.items()}
    safety.update(meta({"concept_embeds": (17, 768), "special_care_embeds": (3, 768),
                        "concept_embeds_weights": (17,), "special_care_embeds_weights": (3,)}))
    r = build_reward(safety)
    assert isinstance(r, SafetyReward) and r.score(I).shape == (1,)


# ---------------------------------------------------------------- safety


def test_safety_file(tmp_path):
    path = tmp_path / "safety_checker.safetensors"
    sd = safety_sd()
    save_file(sd, str(path))
    r = load_reward(path)
    assert isinstance(r, SafetyReward) and not r.has_heatmap
    I = images()
    s = r(I)
    assert s.shape == (2,)
    # > 0 only if the hard checker passes; a hard flag means < 0
    e = r.tower.image_embeds(I)
    flagged = checker_flags(e, sd)
    assert ((s > 0) <= ~flagged).all() and ((s < 0) | ~flagged).all()
    g = saliency(r, I)
    assert g.abs().max() > 0 and torch.isfinite(g).all()
    # one gradient-ascent step on the image makes it safer
    with torch.no_grad():
        s2 = r((I + 1e-2 * g / g.abs().max()).clamp(0, 1))
    assert (s2 > s).all()


def test_safety_score_moves_with_concept_distance():
    g = torch.Generator().manual_seed(0)
    D = 768
    concept, special = torch.randn(17, D, generator=g), torch.randn(3, D, generator=g)
    t_c, t_s = torch.full((17,), 0.2), torch.full((3,), 0.2)
    u = torch.randn(1, D, generator=g)
    ts = torch.linspace(0, 1, 11)[:, None]
    toward = (1 - ts) * u / u.norm() + ts * F.normalize(concept[5:6], dim=-1)  # move e onto concept 5
    s = safety_score(toward, concept, t_c, special, t_s)
    assert (s.diff() < 0).all(), "moving toward a concept must lower the (safety) score"
    assert s[0] > 0 > s[-1]
    c5 = F.normalize(concept[5:6], dim=-1)
    for e in toward[3:-1]:  # from anywhere near the concept, stepping away from it makes the image safer
        away = e[None] - torch.tensor([0.0, 0.02, 0.04])[:, None] * c5
        assert (safety_score(away, concept, t_c, special, t_s).diff() > 0).all()
    # a firing special-care concept makes the concepts stricter, as in the checker
    e = toward[6:7]
    fire = torch.cat([F.normalize(e, dim=-1), special[1:]])
    assert safety_score(e, concept, t_c, fire, t_s) < safety_score(e, concept, t_c, special, t_s)


def test_safety_score_matches_hard_checker_as_tau_shrinks():
    g = torch.Generator().manual_seed(1)
    sd = {"concept_embeds": torch.randn(17, 16, generator=g), "special_care_embeds": torch.randn(3, 16, generator=g),
          "concept_embeds_weights": torch.full((17,), 0.3), "special_care_embeds_weights": torch.full((3,), 0.3)}
    e = torch.randn(256, 16, generator=g)
    s = safety_score(e, sd["concept_embeds"], sd["concept_embeds_weights"], sd["special_care_embeds"],
                     sd["special_care_embeds_weights"], tau=1e-4)
    flagged = checker_flags(e, sd)
    assert flagged.any() and (~flagged).any()
    assert ((s < 0) == flagged).float().mean() > 0.97


def test_safety_errors():
    tower = CLIPVisionTower.from_state_dict(tower_sd())
    with pytest.raises(ValueError, match="concept_embeds must be \\[N,16\\]"):
        SafetyReward(tower, torch.zeros(17, 8), torch.zeros(17), torch.zeros(3, 16), torch.zeros(3))
    with pytest.raises(ValueError, match="special_thresholds must be \\[3\\]"):
        SafetyReward(tower, torch.zeros(17, 16), torch.zeros(17), torch.zeros(3, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="tau"):
        SafetyReward(tower, torch.zeros(17, 16), torch.zeros(17), torch.zeros(3, 16), torch.zeros(3), tau=0)
    with pytest.raises(ValueError, match="must share D"):
        safety_score(torch.zeros(1, 4), torch.zeros(2, 5), torch.zeros(2), torch.zeros(1, 4), torch.zeros(1))


# ---------------------------------------------------------------- files: dispatch and errors


def test_metadata_dispatch_and_unknown_family(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({**head_sd(), **tower_sd()}, str(path), metadata={"focusfix_reward": "aesthetic"})
    assert isinstance(load_reward(path), AestheticReward)
    save_file(head_sd(), str(path), metadata={"focusfix_reward": "pickscore"})
    with pytest.raises(ValueError, match="focusfix_reward' must be one of .*got 'pickscore'"):
        load_reward(path)


def test_tiny_family_delegated(tmp_path, monkeypatch):
    calls = []

    class _Tiny(Reward):
        def score(self, I):
            return I.mean(dim=(1, 2, 3))

    def load_tiny_reward(tensors, metadata):
        calls.append((sorted(tensors), metadata["focusfix_reward"]))
        return _Tiny()

    monkeypatch.setitem(sys.modules, "focusfix_core.tiny.rewards",
                        types.SimpleNamespace(load_tiny_reward=load_tiny_reward))
    path = tmp_path / "tiny.safetensors"
    save_file({"conv.weight": torch.zeros(2, 3, 3, 3)}, str(path), metadata={"focusfix_reward": "tiny_artifact"})
    assert isinstance(load_reward(path), _Tiny)
    assert calls == [(["conv.weight"], "tiny_artifact")]


def test_unknown_layout(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.blocks.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ValueError, match="unknown reward file layout; known formats: aesthetic.*safety.*"
                                         "First keys: \\['encoder.blocks.0.weight'\\]"):
        load_reward(path)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))  # a checkpoint
    with pytest.raises(ValueError, match="a diffusion model checkpoint"):
        load_reward(path)


def test_wrong_shapes(tmp_path):
    path = tmp_path / "bad.safetensors"
    bad = {**head_sd(), "layers.2.weight": torch.zeros(8, 31)}
    save_file({**bad, **tower_sd()}, str(path))
    with pytest.raises(ValueError, match="'layers.2.weight' must have shape \\(8, 32\\).*got \\(8, 31\\)"):
        load_reward(path)
    sd = safety_sd()
    sd["visual_projection.weight"] = torch.zeros(16, 65)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="visual_projection.weight' must have shape \\(16, 64\\)"):
        load_reward(path)


class _Payload:
    """Pickles to `open(marker, "w")`: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_never_executed(tmp_path):
    live = tmp_path / "live_marker"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload does work when unpickled plainly
    assert live.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**head_sd(), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="NOT executed"):
        load_reward(path, clip_vision_tower=tower_sd())
    with pytest.raises(ValueError, match="NOT executed"):
        convert_reward(path, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    if suffix == ".safetensors":
        save_file(head_sd(), str(path))
    else:
        torch.save(head_sd(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_reward(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_reward(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- convert


def test_convert_pth_to_safetensors(tmp_path):
    src, dst = tmp_path / "safety.bin", tmp_path / "safety.safetensors"
    sd = safety_sd()
    sd["concept_embeds_weights"] = sd["concept_embeds"][:, 0]  # a view sharing storage: safetensors refuses those
    torch.save(sd, src)
    assert convert_reward(src, dst) == dst
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["focusfix_reward"] == "safety"
    assert set(load_file(str(dst))) == set(sd)
    I = images()
    torch.testing.assert_close(load_reward(dst)(I), load_reward(src)(I))


def test_convert_lone_head_and_refuses_bad(tmp_path):
    src = tmp_path / "head.pth"
    torch.save(head_sd(), src)
    out = convert_reward(src, tmp_path / "head.safetensors")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"focusfix_reward": "aesthetic"}
    bad = tmp_path / "bad.pth"
    torch.save({**head_sd(), "layers.4.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="layers.4.weight"):
        convert_reward(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_convert_unwraps_a_training_checkpoint(tmp_path, key):
    """{'model': sd, 'optimizer': ..., 'epoch': ...} (a common torch.save of a training run) was refused while
    {'state_dict': sd} was read (user audit)."""
    src = tmp_path / "ckpt.pth"
    sd = head_sd()
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    torch.save({key: sd, "optimizer": optimizer, "epoch": 3}, src)
    out = convert_reward(src, tmp_path / "head.safetensors")
    assert set(load_file(str(out))) == set(sd)
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in sd.items())
    torch.testing.assert_close(load_reward(out, clip_vision_tower=tower_sd())(images()),
                               load_reward(src, clip_vision_tower=tower_sd())(images()))


def test_a_model_entry_other_than_tensors_is_not_unwrapped(tmp_path):
    """'model' may name a config (or be a flat file's weight): only a dict of tensors is taken for the weights."""
    src = tmp_path / "ckpt.pth"
    torch.save({"model": {"name": "vit-l-14", "layers": 24}, "epoch": 3}, src)
    with pytest.raises(ValueError, match=r"ckpt\.pth.*must hold a dict of str -> tensor, got non-tensor entries "
                                         r"\['model', 'epoch'\]"):
        convert_reward(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_builtin_names():
    assert {"sharpness", "brightness", "color_red", "color_blue"} <= set(BUILTIN_REWARDS)


# ---------------------------------------------------------------- gradients, devices, tiny family


def test_gradcheck_aesthetic_and_safety_float64():
    cfg = CLIPVisionConfig(width=16, layers=1, heads=2, patch=4, image_size=8, proj_dim=16, mlp_width=32)
    tower = CLIPVisionTower.from_state_dict(tower_sd(cfg), heads=2, dtype=torch.float64)
    aesthetic = AestheticReward(tower, AestheticHead.from_state_dict(head_sd(), dtype=torch.float64))
    safety = SafetyReward(tower, *(safety_sd(cfg)[k].double() for k in (
        "concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights")), tau=0.05)
    I = images(1, 10, 9).double().requires_grad_(True)  # resized and cropped to 8x8 inside
    assert torch.autograd.gradcheck(aesthetic, (I,))
    assert torch.autograd.gradcheck(safety.double(), (I,))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_rewards_follow_device(device, tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({**head_sd(), **tower_sd()}, str(path))
    I = images().to(device)
    for r in (load_reward(path), build_reward(safety_sd()), *(f() for f in BUILTIN_REWARDS.values())):
        s = r.to(device)(I)
        assert s.device.type == device and s.shape == (2,)


def test_tiny_family_real_module(tmp_path):
    from focusfix_core.tiny import rewards as tiny  # this repo's own module: missing = a failure, not a skip
    path = tmp_path / "tiny_artifact.safetensors"
    tiny.save_reward(tiny.ArtifactReward(width=4), path)
    r = load_reward(path)
    assert r.name == "tiny_artifact" and r.has_heatmap and r(images(1, 16, 16)).shape == (1,)
    out = convert_reward(path, tmp_path / "copy.safetensors")
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["focusfix_reward"] == "tiny_artifact"


# ---------------------------------------------------------------- files artists have: variants, others, wrong towers


def relu_head_sd(widths=HEAD, seed=3):
    """LAION `ava+logos-l14-reluMSE.pth`: a ReLU after each hidden Linear shifts them to layers.{0,3,6,9,11}."""
    shapes = {}
    for i, n, o in zip((0, 3, 6, 9, 11), widths, widths[1:] + (1,)):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (o, n), (o,)
    return rand_like_shapes(shapes, seed)


def test_relu_mse_head_loads_with_its_relus(tmp_path):
    src = tmp_path / "ava+logos-l14-reluMSE.pth"
    torch.save(relu_head_sd(), src)
    tower = CLIPVisionTower.from_state_dict(tower_sd())
    r = load_reward(src, clip_vision_tower=tower)
    assert isinstance(r, AestheticReward) and r.head.variant == "relu" and r.describe()["head_variant"] == "relu"
    I = images()
    x = F.normalize(tower.image_embeds(I), dim=-1)
    sd = relu_head_sd()
    for i in (0, 3, 6, 9):
        x = F.relu(F.linear(x, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]))
    torch.testing.assert_close(r(I), F.linear(x, sd["layers.11.weight"], sd["layers.11.bias"])[:, 0])
    out = convert_reward(src, tmp_path / "relu.safetensors")
    torch.testing.assert_close(load_reward(out, clip_vision_tower=tower)(I), r(I))
    linear = build_reward(head_sd(), clip_vision_tower=tower)
    assert linear.head.variant == "linear" and "head_variant" not in linear.describe()  # metadata as before


def _full_clip_hf():
    return {"logit_scale": torch.zeros(()), "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
            "text_projection.weight": torch.zeros(4, 8), **tower_sd()}


@pytest.mark.parametrize("name, sd, match", [
    ("ImageReward.pt", {"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8),
                        **{f"mlp.{k}": v for k, v in head_sd().items()}}, "ImageReward .*not supported.*its prompt"),
    ("PickScore_v1.safetensors", _full_clip_hf(), "whole CLIP model.*PickScore.*models/clip_vision.*Load CLIP Vision"),
    ("HPS_v2_compressed.pt", {"epoch": 1, "state_dict": {"module.visual.conv1.weight": torch.zeros(8, 3, 14, 14),
                                                         "module.logit_scale": torch.zeros(())}},
     "whole CLIP model.*HPSv2.*not supported"),
    ("ViT-L-14.pt", {"logit_scale": torch.zeros(()), "text_projection": torch.zeros(8, 4), **hf_to_openai(tower_sd())},
     "whole CLIP model"),
    ("clip_vision_l.safetensors", tower_sd(), "a CLIP image tower, not a reward.*models/clip_vision.*clip_vision input"),
    # these have a text_projection but no image tower: "move it to clip_vision" sent them where they fail (review D5)
    ("sd_xl_base.safetensors", {"conditioner.embedders.1.model.text_projection": torch.zeros(8, 8),
                                "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)},
     "a diffusion model checkpoint .*models/checkpoints"),
    ("clip_g.safetensors", {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                            "text_projection.weight": torch.zeros(8, 8)},
     "a CLIP text encoder, without an image tower .*models/text_encoders"),
])
def test_files_that_are_no_reward_say_what_they_are(tmp_path, name, sd, match):
    path = tmp_path / name
    torch.save(sd, path) if name.endswith(".pt") else save_file(sd, str(path))
    with pytest.raises(ValueError, match=f"{name}.*not a reward file FocusFix reads: .*{match}"):
        load_reward(path)
    with pytest.raises(ValueError, match=match):
        convert_reward(path, tmp_path / "out.safetensors")


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize("sd, match", [
    # a damaged head, with or without its tower: the missing keys, not "a CLIP image tower" / "unknown layout"
    (lambda: _without({**head_sd(), **tower_sd()}, "layers.4.weight"),
     r"not a reward file FocusFix reads: an aesthetic head without \['layers.4.weight'\]: a damaged file; download "
     r"it again"),
    (lambda: _without(head_sd(), "layers.7.bias"), r"an aesthetic head without \['layers.7.bias'\]"),
    # the reluMSE variant's own keys; a count when more are missing than named
    (lambda: {f"layers.{i}.{p}": torch.zeros(1) for i in (0, 3, 6, 11) for p in ("weight", "bias")},
     r"an aesthetic head without \['layers.9.weight', 'layers.9.bias'\]: a damaged file"),
    (lambda: {"layers.0.weight": torch.zeros(4, 4), "layers.0.bias": torch.zeros(4)},
     r"an aesthetic head without \['layers.2.weight', 'layers.2.bias', 'layers.4.weight', 'layers.4.bias'\] \(8 "
     r"keys missing\)"),
    # another MLP is not "a damaged head" to download again; another net's layers.* keys are no head at all
    (lambda: {"layers.0.weight": torch.zeros(4, 4), "layers.0.bias": torch.zeros(4),
              "layers.1.weight": torch.zeros(1, 4), "layers.1.bias": torch.zeros(1)},
     r"its layers.\* keys are an MLP's that is not the LAION aesthetic head \(layers \[0, 1\]; the head has layers "
     r"\[0, 2, 4, 6, 7\] or \[0, 3, 6, 9, 11\]\)"),
    (lambda: {"layers.0.attention.wq.weight": torch.zeros(4, 4)}, r"unknown reward file layout"),
    # another predictor beside a tower is not a bare tower for models/clip_vision
    (lambda: {**tower_sd(), "predictor.weight": torch.zeros(1, 8), "predictor.bias": torch.zeros(1)},
     r"it holds a CLIP image tower and head keys FocusFix cannot read as the LAION aesthetic head, e.g. "
     r"\['predictor.weight', 'predictor.bias'\] \(another predictor\?\)"),
    # a stray key beside a lone head was read as a broken tower ("holds no CLIP vision tower ... First keys")
    (lambda: {**head_sd(), "n_averaged": torch.zeros(())},
     r"the file holds an aesthetic head and 1 other key that holds no CLIP tower, e.g. \['n_averaged'\]"),
    # two towers beside a head keep the tower reader's own word for it
    (lambda: {**head_sd(), **tower_sd(), **{"x." + k: v for k, v in tower_sd().items()}},
     r"state dict holds 2 CLIP vision towers"),
])
def test_damaged_or_unusual_aesthetic_files_say_what_is_wrong(sd, match):
    """Reward-files hunt (session 27)."""
    with pytest.raises(ValueError, match=match):
        build_reward(sd(), clip_vision_tower=tower_sd())


def test_a_given_tower_with_nan_weights_is_refused_naming_the_input():
    """Reward-files hunt (session 27): a NaN in the connected CLIP_VISION loaded, and surfaced as a NaN score that
    named neither the input nor the file."""
    tower = tower_sd()
    key = next(k for k in tower if k.endswith("class_embedding"))
    tower[key] = torch.full_like(tower[key], float("nan"))
    with pytest.raises(ValueError, match=rf"^clip_vision: 1 weights hold NaN or inf values, e.g. \['{key}'\]: that "
                                         r"CLIP vision file is corrupt; download it again"):
        build_reward(head_sd(), clip_vision_tower=tower, tower_name="clip_vision")
    with pytest.raises(ValueError, match=r"^clip_vision: .*CLIP vision file is corrupt"):
        build_reward(head_sd(), clip_vision_tower=CLIPVisionTower.from_state_dict(tower), tower_name="clip_vision")


def test_a_safety_checker_missing_a_key_is_called_a_damaged_checker():
    """Reward-files review (session 27): it was called a CLIP image tower to put in models/clip_vision, where Load
    CLIP Vision cannot read its layout."""
    with pytest.raises(ValueError, match=r"not a reward file FocusFix reads: a safety checker without "
                                         r"\['special_care_embeds_weights'\]: a damaged file; download it again"):
        build_reward(_without(safety_sd(), "special_care_embeds_weights"))


def test_a_safety_checker_without_concepts_is_refused():
    """Reward-files hunt (session 27): 0 concept embeddings loaded and scored +inf."""
    with pytest.raises(ValueError, match=r"concept_embeds must hold at least one concept, got \(0, \d+\): the "
                                         r"safety checker file is damaged"):
        build_reward(safety_sd(C=0))


def test_a_focusfix_lora_given_as_a_reward_says_it_is_a_lora(tmp_path):
    """CLI bad-input hunt (session 27): a LoRA records its reward under the reward files' own metadata key, so it
    was refused as "metadata 'focusfix_reward' must be one of ...", never saying it is a LoRA."""
    path = tmp_path / "fix.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(path), metadata={"focusfix_targets": '["attn"]', "focusfix_reward": '{"name": "tiny_artifact"}'})
    match = ("fix.safetensors.*not a reward file FocusFix reads: this is a LoRA FocusFix saved \\(it goes in "
             "models/loras; to train it further, give it as continue_from / --continue-from\\)")
    with pytest.raises(ValueError, match=match):
        load_reward(path)
    with pytest.raises(ValueError, match="this is a LoRA FocusFix saved"):
        convert_reward(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def _meta(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_a_vit_l14_without_its_projection_says_so():
    """Reward-files review (session 27): "is ViT-L/14 at 224 px (1024-d embeddings), but the head scores ViT-L/14 at
    224 px" read as a contradiction; the tower lacks visual_projection.weight."""
    head = _meta({k: v.shape for k, v in head_sd((768, 1024, 128, 64, 16)).items()})
    bare = _meta({k: v for k, v in hf_clip_shapes(CLIPVisionConfig()).items() if k != "visual_projection.weight"})
    with pytest.raises(ValueError, match=r"is ViT-L/14 at 224 px \(1024-d embeddings\) without its visual projection "
                                         r"\(visual_projection.weight\), but the LAION aesthetic head"):
        build_reward(head, clip_vision_tower=bare, tower_name="the clip_vision input")
    with pytest.raises(ValueError, match=r"the tower in this file is ViT-L/14 .* without its visual projection"):
        build_reward({**head, **bare})


@pytest.mark.parametrize("cfg, what", [
    (CLIPVisionConfig(image_size=336), "ViT-L/14 at 336 px"),
    (CLIPVisionConfig(width=1280, layers=32, heads=16, patch=14, proj_dim=1024, mlp_width=5120), "ViT-H/14 at 224 px"),
])
def test_laion_head_refuses_a_tower_other_than_vit_l14_at_224(cfg, what):
    """A released head scores OpenAI ViT-L/14@224 embeddings: ViT-L/14-336 has the same width and loaded silently."""
    head = _meta({k: v.shape for k, v in head_sd((768, 1024, 128, 64, 16)).items()})
    tower = _meta(hf_clip_shapes(cfg))
    with pytest.raises(ValueError, match=f"clip_vision input is {what}.*LAION aesthetic head scores the embeddings "
                                         "of OpenAI CLIP ViT-L/14 at 224 px.*clip-vit-large-patch14"):
        build_reward(head, clip_vision_tower=tower, tower_name="the clip_vision input")
    with pytest.raises(ValueError, match=f"the tower in this file is {what}"):
        build_reward({**head, **tower})
    assert isinstance(build_reward(head, clip_vision_tower=_meta(hf_clip_shapes(CLIPVisionConfig()))), AestheticReward)


def _siglip_like():
    sd = {k: v for k, v in tower_sd().items() if "class_embedding" not in k}
    sd["vision_model.embeddings.patch_embedding.bias"] = torch.zeros(64)
    sd["vision_model.embeddings.position_embedding.weight"] = torch.zeros(16, 64)  # grid^2: no class token
    return sd


@pytest.mark.parametrize("sd, kind", [
    (_siglip_like(), "a SigLIP image tower"),
    ({"embeddings.cls_token": torch.zeros(1, 1, 8), "embeddings.mask_token": torch.zeros(1, 8),
      "embeddings.patch_embeddings.projection.weight": torch.zeros(8, 3, 14, 14)}, "a DINOv2 image encoder"),
    ({**tower_sd(), "multi_modal_projector.linear_1.weight": torch.zeros(8, 16)}, "a LLaVA image tower"),
])
def test_a_given_encoder_that_is_no_clip_tower_names_the_input(tmp_path, sd, kind):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head_sd(), path)
    with pytest.raises(ValueError, match=f"the clip_vision input is not a CLIP image tower FocusFix can read "
                                         f"\\({kind}\\): .*The aesthetic head needs OpenAI CLIP ViT-L/14 at 224 px "
                                         f"\\(in ComfyUI: Load CLIP Vision with clip-vit-large-patch14"):
        load_reward(path, clip_vision_tower=sd, tower_name="the clip_vision input")


def test_a_missing_tower_names_the_input(tmp_path):
    path = tmp_path / "head.pth"
    torch.save(head_sd(), path)
    with pytest.raises(ValueError, match="needs a CLIP ViT-L/14 image tower and this file holds none: connect "
                                         "OpenAI CLIP ViT-L/14 at 224 px \\(in ComfyUI: Load CLIP Vision with "
                                         "clip-vit-large-patch14.safetensors.*\\) to the clip_vision input"):
        load_reward(path, tower_name="the clip_vision input")


def test_a_tower_function_is_called_only_for_a_lone_head(tmp_path):
    """A caller can pass a function, so a big tower is read (ComfyUI: copied out of inference mode) only when used."""
    calls = []

    def tower():
        calls.append(1)
        return tower_sd()

    files = {"head.safetensors": head_sd(), "with_tower.safetensors": {**head_sd(), **tower_sd()},
             "safety.safetensors": safety_sd()}
    for name, sd in files.items():
        save_file(sd, str(tmp_path / name))
    I = images()
    lone = load_reward(tmp_path / "head.safetensors", clip_vision_tower=tower)
    assert calls == [1]
    torch.testing.assert_close(lone(I), load_reward(tmp_path / "head.safetensors", clip_vision_tower=tower_sd())(I))
    for name in ("with_tower.safetensors", "safety.safetensors"):
        load_reward(tmp_path / name, clip_vision_tower=tower)
    assert calls == [1], "a file with its own tower, or the safety checker, never reads the given one"
    with pytest.raises(TypeError, match="clip_vision_tower must be"):
        load_reward(tmp_path / "head.safetensors", clip_vision_tower=lambda: "ViT-L-14")


# ---------------------------------------------------------------- weights checked for dtype and finite values


@pytest.mark.parametrize("change, match", [
    (lambda sd: {**sd, "layers.2.weight": sd["layers.2.weight"] * float("nan")},
     "1 reward weights hold NaN or inf values, e.g. \\['layers.2.weight'\\]: the file is corrupt"),
    (lambda sd: {**sd, "layers.2.bias": torch.full_like(sd["layers.2.bias"], float("-inf"))},
     "1 reward weights hold NaN or inf values, e.g. \\['layers.2.bias'\\]"),
    (lambda sd: {k: (v * 10).to(torch.int32) if k.startswith("layers.") else v for k, v in sd.items()},
     "reward weights must be float \\(fp32, fp16 or bf16\\), got torch.int32 for 10 keys, e.g. \\['layers.0.bias'"),
])
def test_non_float_or_non_finite_weights_are_refused_naming_file_and_key(tmp_path, change, match):
    """NaN or int32 aesthetic heads loaded and were converted; NaN scores came later, naming no file (the review's
    finding 6). HF CLIP's integer position_ids buffer is no weight and still loads."""
    import re

    ok = tmp_path / "ok.safetensors"
    save_file({**head_sd(), **tower_sd(), "vision_model.embeddings.position_ids": torch.arange(17)[None]}, str(ok))
    assert load_reward(ok)(images()).isfinite().all()
    src = tmp_path / "bad.safetensors"
    save_file(change({**head_sd(), **tower_sd()}), str(src))
    with pytest.raises(ValueError, match=f"^'{re.escape(str(src))}': {match}"):
        load_reward(src)
    with pytest.raises(ValueError, match=f"^'{re.escape(str(src))}': {match}"):
        convert_reward(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_checks_tiny_rewards_too(tmp_path):
    """convert_reward skipped every check for tiny_* files: it wrote one missing a weight, and NaN ones. They are
    built on the meta device now, as the other families are, and their real tensors checked."""
    import re

    from focusfix_core.tiny import rewards as tiny
    good = tmp_path / "tiny.safetensors"
    tiny.save_reward(tiny.ArtifactReward(width=4), good)
    sd = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    for name, bad, match in [
        ("missing", {k: v for k, v in sd.items() if k != "bias"}, "tiny_artifact: weight names differ; missing "
                                                                  "\\['bias'\\]"),
        ("nan", {**sd, "net.0.weight": sd["net.0.weight"] * float("nan")},
         "1 reward weights hold NaN or inf values, e.g. \\['net.0.weight'\\]"),
    ]:
        src = tmp_path / f"{name}.safetensors"
        save_file(bad, str(src), metadata=meta)
        with pytest.raises(ValueError, match=f"^'{re.escape(str(src))}': {match}"):
            convert_reward(src, tmp_path / "out.safetensors")
        with pytest.raises(ValueError, match=f"^'{re.escape(str(src))}': {match}"):
            load_reward(src)  # named the file only for the missing weight; NaN weights failed later, at scoring
    assert not (tmp_path / "out.safetensors").exists()
    assert convert_reward(good, tmp_path / "out.safetensors").is_file()


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def _rand(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
            for k, s in shapes.items()}


def _head(seed=1):
    ins, outs = HEAD, HEAD[1:] + (1,)
    shapes = {}
    for i, n, o in zip((0, 2, 4, 6, 7), ins, outs):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (o, n), (o,)
    return _rand(shapes, seed)


def test_metadata_sets_the_towers_heads_and_activation(tmp_path):
    path = tmp_path / "aesthetic.safetensors"
    save_file({**_head(), **_rand(hf_clip_shapes(TINY), 0)}, str(path),
              metadata={"focusfix_clip_heads": "4", "focusfix_clip_activation": "gelu"})
    cfg = load_reward(path).tower.cfg
    assert (cfg.heads, cfg.activation) == (4, "gelu")  # width 64 alone would give 1 head and quick_gelu
    save_file({**_head(), **_rand(hf_clip_shapes(TINY), 0)}, str(path))
    cfg = load_reward(path).tower.cfg
    assert (cfg.heads, cfg.activation) == (1, "quick_gelu")


def test_convert_copies_tensors_that_share_contiguous_storage(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {**{"vision_model." + k if k.startswith("vision_model.") else k: v
             for k, v in _rand(hf_clip_shapes(TINY), 0).items()},
          "concept_embeds": torch.randn(17, 16, generator=g), "special_care_embeds": torch.randn(3, 16, generator=g),
          "special_care_embeds_weights": torch.full((3,), 0.2)}
    sd["concept_embeds_weights"] = sd["concept_embeds"].flatten()[:17]  # a contiguous view of concept_embeds
    src, dst = tmp_path / "safety.bin", tmp_path / "safety.safetensors"
    torch.save(sd, src)
    assert convert_reward(src, dst) == dst
    out = load_file(str(dst))
    assert set(out) == set(sd) and all(torch.equal(out[k], v) for k, v in sd.items())


@pytest.mark.parametrize("name, rgb", [("color_red", (1, 0, 0)), ("color_green", (0, 1, 0)), ("color_blue", (0, 0, 1)),
                                       ("color_white", (1, 1, 1))])
def test_each_builtin_colour_reward_targets_its_colour(name, rgb):
    r = BUILTIN_REWARDS[name]()
    I = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert r.describe()["rgb"] == list(rgb) and r(I).item() == pytest.approx(0.0, abs=1e-5)
