"""CLIP vision tower: layouts (HF/ComfyUI, OpenAI, safety checker), config inference, preprocessing.

Key layouts follow OpenAI `clip/model.py` (`visual.*`), HF `CLIPVisionModelWithProjection`
(`vision_model.*`, `visual_projection.weight`) and ComfyUI `comfy/clip_model.py` (same as HF). Weights
are random; the reduced config keeps tests fast, and the full ViT-L/14 key set is checked on the
meta device (no memory).
"""
import pytest
import torch
import torch.nn.functional as F

from focusfix_core.rewards.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionConfig,
    CLIPVisionTower,
    clip_preprocess,
    detect_clip_layout,
    hf_clip_shapes,
    hf_to_openai,
    infer_clip_config,
    to_hf_clip_state_dict,
)
from focusfix_core.rewards.aesthetic import AestheticHead, AestheticReward
from focusfix_core.rewards.safety import SafetyReward, safety_score

TINY = CLIPVisionConfig(width=64, layers=2, heads=2, patch=8, image_size=32, proj_dim=16, mlp_width=256)


def random_tower(cfg=TINY, seed=0) -> CLIPVisionTower:
    """A tower whose every weight (LayerNorms and class token too) is random, so no key can hide."""
    g = torch.Generator().manual_seed(seed)
    tower = CLIPVisionTower(cfg)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm scales near 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1) + gain)
    return tower.eval()


def openai_reference(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Independent OpenAI-layout forward (nn.functional.multi_head_attention_forward, as OpenAI CLIP's
    nn.MultiheadAttention does). x: preprocessed pixels [B,3,S,S] -> [B,proj]."""
    v = lambda k: sd["visual." + k]  # noqa: E731
    w = v("conv1.weight").shape[0]
    t = F.conv2d(x, v("conv1.weight"), stride=v("conv1.weight").shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([v("class_embedding").expand(len(x), 1, w), t], 1) + v("positional_embedding")
    t = F.layer_norm(t, (w,), v("ln_pre.weight"), v("ln_pre.bias")).transpose(0, 1)  # (N, B, w)
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        b = lambda k: sd[f"visual.transformer.resblocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(t, (w,), b("ln_1.weight"), b("ln_1.bias"))
        a, _ = F.multi_head_attention_forward(h, h, h, w, heads, b("attn.in_proj_weight"), b("attn.in_proj_bias"),
                                              None, None, False, 0.0, b("attn.out_proj.weight"),
                                              b("attn.out_proj.bias"), need_weights=False)
        t = t + a
        h = F.linear(F.layer_norm(t, (w,), b("ln_2.weight"), b("ln_2.bias")), b("mlp.c_fc.weight"), b("mlp.c_fc.bias"))
        t = t + F.linear(h * torch.sigmoid(1.702 * h), b("mlp.c_proj.weight"), b("mlp.c_proj.bias"))
        i += 1
    pooled = F.layer_norm(t[0], (w,), v("ln_post.weight"), v("ln_post.bias"))
    return pooled @ v("proj")


def test_state_dict_is_hf_layout():
    sd = CLIPVisionTower(TINY).state_dict()
    shapes = hf_clip_shapes(TINY)
    assert list(sd) == list(shapes) or set(sd) == set(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert "vision_model.pre_layrnorm.weight" in sd and "visual_projection.weight" in sd


def test_image_embeds_shape_and_gradient():
    tower = random_tower()
    I = torch.rand(2, 3, 40, 56, requires_grad=True)
    e = tower.image_embeds(I)
    assert e.shape == (2, TINY.proj_dim)
    e.pow(2).sum().backward()
    assert I.grad is not None and I.grad.abs().sum() > 0


@pytest.mark.parametrize("prefix", ["vision_model.", "", "vision_model.vision_model."])
def test_hf_prefixes_load_identically(prefix):
    ref = random_tower()
    sd = {(prefix + k[len("vision_model."):] if k.startswith("vision_model.") else k): v
          for k, v in ref.state_dict().items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(TINY.tokens)[None]  # old HF buffer: ignored
    assert detect_clip_layout(sd) == ("hf", prefix)
    tower = CLIPVisionTower.from_state_dict(sd, heads=TINY.heads)
    assert tower.cfg == TINY
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(tower(x), ref(x))


def test_openai_layout_matches_hf_and_reference():
    ref = random_tower(seed=1)
    oa = hf_to_openai(ref.state_dict())
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in oa and oa["visual.proj"].shape == (64, 16)
    # a full OpenAI CLIP file also holds the text tower: ignored
    full = {**oa, "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1), "logit_scale": torch.ones(()),
            "token_embedding.weight": torch.zeros(2, 2)}
    assert detect_clip_layout(full) == ("openai", "visual.")
    tower_oa = CLIPVisionTower.from_state_dict(full, heads=TINY.heads)
    tower_hf = CLIPVisionTower.from_state_dict(ref.state_dict(), heads=TINY.heads)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(tower_oa(x), tower_hf(x), rtol=0, atol=0)
    torch.testing.assert_close(tower_oa(x), openai_reference(oa, x, TINY.heads), rtol=1e-4, atol=1e-4)


def test_full_hf_clip_checkpoint_text_keys_ignored():
    sd = {**random_tower().state_dict(), "text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
          "text_projection.weight": torch.zeros(2, 2), "logit_scale": torch.ones(())}
    assert CLIPVisionTower.from_state_dict(sd, heads=2).cfg == TINY


def test_full_vit_l14_key_set_on_meta():
    """The real ViT-L/14 key/shape set (HF and OpenAI) is accepted; nothing is allocated."""
    hf = {k: torch.empty(s, device="meta") for k, s in hf_clip_shapes(CLIPVisionConfig()).items()}
    assert len(hf) == 392 and hf["vision_model.encoder.layers.23.mlp.fc1.weight"].shape == (4096, 1024)
    for sd in (hf, hf_to_openai(hf)):
        tower = CLIPVisionTower.from_state_dict(sd)
        assert tower.cfg == CLIPVisionConfig()  # width 1024, 24 layers, 16 heads, patch 14, 224, proj 768
        assert tower.image_embeds(torch.empty(1, 3, 512, 512, device="meta")).shape == (1, 768)


def test_infer_config_defaults():
    cfg = infer_clip_config(to_hf_clip_state_dict(random_tower().state_dict()))
    got = (cfg.width, cfg.layers, cfg.heads, cfg.patch, cfg.image_size, cfg.proj_dim, cfg.mlp_width)
    assert got == (64, 2, 1, 8, 32, 16, 256)
    assert cfg.activation == "quick_gelu"
    nproj = {k: v for k, v in random_tower().state_dict().items() if k != "visual_projection.weight"}
    tower = CLIPVisionTower.from_state_dict(nproj, heads=2, activation="gelu")
    assert tower.cfg.proj_dim is None and tower.cfg.activation == "gelu"
    assert tower.image_embeds(torch.rand(1, 3, 32, 32)).shape == (1, 64)


def test_vit_h14_defaults_on_meta():
    """LAION ViT-H/14 (ComfyUI's clip_vision_h): 16 heads of 80 and gelu, read off the width."""
    cfg = CLIPVisionConfig(width=1280, layers=32, heads=16, mlp_width=5120, proj_dim=1024, activation="gelu")
    sd = {k: torch.empty(s, device="meta") for k, s in hf_clip_shapes(cfg).items()}
    assert CLIPVisionTower.from_state_dict(sd).cfg == cfg


def test_clip_preprocess():
    I = torch.rand(2, 3, 48, 80)
    x = clip_preprocess(I, size=32)
    assert x.shape == (2, 3, 32, 32)
    J = torch.rand(1, 3, 32, 32)  # already the right size: only normalised
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(J, 32), (J - mean) / std)
    # a constant image stays constant through resize and crop
    c = clip_preprocess(torch.full((1, 3, 70, 45), 0.3), 32)
    torch.testing.assert_close(c, ((0.3 - mean) / std).expand(1, 3, 32, 32), rtol=1e-4, atol=1e-4)


def test_preprocess_gradcheck():
    I = torch.rand(1, 3, 12, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda I: clip_preprocess(I, 6), (I,))


def test_errors_unknown_layout():
    with pytest.raises(ValueError, match="no CLIP vision tower.*HF/ComfyUI layout.*OpenAI layout.*"
                                         "First keys: \\['foo'"):
        CLIPVisionTower.from_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(TypeError, match="sd must be a mapping"):
        CLIPVisionTower.from_state_dict([("a", torch.zeros(1))])


def test_errors_missing_extra_and_shape():
    sd = random_tower().state_dict()
    missing = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match="missing \\['vision_model.encoder.layers.1.mlp.fc2.bias'\\]"):
        CLIPVisionTower.from_state_dict(missing, heads=2)
    with pytest.raises(ValueError, match="unexpected keys.*'foo.bar'"):
        CLIPVisionTower.from_state_dict({**sd, "foo.bar": torch.zeros(1)}, heads=2)
    with pytest.raises(ValueError, match="extra \\['vision_model.encoder.layers.0.mlp.fc3.weight'\\]"):
        CLIPVisionTower.from_state_dict({**sd, "vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(1)}, heads=2)
    bad = {**sd, "vision_model.encoder.layers.0.self_attn.k_proj.weight": torch.zeros(64, 63)}
    with pytest.raises(ValueError, match="k_proj.weight' must have shape \\(64, 64\\), got \\(64, 63\\)"):
        CLIPVisionTower.from_state_dict(bad, heads=2)
    with pytest.raises(ValueError, match="heads"):
        CLIPVisionTower.from_state_dict(sd, heads=3)  # 64 % 3


def test_errors_openai_layout():
    oa = hf_to_openai(random_tower().state_dict())
    with pytest.raises(ValueError, match="unexpected keys.*OpenAI layout.*'visual.transformer.resblocks.0.attn.foo'"):
        CLIPVisionTower.from_state_dict({**oa, "visual.transformer.resblocks.0.attn.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*OpenAI layout.*'visual.extra'"):
        CLIPVisionTower.from_state_dict({**oa, "visual.extra": torch.zeros(1)})
    del oa["visual.ln_post.bias"]
    with pytest.raises(ValueError, match="missing \\['vision_model.post_layernorm.bias'\\]"):
        CLIPVisionTower.from_state_dict(oa)


def test_config_validation():
    with pytest.raises(ValueError, match="activation"):
        CLIPVisionConfig(activation="relu")
    with pytest.raises(ValueError, match="image_size"):
        CLIPVisionConfig(image_size=225)
    with pytest.raises(TypeError, match="cfg must be a CLIPVisionConfig"):
        CLIPVisionTower({"width": 64})


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
MEAN, STD = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
TINY_1LAYER = CLIPVisionConfig(width=64, layers=1, heads=2, patch=8, image_size=32, proj_dim=16, mlp_width=128)


def test_a_wide_image_is_centre_cropped_not_squashed():
    # shorter side already 32: the resize is the identity, then the middle 32 of 64 columns are kept
    I = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip_preprocess(I, 32), (I[..., 16:48] - MEAN) / STD, rtol=1e-5, atol=1e-5)
    # a tall one: the middle rows
    J = I.transpose(-1, -2)
    torch.testing.assert_close(clip_preprocess(J, 32), (J[..., 16:48, :] - MEAN) / STD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_are_preprocessed_in_fp32(dtype):
    torch.manual_seed(0)
    tower = CLIPVisionTower(TINY_1LAYER).eval()
    I = torch.rand(1, 3, 40, 48)
    e = tower.image_embeds(I.to(dtype))  # antialiased bicubic has no half kernel on CPU
    torch.testing.assert_close(e, tower.image_embeds(I.to(dtype).float()))


def test_a_state_dict_with_two_towers_is_refused():
    w = torch.zeros(64, 3, 8, 8)
    sd = {"a.embeddings.patch_embedding.weight": w, "b.embeddings.patch_embedding.weight": w}
    with pytest.raises(ValueError, match="holds 2 CLIP vision towers"):
        detect_clip_layout(sd)


# ------------------------------------------------------------------ aesthetic


def test_an_aesthetic_head_of_another_width_than_the_tower_is_refused_when_built():
    with pytest.raises(ValueError, match="aesthetic head takes 8-d embeddings but the CLIP tower gives 16-d ones"):
        AestheticReward(CLIPVisionTower(TINY_1LAYER), AestheticHead((8, 4, 4, 4, 4)))


def test_the_aesthetic_score_has_the_images_dtype():
    torch.manual_seed(0)
    r = AestheticReward(CLIPVisionTower(TINY_1LAYER), AestheticHead((16, 8, 8, 4, 4)))  # fp32 weights
    assert r(torch.rand(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


# ------------------------------------------------------------------ safety margin, by hand

LN2 = 0.6931471805599453


def _margin(special, adjustment=0.0, e=(3.0, 0.0)):
    """Two identical concepts at cos 1 with threshold 0.5 (unnormalised vectors: only directions count)."""
    return safety_score(torch.tensor([e]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5]),
                        torch.tensor([special]), torch.tensor([0.5]), tau=0.01, adjustment=adjustment).item()


def test_safety_margin_is_minus_the_smooth_max_over_concepts():
    # special concept orthogonal: gate sigmoid(-50) ~ 0; both concepts at 1 - 0.5: -tau*logsumexp = -(0.5 + tau ln 2)
    assert _margin([0.0, 5.0]) == pytest.approx(-(0.5 + 0.01 * LN2), abs=1e-6)


def test_a_firing_special_concept_adds_the_full_boost():
    # special concept at cos 1, margin +0.5: gate sigmoid(0.5 / tau) = 1, every concept 0.01 stricter
    assert _margin([1.0, 0.0]) == pytest.approx(-(0.51 + 0.01 * LN2), abs=1e-6)


def test_the_adjustment_moves_the_special_concepts_too():
    # adjustment 0.5 lifts the special margin from -0.5 to 0: gate sigmoid(0) = 1/2, boost 0.005
    assert _margin([0.0, 5.0], adjustment=0.5) == pytest.approx(-(1.005 + 0.01 * LN2), abs=1e-6)


def test_a_safety_rewards_adjustment_reaches_the_margin():
    cfg = CLIPVisionConfig(width=64, layers=1, heads=1, patch=8, image_size=16, proj_dim=2, mlp_width=64)
    r = SafetyReward(CLIPVisionTower(cfg), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5]),
                     torch.tensor([[0.0, 5.0]]), torch.tensor([0.5]), adjustment=0.5)
    assert r.score_embeds(torch.tensor([[3.0, 0.0]])).item() == pytest.approx(-(1.005 + 0.01 * LN2), abs=1e-6)
