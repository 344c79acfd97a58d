"""nodes/adapters.py behaviours the layout tests do not hold, without ComfyUI: outputs handed to ComfyUI carry no
autograd graph, a CONDITIONING entry's shape is refused exactly, `training_session` swaps the inference-mode weights
for plain frozen copies and back, and `release_idle_models` keeps the run's own models. `comfy.model_management` is
a stand-in (as in tests/test_nodes_common.py)."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from pack_loader import load_pack

A = load_pack().nodes.adapters


def test_images_and_masks_handed_to_comfyui_carry_no_autograd_graph():
    # Save Image / Preview Image call .numpy(), which refuses a tensor that requires grad
    I = torch.rand(2, 3, 4, 4, requires_grad=True) * 1.0
    out = A.bchw_to_image(I)
    assert not out.requires_grad and out.grad_fn is None
    M = torch.rand(2, 1, 4, 4, requires_grad=True) * 1.0
    assert not A.b1hw_to_mask(M).requires_grad


def test_a_conditioning_entry_with_more_than_a_text_encoding_and_a_dict_is_refused_by_name():
    # a custom node's malformed entry is refused, not guessed: [tensor, dict, extra] is no CONDITIONING entry
    ctx = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match=r"^positive entry 0 is not a CONDITIONING entry .*got tensor \[1, 4, 8\], "
                                         r"dict, str"):
        A.check_conditioning([[ctx, {}, "extra"]], "positive")
    A.check_conditioning([[ctx]], "positive")  # [text encoding] alone is fine


def _mm_stub(monkeypatch, **attrs):
    comfy, mm = types.ModuleType("comfy"), types.ModuleType("comfy.model_management")
    mm.soft_empty_cache = lambda *a, **k: None
    for k, v in attrs.items():
        setattr(mm, k, v)
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


def test_training_session_gives_frozen_plain_weights_and_makes_them_inference_tensors_again(monkeypatch):
    # ComfyUI builds its weights in inference mode: autograd cannot save them, so the session swaps in plain copies
    # that take no gradient themselves (only the LoRA trains), and hands ComfyUI inference tensors again afterwards
    _mm_stub(monkeypatch)
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loaded = []
    dm = types.SimpleNamespace(load=lambda: loaded.append(True), modules_in_gradient_path=lambda: [net])
    with A.training_session(dm):
        assert loaded == [True]
        assert all(not p.is_inference() and not p.requires_grad for p in net.parameters())
        extra = torch.ones(4, requires_grad=True)  # a LoRA-like trainable tensor in the gradient path
        net(torch.rand(2, 4) * extra).sum().backward()
        assert extra.grad is not None and all(p.grad is None for p in net.parameters())
    assert all(p.is_inference() for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, True]  # as nn.Linear built them


def test_training_session_restores_the_weights_after_an_error(monkeypatch):
    _mm_stub(monkeypatch)
    with torch.inference_mode():
        net = torch.nn.Linear(4, 4)
    dm = types.SimpleNamespace(load=lambda: None, modules_in_gradient_path=lambda: [net])
    with pytest.raises(RuntimeError, match="boom"), A.training_session(dm):
        raise RuntimeError("boom")
    assert all(p.is_inference() for p in net.parameters())


class _Patcher:
    def __init__(self, name, clone_of=None, patched=()):
        self.name, self.clone_of, self.patched = name, clone_of, list(patched)

    def is_clone(self, other):
        return self.clone_of is other or other.clone_of is self

    def model_patches_models(self):
        return self.patched


def test_release_idle_models_unloads_only_what_the_run_does_not_use(monkeypatch):
    # the run's MODEL, a clone sharing its weights, its VAE and a model patched onto it stay; an idle text encoder
    # goes (it would sit beside the training step's activations for the whole run)
    unet = _Patcher("unet")
    clone, vae, patch, text = _Patcher("clone", clone_of=unet), _Patcher("vae"), _Patcher("patch"), _Patcher("clip")
    unet.patched = [patch]
    loaded = [types.SimpleNamespace(model=m) for m in (unet, clone, vae, patch, text)]
    freed = []

    def free_memory(memory, device, keep_loaded=()):
        gone = [lm for lm in loaded if lm not in keep_loaded]
        freed.extend(lm.model.name for lm in gone)
        return gone

    _mm_stub(monkeypatch, current_loaded_models=loaded, free_memory=free_memory,
             get_torch_device=lambda: torch.device("cpu"))
    dm = types.SimpleNamespace(patcher=unet, vae=types.SimpleNamespace(patcher=vae))
    assert A.release_idle_models(dm) == 1 and freed == ["clip"]


def _attention_stub(monkeypatch):
    """comfy.ldm.modules.attention with PyTorch SDPA's and a backward-less kernel's names."""
    names = ("comfy", "comfy.ldm", "comfy.ldm.modules", "comfy.ldm.modules.attention")
    mods = {n: types.ModuleType(n) for n in names}
    for parent, child in zip(names, names[1:]):
        setattr(mods[parent], child.rsplit(".", 1)[-1], mods[child])
        monkeypatch.setitem(sys.modules, parent, mods[parent])
    monkeypatch.setitem(sys.modules, names[-1], mods[names[-1]])

    def attention_pytorch(q, k, v):
        return "pytorch"

    def attention_sage(q, k, v):
        return "sage"

    mods[names[-1]].attention_pytorch = attention_pytorch
    return attention_pytorch, attention_sage


def test_the_training_attention_override_swaps_in_sdpa_and_keeps_another_nodes_override(monkeypatch):
    # a kernel without backward (sage, flash) is replaced by PyTorch SDPA; an override another node set on the
    # MODEL still runs around whichever kernel is chosen
    attention_pytorch, attention_sage = _attention_stub(monkeypatch)
    override = A._attention_with_backward()
    assert override(attention_sage, 1, 2, 3) == "pytorch"
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(func.__name__)
        return "previous:" + func(*args, **kwargs)

    chained = A._attention_with_backward(previous)
    assert chained(attention_sage, 1, 2, 3) == "previous:pytorch" and seen == ["attention_pytorch"]


# ---------------------------------------------------------------- ComfyDiffusionModel's checks on its inputs
class SD15:  # the model_config class ComfyUI detected (its name is the MODEL's name in messages)
    unet_config = {"context_dim": 8}


def _patcher(in_channels=4, latent_channels=4, concat_keys=()):
    """A ModelPatcher stand-in: an SD-style UNet (input/middle/output blocks) with `in_channels`, eps sampling."""
    net = torch.nn.Module()
    net.input_blocks, net.middle_block, net.output_blocks = (torch.nn.ModuleList() for _ in range(3))
    net.in_channels = in_channels
    base = types.SimpleNamespace(diffusion_model=net, model_config=SD15(), concat_keys=concat_keys, adm_channels=0)
    objects = {"model_sampling": types.SimpleNamespace(sigmas=torch.linspace(0.03, 14.6, 10), sigma_max=14.6),
               "latent_format": types.SimpleNamespace(latent_channels=latent_channels)}
    return types.SimpleNamespace(model=base, get_model_object=objects.__getitem__, model_options={})


def test_a_unet_taking_more_channels_than_the_latents_is_refused_by_name():
    # an image-conditioned UNet (latents + image/mask channels) cannot sample from noise alone, with or without
    # ComfyUI's concat_keys on it
    assert A.ComfyDiffusionModel(_patcher()).latent_channels == 4
    with pytest.raises(ValueError, match=r"this MODEL \(SD15\) is an inpainting or image-conditioned model: its UNet "
                                         r"takes 9 input channels, the 4 latent channels"):
        A.ComfyDiffusionModel(_patcher(in_channels=9))


@pytest.mark.parametrize("channels, dims, match", [
    (16, 2, r"this VAE decodes 16-channel latents, but the MODEL \(SD15\) makes 4-channel image latents"),
    (4, 3, r"this VAE decodes 4-channel video latents, but the MODEL \(SD15\) makes 4-channel image latents"),
])
def test_a_vae_for_other_latents_or_video_is_refused_by_name(channels, dims, match):
    # else the decode would fail deep in torch after the before images were sampled
    vae = types.SimpleNamespace(latent_channels=channels, latent_dim=dims, downscale_ratio=8)
    with pytest.raises(ValueError, match=match):
        A.ComfyDiffusionModel(_patcher(), vae=vae)
    ok = A.ComfyDiffusionModel(_patcher(), vae=types.SimpleNamespace(latent_channels=4, latent_dim=2,
                                                                     downscale_ratio=16))
    assert ok.latent_scale == 16


def test_compute_dtypes_name_the_unets_and_the_vaes():
    # an fp16 VAE behind an fp32 UNet is in the gradient path too: the trainer's loss scaling must see it
    p = _patcher()
    p.model.manual_cast_dtype, p.model.get_dtype = None, lambda: torch.float32
    vae = types.SimpleNamespace(latent_channels=4, latent_dim=2, downscale_ratio=8, vae_dtype=torch.float16)
    assert A.ComfyDiffusionModel(p, vae=vae).compute_dtypes == (torch.float32, torch.float16)
    p.model.manual_cast_dtype = torch.bfloat16  # fp8-stored weights compute in the manual-cast dtype
    assert A.ComfyDiffusionModel(p).compute_dtypes == (torch.bfloat16,)


def test_sdxl_size_conditioning_is_the_latents_size_in_pixels_height_and_width_apart():
    # KSampler embeds width = 8 x latent width and height = 8 x latent height: a landscape image must not get a
    # portrait's size embedding
    p = _patcher()
    calls = []

    def encode_adm(pooled_output, prompt_type, **kw):
        calls.append(kw)
        return torch.zeros(1, 3)

    p.model.encode_adm, p.model.adm_channels = encode_adm, 3
    dm = A.ComfyDiffusionModel(p)
    dm._adm(torch.zeros(2, 5), (8, 12))
    assert calls == [{"width": 96, "height": 64}] * 2
    calls.clear()
    given = torch.tensor([[1024.0, 768.0, 0.0, 16.0, -1.0, -1.0, -1.0]])  # CLIPTextEncodeSDXL's, targets not given
    dm._adm(torch.zeros(1, 5), (8, 12), given)
    assert calls == [{"width": 1024, "height": 768, "crop_w": 0, "crop_h": 16}]


def test_an_entry_without_size_conditioning_beside_one_with_it_gets_the_latents_size():
    # Conditioning Combine of a CLIPTextEncodeSDXL entry (sizes given) and a plain CLIP Text Encode entry: the plain
    # one is drawn at the image's own size, as KSampler does, not at width/height 0
    p = _patcher()
    calls = []
    p.model.encode_adm = lambda pooled_output, prompt_type, **kw: calls.append(kw) or torch.zeros(1, 3)
    p.model.adm_channels = 3
    dm = A.ComfyDiffusionModel(p)
    ctx, pooled = torch.zeros(1, 4, 8), torch.zeros(1, 5)
    sized = {"pooled_output": pooled, "width": 1024, "height": 768, "crop_w": 0, "crop_h": 0, "target_width": 1024,
             "target_height": 768}
    conds = A.conditioning_to_conds([[ctx, sized], [ctx, {"pooled_output": pooled}]], True)
    for c in conds:
        dm._adm(c["pooled"], (8, 12), c.get("adm_args"))
    assert calls[1] == {"width": 96, "height": 64}
    assert calls[0] == {"width": 1024, "height": 768, "crop_w": 0, "crop_h": 0, "target_width": 1024,
                        "target_height": 768}


class _Vocab:
    """A tokenizer stand-in (no byte-level BPE): id -> token text."""

    def __init__(self, words):
        self.words = words

    def convert_ids_to_tokens(self, i):
        return self.words[i]


def test_tokens_after_an_embedding_the_encoder_leaves_out_keep_their_positions_in_later_chunks():
    # ComfyUI's encoder drops an embedding of another width and pads that chunk at its end: every later chunk's
    # tokens (a prompt longer than 77 tokens) keep their context positions, so a word there is found where it is
    words = ["<start>", "<end>", "a", "photo", "cat", "<pad>"]
    wrong = torch.zeros(1, 16)  # an SD2/SDXL embedding on an 8-wide text encoder: left out
    chunks = {"l": [[(0, 1.0), (2, 1.0), (wrong, 1.0), (3, 1.0), (1, 1.0)],
                    [(0, 1.0), (4, 1.0), (1, 1.0), (5, 1.0), (5, 1.0)]]}
    emb = types.SimpleNamespace(weight=torch.zeros(10, 8))
    clip = types.SimpleNamespace(
        tokenize=lambda prompt: chunks,
        tokenizer=types.SimpleNamespace(clip_l=types.SimpleNamespace(tokenizer=_Vocab(words))),
        cond_stage_model=types.SimpleNamespace(clip_l=types.SimpleNamespace(
            transformer=types.SimpleNamespace(get_input_embeddings=lambda: emb))))
    dm = A.ComfyDiffusionModel(_patcher(), clip=clip)
    tokens = dm.tokens("a photo <embedding> ... cat")
    assert len(tokens) == 10 and tokens[:5] == ["<start>", "a", "photo", "<end>", "<pad>"]
    assert tokens.index("cat") == 6


def test_load_reward_refuses_an_unknown_precision_by_name():
    # an API prompt skips ComfyUI's combo check: 'fp16' must be refused, not silently loaded in fp32 (built-ins)
    with pytest.raises(ValueError, match=r"^precision must be one of \['fp32', 'bf16'\], got 'fp16'"):
        A.load_reward_by_name("builtin:sharpness", precision="fp16")
    assert A.load_reward_by_name("builtin:sharpness", precision="bf16").name == "sharpness"


@pytest.mark.parametrize("width, height", [(100, 64), (64, 100)])
def test_attention_maps_refuse_a_size_that_is_no_multiple_of_the_latent_scale(width, height):
    # the latents would be cut to a smaller size without a word (100 px -> 12 latents = 96 px)
    dm = types.SimpleNamespace(latent_scale=8)
    with pytest.raises(ValueError, match=rf"^width and height must be multiples of 8 for this model, got "
                                         rf"{width}x{height}"):
        A.prompt_attention_maps(dm, "a cat", ["cat"], seed=0, steps=1, cfg_scale=1.0, width=width, height=height)
