"""Saved FocusFix LoRAs load in ComfyUI's stock LoRA path with every key matched, and equal Apply LoRA."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lora_data(comfy, checkpoint):
    return _lora_data(comfy, checkpoint[0])


def _lora_data(comfy, model, diffusers_names=None):
    """A LoraData with random (non-zero) up weights on attn layers, exported by the core's kohya writer, and
    x0 of a fixed input with the LoRA hooked."""
    from_adapters = comfy.pack.nodes.adapters
    LoRA = comfy.pack.focusfix_core.lora.LoRA
    with torch.inference_mode(False):
        lora = LoRA.attach(model.model.diffusion_model, "attn", rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0))
        try:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for a in lora.adapters:
                    a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.5)
            if diffusers_names is None:  # as LoraData.from_trainer writes them: SD1.x/2.x in kohya's diffusers names
                diffusers_names = "SD15" in type(model.model.model_config).__name__
            tensors = lora.state_dict_kohya("lora_unet", diffusers_names=diffusers_names)
            meta = comfy.pack.focusfix_core.lora.lora_metadata(lora, {"focusfix_method": "test"})
            hooked = _x0(model)  # hooks active
        finally:
            lora.remove()
    data = from_adapters.LoraData(tensors=tensors, metadata=meta, rank=2, alpha=1.0, targets=("attn",), method="test")
    return data, hooked


@torch.no_grad()
def _x0(model):
    """x0 of a fixed input through `model` as loaded by ComfyUI (weight patches applied)."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_full_load=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    kw = {}
    if getattr(model.model, "adm_channels", 0):
        kw["y"] = torch.randn(1, model.model.adm_channels, generator=g)
    ctx = torch.randn(1, 77, _context_dim(model), generator=g)
    return model.model.apply_model(x, torch.tensor([2.0]), c_crossattn=ctx, **kw).float().clone()


def _context_dim(model):
    net = model.model.diffusion_model
    return next(m.to_k.in_features for n, m in net.named_modules() if n.endswith("attn2"))


def test_saved_lora_loads_in_stock_loader_and_matches_apply(fresh, checkpoint, lora_data, caplog):
    _loads_in_stock_loader_and_matches_apply(fresh, checkpoint[0], *lora_data, caplog)


def test_layer_names_are_comfyuis_diffusers_names(comfy):
    """`diffusers_unet_names` gives, for every Linear/Conv2d of the SD1.5 and SDXL UNets (real block layouts and
    the tests' tiny ones, on the meta device), the diffusers name ComfyUI's own `unet_to_diffusers` map gives."""
    import sys
    from comfy import ops as comfy_ops
    from comfy import utils as comfy_utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import train_speed as ts
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    names_for = comfy.pack.focusfix_core.lora.diffusers_unet_names
    for key, cfg in ts.UNET_CONFIGS.items():
        net = UNetModel(**cfg, device=torch.device("meta"), operations=comfy_ops.disable_weight_init)
        ldm_to_diffusers = {v: k for k, v in comfy_utils.unet_to_diffusers(cfg).items()}
        name = names_for(net)
        hosts = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                 and not n.startswith("label_emb")]  # SDXL's size embedding: no SD1.x/2.x LoRA names it
        wrong = [(n, name(n)) for n in hosts if ldm_to_diffusers[n + ".weight"] != name(n) + ".weight"]
        assert hosts and not wrong, (key, wrong[:3])


def test_an_sd15_lora_saved_with_ldm_names_still_loads(fresh, checkpoint, caplog):
    """Files FocusFix saved before it wrote kohya's diffusers names for SD1.x (LDM names) still apply and
    continue: both names are read."""
    model = checkpoint[0]
    data, hooked = _lora_data(fresh, model, diffusers_names=False)
    _loads_in_stock_loader_and_matches_apply(fresh, model, data, hooked, caplog)
    lora = data.attach(model.model.diffusion_model)
    try:
        assert lora.state_dict_kohya("lora_unet").keys() == data.tensors.keys()
    finally:
        lora.remove()


def test_refiner_lora_loads_in_stock_loader_and_matches_apply(fresh, tiny_models, caplog):
    """The same for an SDXL refiner's LoRA (its own block layout: attention from level 1, context 1280 in the
    real model)."""
    with torch.inference_mode():
        model = tiny_models.tiny_sdxl_refiner(0)[0]
    _loads_in_stock_loader_and_matches_apply(fresh, model, *_lora_data(fresh, model), caplog)


def _loads_in_stock_loader_and_matches_apply(fresh, model, data, hooked, caplog):
    import comfy.sd
    import comfy.utils
    (name,) = fresh.run("FocusFixSaveLoRA", lora=data, filename="fixes/test", overwrite=False)
    assert name == "fixes/test.safetensors"
    path = fresh.loras / name
    sd = comfy.utils.load_torch_file(str(path))
    assert set(sd) == set(data.tensors)
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(model, None, sd, 0.7, 0)
        (stock_node,) = fresh.run("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=0.7)
    bad = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert not bad, bad
    n_layers = sum(1 for k in sd if k.endswith(".lora_down.weight"))
    assert len(stock.patches) == n_layers
    (applied,) = fresh.run("FocusFixApplyLoRA", model=model, lora=data, strength=0.7)
    base, a, b, c = _x0(model), _x0(applied), _x0(stock), _x0(stock_node)
    assert not torch.allclose(base, a, atol=1e-4), "the LoRA must change the output"
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    (full,) = fresh.run("FocusFixApplyLoRA", model=model, lora=data, strength=1.0)
    torch.testing.assert_close(_x0(full), hooked, rtol=1e-4, atol=1e-4)  # kohya export == the trained hooks
    assert _x0(model).equal(base), "the input MODEL must be left unpatched"


def test_save_metadata_counter_overwrite_and_escape(fresh, lora_data):
    from safetensors import safe_open
    data, _ = lora_data
    names = [fresh.run("FocusFixSaveLoRA", lora=data, filename="fix", overwrite=False)[0] for _ in range(2)]
    assert names == ["fix.safetensors", "fix_00001.safetensors"]
    assert fresh.run("FocusFixSaveLoRA", lora=data, filename="fix", overwrite=True)[0] == "fix.safetensors"
    with safe_open(str(fresh.loras / "fix.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1" and meta["focusfix_method"] == "test"
    for bad in ("../evil", "/tmp/evil", "a/../../evil"):
        with pytest.raises(ValueError, match="must stay inside"):
            fresh.run("FocusFixSaveLoRA", lora=data, filename=bad, overwrite=False)
    assert not list(fresh.tmp.rglob("evil*"))
    assert not [p for p in fresh.loras.rglob("*") if p.name.endswith(".tmp")]


def test_save_with_overwrite_keeps_a_read_only_lora_or_preview(fresh, lora_data):
    """Save LoRA with overwrite on replaced a LoRA the artist marked read-only on Linux and macOS (Windows
    refuses): it is kept, and the error says how to replace it. A read-only thumbnail keeps its LoRA too (the LoRA
    was replaced, then the node failed on the preview, review of session 19)."""
    data, _ = lora_data
    preview = torch.zeros(1, 8, 8, 3)
    assert fresh.run("FocusFixSaveLoRA", lora=data, filename="kept", overwrite=False,
                     preview=preview)[0] == "kept.safetensors"
    path, thumb = fresh.loras / "kept.safetensors", fresh.loras / "kept.preview.png"
    before = path.read_bytes(), thumb.read_bytes()
    for marked in (path, thumb):
        marked.chmod(0o444)
        try:
            for kw in ({"preview": torch.ones(1, 8, 8, 3)}, {}):  # a new thumbnail, or none (the old one removed)
                with pytest.raises(PermissionError, match="it is read-only, and was kept: make it writable") as e:
                    fresh.run("FocusFixSaveLoRA", lora=data, filename="kept", overwrite=True, **kw)
                assert e.value.filename == str(marked)
                assert (path.read_bytes(), thumb.read_bytes()) == before  # neither written
        finally:
            marked.chmod(0o644)


def test_save_writes_the_preview_beside_the_lora_and_keeps_a_strangers(fresh, lora_data):
    """preview -> <name>.preview.png (the first image, 8-bit), also under a counter name; an existing image that
    the save did not write is kept unless overwrite is on: its name is taken (the LoRA gets the next free name,
    so it never pairs with a thumbnail that is not its own)."""
    import numpy as np
    from PIL import Image
    data, _ = lora_data
    save = fresh.node("FocusFixSaveLoRA")()
    images = torch.rand(2, 24, 32, 3, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        with torch.inference_mode():
            out = save.execute(lora=data, filename="fixes/thumb", preview=images, **kw)
        return out["result"][0], out["ui"]["text"][0]
    assert run(overwrite=False) == ("fixes/thumb.safetensors", "fixes/thumb.safetensors")
    png = np.asarray(Image.open(fresh.loras / "fixes" / "thumb.preview.png"))
    assert png.shape == (24, 32, 3)
    assert np.abs(png.astype(int) - (images[0].numpy() * 255).round().astype(int)).max() == 0
    assert run(overwrite=False)[0] == "fixes/thumb_00001.safetensors"
    assert (fresh.loras / "fixes" / "thumb_00001.preview.png").is_file()
    stranger = fresh.loras / "fixes" / "mine.preview.png"
    Image.new("RGB", (4, 4)).save(stranger)
    with torch.inference_mode():
        out = save.execute(lora=data, filename="fixes/mine", preview=images, overwrite=False)
    assert out["result"][0] == "fixes/mine_00001.safetensors" and "kept" not in out["ui"]["text"][0]
    assert Image.open(stranger).size == (4, 4) and not (fresh.loras / "fixes" / "mine.safetensors").exists()
    assert Image.open(fresh.loras / "fixes" / "mine_00001.preview.png").size == (32, 24)
    with torch.inference_mode():
        save.execute(lora=data, filename="fixes/mine", preview=images, overwrite=True)
    assert Image.open(stranger).size == (32, 24)
    assert not [p for p in fresh.loras.rglob("*") if p.name.endswith(".tmp")]


def test_apply_refuses_a_lora_for_another_layout(comfy, fresh, checkpoint, lora_data):
    data, _ = lora_data
    sd15 = "SD15" in type(checkpoint[0].model.model_config).__name__
    other = fresh.run("FocusFixTestTinyCheckpoint", layout="sdxl" if sd15 else "sd15", seed=0)[0]
    with pytest.raises(ValueError, match=r"match no layer of this MODEL \(trained on another model type\?\)"):
        fresh.run("FocusFixApplyLoRA", model=other, lora=data, strength=1.0)
    # a LoRA whose metadata names its base (as every LoRA FocusFix trains): both families named
    family = "sd1" if sd15 else "sdxl"
    data = dataclasses.replace(data, metadata={**data.metadata,
                                               **comfy.pack.focusfix_core.lora.base_model_metadata(family)})
    trained, model = ("SD1.x", "SDXL") if sd15 else ("SDXL", "SD1.x")
    with pytest.raises(ValueError, match=rf"match no layer of this MODEL \(this LoRA was trained on {trained}, "
                                         rf"this MODEL is {model}\)"):
        fresh.run("FocusFixApplyLoRA", model=other, lora=data, strength=1.0)


def test_apply_refuses_a_lora_of_other_shapes(fresh, checkpoint, lora_data):
    """Same layer names, another text width (an SD1.5 LoRA on SD2.x): ComfyUI would skip those layers while
    sampling with a log line only, so the fix would be applied in part; Apply LoRA refuses it by name."""
    data, _ = lora_data
    tensors = dict(data.tensors)
    key = next(k for k in tensors if "attn2_to_k" in k and k.endswith(".lora_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    other = type(data)(tensors=tensors, metadata=data.metadata, rank=data.rank, alpha=data.alpha,
                       targets=data.targets, method=data.method)
    with pytest.raises(ValueError, match="LoRA layers have another shape than this MODEL's"):
        fresh.run("FocusFixApplyLoRA", model=checkpoint[0], lora=other, strength=1.0)


def test_save_refuses_a_wrong_preview_before_writing_anything(fresh, lora_data):
    data, _ = lora_data
    before = set(fresh.loras.rglob("*"))
    with pytest.raises(ValueError, match=r"preview must be an IMAGE .* got shape \(1, 8, 8\) \(a MASK\?"):
        fresh.run("FocusFixSaveLoRA", lora=data, filename="masked", overwrite=False, preview=torch.ones(1, 8, 8))
    assert set(fresh.loras.rglob("*")) == before


def _a1111_version(meta: dict) -> str:
    """How A1111 and Forge file a LoRA (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version): their
    Lora tab hides a LoRA whose version differs from the loaded checkpoint's."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


@pytest.mark.parametrize("kind, family, version", [("sd15", "sd1", "SD1"), ("sdxl", "sdxl", "SDXL"),
                                                   ("refiner", "sdxl_refiner", "SDXL"), ("sd2_v", "sd2", "SD2")])
def test_saved_lora_names_its_base_model_for_other_uis(fresh, tiny_models, kind, family, version):
    """A trained LoRA's file says which base model it is for (kohya's ss_base_model_version / ss_v2, the SAI model
    spec's architecture), so A1111/Forge show an SDXL fix for SDXL checkpoints; before, every FocusFix LoRA read
    as SD1 there and was hidden while an SDXL checkpoint was loaded."""
    from safetensors import safe_open
    with torch.inference_mode():
        if kind == "refiner":
            model, clip = tiny_models.tiny_sdxl_refiner(0)
        else:
            model, clip, _ = tiny_models.tiny_checkpoint("sdxl" if kind == "sdxl" else "sd15", 0)
        vae = tiny_models.tiny_vae(0)
    if kind == "sd2_v":  # a v-prediction SD 2.x: the SD20 config and sampling ComfyUI detects for 768-v
        import comfy.supported_models
        model.model.model_config.__class__ = comfy.supported_models.SD20
        model = fresh.run("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=False)[0]
    (reward,) = fresh.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    lora = fresh.run("FocusFixTrainFocusNFix", model=model, clip=clip, vae=vae, reward=reward, prompts="a cat",
                     negative_prompt="", seeds="0", width=64, height=48, steps=2, cfg=3.0, K=1, lam=1.0,
                     mask_source="heatmap", rank=2, targets="attn", lr=1e-3, iterations=1, seed=0)[0]
    (name,) = fresh.run("FocusFixSaveLoRA", lora=lora, filename=f"base_{kind}", overwrite=False)
    with safe_open(str(fresh.loras / name), "pt") as f:
        meta = f.metadata()
    assert _a1111_version(meta) == version
    arch = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base",
            "sdxl_refiner": "stable-diffusion-xl-v1-refiner", "sd2": "stable-diffusion-v2-768-v"}[family]
    assert meta["modelspec.architecture"] == f"{arch}/lora" and meta["modelspec.resolution"] == "64x48"
    assert meta["modelspec.prediction_type"] == ("v" if kind == "sd2_v" else "epsilon")
