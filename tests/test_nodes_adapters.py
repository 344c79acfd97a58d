"""ComfyUI layout conversions and node helpers, without ComfyUI."""
from __future__ import annotations

import re

import pytest
import torch
from pack_loader import load_pack

A = load_pack().nodes.adapters
C = load_pack().nodes.common


def test_image_roundtrip_and_alpha():
    image = torch.rand(2, 8, 6, 4)  # RGBA
    I = A.image_to_bchw(image)
    assert I.shape == (2, 3, 8, 6)
    back = A.bchw_to_image(I)
    assert back.shape == (2, 8, 6, 3) and torch.equal(back, image[..., :3])
    assert A.image_to_bchw(torch.rand(8, 6, 1)).shape == (1, 3, 8, 6)


def test_non_finite_pixels_leave_as_black_or_white_and_the_train_report_names_them():
    """A LoRA that draws NaN gave an IMAGE holding NaN (Save Image casts it to an arbitrary byte); NaN is now 0,
    and the Train node's report names the images."""
    I = torch.rand(3, 3, 4, 4)
    I[1, 0, 0, 0], I[1, 1, 0, 0], I[1, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    out = A.bchw_to_image(I)
    assert torch.isfinite(out).all() and out[1, 0, 0].tolist() == [0.0, 1.0, 0.0]
    train = load_pack().nodes.train_nodes
    assert train._non_finite_notes(I[[0, 2]]) == []
    (note,) = train._non_finite_notes(I)
    assert note.startswith("WARNING: with the LoRA, image(s) [1] of 3 hold NaN or inf pixels")


@pytest.mark.parametrize("bad", [torch.rand(2, 8), torch.rand(1, 8, 8, 2)])
def test_image_bad_shape(bad):
    with pytest.raises(ValueError, match="IMAGE"):
        A.image_to_bchw(bad)


def test_mask_shapes_resize_note_and_batch():
    M, note = A.mask_to_b1hw(torch.ones(4, 4))
    assert M.shape == (1, 1, 4, 4) and note == ""
    M, note = A.mask_to_b1hw(torch.ones(1, 4, 4), size=(8, 8), batch=3)
    assert M.shape == (3, 1, 8, 8) and "resized from 4x4 to 8x8" in note
    with pytest.raises(ValueError, match="4x4 but the images are 8x8"):
        A.mask_to_b1hw(torch.ones(1, 4, 4), size=(8, 8), resize=False)
    with pytest.raises(ValueError, match="2 masks but there are 3 images"):
        A.mask_to_b1hw(torch.ones(2, 4, 4), batch=3)
    assert A.b1hw_to_mask(torch.rand(2, 1, 4, 4)).shape == (2, 4, 4)


def test_parse_helpers():
    assert C.parse_ints("0, 2 5-7") == [0, 2, 5, 6, 7]
    with pytest.raises(ValueError, match="seeds: 'x'"):
        C.parse_ints("1, x")
    with pytest.raises(ValueError, match="seeds is empty"):
        C.parse_ints(" ")
    assert C.parse_lines("a\n\n # comment\n b ") == ["a", "b"]
    with pytest.raises(ValueError, match="prompts is empty"):
        C.parse_lines("\n  \n")


def test_lora_data_needs_tensors():
    with pytest.raises(ValueError, match="at least one"):
        A.LoraData(tensors={})


def test_save_lora_data_refuses_escape_and_counts(tmp_path):
    save = load_pack().nodes.lora_nodes.save_lora_data
    data = A.LoraData(tensors={"lora_unet_a.lora_down.weight": torch.zeros(2, 4),
                               "lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.alpha": torch.tensor(2.0)})
    assert save(data, "fix", folder=tmp_path).name == "fix.safetensors"
    assert save(data, "fix", folder=tmp_path).name == "fix_00001.safetensors"
    assert save(data, "fix", overwrite=True, folder=tmp_path).name == "fix.safetensors"
    for bad in ("../x", "/abs/x", "a/../../x"):
        with pytest.raises(ValueError, match="must stay inside"):
            save(data, bad, folder=tmp_path)


def test_save_lora_data_saves_into_a_symlinked_subfolder(tmp_path):
    """An artist's loras/shared linked to another drive takes saves (ComfyUI's own saves allow it)."""
    save = load_pack().nodes.lora_nodes.save_lora_data
    data = A.LoraData(tensors={"lora_unet_a.lora_down.weight": torch.zeros(2, 4),
                               "lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.alpha": torch.tensor(2.0)})
    (tmp_path / "loras").mkdir(), (tmp_path / "drive").mkdir()
    (tmp_path / "loras" / "shared").symlink_to(tmp_path / "drive", target_is_directory=True)
    path = save(data, "shared/fix", folder=tmp_path / "loras")
    assert path.parent.name == "shared" and (tmp_path / "drive" / "fix.safetensors").is_file()


def test_save_lora_data_moves_on_when_another_save_takes_the_name(tmp_path, monkeypatch):
    """Two ComfyUIs on one loras folder: the name Save LoRA found free is taken before its file lands. The other
    file is kept and this save goes to the next free name."""
    nodes = load_pack().nodes.lora_nodes
    data = A.LoraData(tensors={"lora_unet_a.lora_down.weight": torch.zeros(2, 4),
                               "lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.alpha": torch.tensor(2.0)})
    real = nodes.lora_path

    def racing_lora_path(*a, **k):
        path = real(*a, **k)
        if path.name == "fix.safetensors":
            path.write_bytes(b"theirs")  # the other ComfyUI saves under this name right after we looked
        return path

    monkeypatch.setattr(nodes, "lora_path", racing_lora_path)
    assert nodes.save_lora_data(data, "fix", folder=tmp_path).name == "fix_00001.safetensors"
    assert (tmp_path / "fix.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix.safetensors", "fix_00001.safetensors"]


# ------------------------------------------------------------------------ bad IMAGE / MASK inputs (review std, 10, 11)
@pytest.mark.parametrize("image, match", [
    (torch.rand(0, 16, 16, 3), r"before is an empty batch \(shape \(0, 16, 16, 3\)\): expected at least 1 image"),
    (torch.rand(1, 1, 1, 3), r"before is 1x1 pixels \(HxW\): expected at least 8 on each side"),
    (torch.rand(1, 16, 4, 3), r"before is 16x4 pixels"),
    ((torch.rand(1, 16, 16, 3) * 255).to(torch.uint8), r"before must be a float IMAGE with values in \[0,1\].*uint8"),
    (torch.full((2, 16, 16, 3), float("nan")).index_fill(0, torch.tensor([0]), 0.5), r"before has NaN or inf values "
     r"\(image\(s\) \[1\] of 2\)"),
])
def test_image_refuses_empty_tiny_integer_and_nonfinite_naming_the_input_review10(image, match):
    with pytest.raises(ValueError, match=match):
        A.image_to_bchw(image, "before", min_side=8)


def test_image_min_side_defaults_to_one_pixel_review10():
    """Save LoRA's preview takes any size: only the reward nodes ask for a minimum."""
    assert A.image_to_bchw(torch.rand(1, 1, 1, 3), "preview").shape == (1, 3, 1, 1)
    assert A.image_to_bchw(torch.rand(1, 8, 8, 3, dtype=torch.float16)).dtype == torch.float32


@pytest.mark.parametrize("mask, match", [
    (torch.full((1, 8, 8), float("nan")), r"mask has NaN or inf values \(shape \(1, 8, 8\)\)"),
    (torch.rand(0, 8, 8), r"mask is empty \(shape \(0, 8, 8\)\)"),
    (torch.ones(1, 8, 8, dtype=torch.uint8) * 255, r"mask must be a float MASK with values in \[0,1\].*uint8"),
    # audit: 0..255 values were clamped silently (all "may change"), where an IMAGE of them is refused
    (torch.ones(1, 8, 8) * 255, r"mask has values from 255 to 255: expected a float MASK in \[0,1\] \(0\.\.255 "
                                r"values\? divide by 255\)"),
    (torch.full((1, 8, 8), -3.0), r"mask has values from -3 to -3: expected a float MASK in \[0,1\]$"),
    # review health-2: a [-1,1] mask was clamped, its lower half held whole without a word (an IMAGE is refused)
    (torch.linspace(-1, 1, 64).view(1, 8, 8), r"mask has values from -1 to 1: expected a float MASK in \[0,1\] "
                                              r"\(\[-1,1\] values\? map them to \(x \+ 1\) / 2\)"),
])
def test_mask_refuses_nonfinite_empty_and_integer_review10(mask, match):
    with pytest.raises(ValueError, match=match):
        A.mask_to_b1hw(mask, (8, 8), 2)


def test_mask_overshoot_is_clamped_not_refused():
    """A blur or resampler's small overshoot (1.05, -0.05) is no 0..255 mask: clamped to [0,1]."""
    M, _ = A.mask_to_b1hw(torch.tensor([[[1.05, -0.05], [0.5, 2.0]]]), (2, 2), 1)
    assert M.flatten().tolist() == [1.0, 0.0, 0.5, 1.0]
    # a mask through a bicubic Upscale Image: its undershoot (to -0.445) is clamped, as an IMAGE's is
    M, _ = A.mask_to_b1hw(torch.tensor([[[-0.445, 1.0]]]), (1, 2), 1)
    assert M.flatten().tolist() == [0.0, 1.0]


def test_mask_bool_is_accepted_review10():
    M, _ = A.mask_to_b1hw(torch.ones(8, 8, dtype=torch.bool), (8, 8), 2)
    assert M.shape == (2, 1, 8, 8) and M.dtype == torch.float32 and bool((M == 1).all())


def test_mask_with_a_channel_axis_review11():
    """[H,W,1] read as H masks 1 pixel wide ("got 64 masks" without the shape): refused, naming the shape;
    [B,H,W,1] (an IMAGE layout with one channel) is unambiguous and accepted."""
    with pytest.raises(ValueError, match=r"mask has shape \(64, 64, 1\): .* 64 masks 64x1 pixels.*"
                                         r"\[1,H,W\] or \[H,W\]"):
        A.mask_to_b1hw(torch.rand(64, 64, 1), (64, 64))
    m = torch.rand(2, 16, 16, 1)
    M, note = A.mask_to_b1hw(m, (16, 16), 2)
    assert M.shape == (2, 1, 16, 16) and note == "" and torch.equal(M[:, 0], m[..., 0])
    M, note = A.mask_to_b1hw(torch.ones(1, 16, 1), (16, 16))  # SolidMask of width 1: one 16x1 mask, as before
    assert M.shape == (1, 1, 16, 16) and "resized from 16x1" in note and "another aspect ratio: stretched" in note
    assert "aspect" not in A.mask_to_b1hw(torch.ones(1, 8, 12), (16, 24))[1]  # same shape, other size: no warning
    with pytest.raises(ValueError, match=r"mask has 3 masks but there are 2 images: give 1 or 2 "
                                         r"\(mask shape \(3, 8, 8\), read as \[B,H,W\]\)"):
        A.mask_to_b1hw(torch.ones(3, 8, 8), batch=2)


# ------------------------------------------------------------------ which names a trained LoRA is saved under (R8/R9)
def _sd_style_net():
    """A weightless SD-style UNet in the LDM layout (one ResBlock + attention per level, as the tiny SD1.5)."""
    net = torch.nn.Module()
    for blocks, index in (("input_blocks", 1), ("output_blocks", 3)):
        holder = torch.nn.ModuleList([torch.nn.Module() for _ in range(4)])
        attn = torch.nn.Module()
        attn.to_k = torch.nn.Linear(2, 2)
        tb = torch.nn.Module()
        tb.attn2 = attn
        st = torch.nn.Module()
        st.transformer_blocks = torch.nn.ModuleList([tb])
        holder[index] = torch.nn.ModuleList([torch.nn.Identity(), st])
        setattr(net, blocks, holder)
    net.middle_block = torch.nn.ModuleList([torch.nn.Identity()])
    net.num_res_blocks = [1, 1]
    return net


_DIFFUSERS = ("down_blocks_0_attentions_0", "up_blocks_1_attentions_1")  # input_blocks.1.1, output_blocks.3.1
_LDM = ("input_blocks_1_1", "output_blocks_3_1")


@pytest.mark.parametrize("family, blocks", [("sd1", _DIFFUSERS), ("sd2", _DIFFUSERS), ("sdxl", _LDM),
                                            ("sdxl_refiner", _LDM), (None, _LDM)])
def test_lora_data_from_trainer_names_layers_as_kohyas_loras_of_that_model(family, blocks):
    """SD1.x/2.x LoRAs get the diffusers names kohya's SD1.x/2.x LoRAs use, SDXL (and a model of no known family)
    the LDM names, as kohya's SDXL LoRAs; either file attaches to the net again."""
    from types import SimpleNamespace
    core_lora = __import__(f"{load_pack().__name__}.focusfix_core.lora", fromlist=["LoRA"])
    net = _sd_style_net()
    lora = core_lora.LoRA.attach(net, "to_k", rank=2, alpha=1)
    lora.remove()
    trainer = SimpleNamespace(lora=lora, model=SimpleNamespace(family=family), metadata=lambda: {"x": "1"},
                              method="focus-n-fix")
    data = A.LoraData.from_trainer(trainer)
    assert set(data.tensors) == {f"lora_unet_{b}_transformer_blocks_0_attn2_to_k.{part}"
                                 for b in blocks for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert data.metadata["x"] == "1" and data.metadata["ss_network_alpha"] == "1" and data.rank == 2
    data.attach(net).remove()


# ------------------------------------------------------------------------------- Train node -> FixConfig (review C3)
class _ConfigBuilt(Exception):
    pass


@pytest.mark.parametrize("widget, expected", [(0.3, 0.3), (-0.05, -0.05), (None, None), (1e9, None)])
def test_train_node_passes_reward_target_and_lam_to_the_config(monkeypatch, widget, expected):
    """The Train Focus-N-Fix node's reward_target reaches FixConfig (its NO_TARGET, 1e9, and the default mean no
    target: None), and so do lam and the other widgets; without ComfyUI: the run is replaced by one that builds
    the config and stops."""
    T = load_pack().nodes.train_nodes
    built = {}

    class FakeModel:
        def clone(self):
            return self

    def fake_run(dm, reward, make_cfg, **kw):
        built["cfg"], built["dm"], built["reward"] = make_cfg(), dm, reward
        raise _ConfigBuilt

    monkeypatch.setattr(T, "check_comfyui_trains", lambda: None)  # reads comfy
    monkeypatch.setattr(T, "ComfyDiffusionModel", lambda model, clip, vae: type("DM", (), {"clip": clip})())
    monkeypatch.setattr(T, "run_focus_n_fix", fake_run)
    monkeypatch.setattr(T, "graph_metadata", lambda prompt, extra_pnginfo: {})  # reads comfy.cli_args
    assert T.NO_TARGET == 1e9
    kw = {} if widget is None else {"reward_target": widget}
    with pytest.raises(_ConfigBuilt):
        T.FocusFixTrainFocusNFix().execute(
            FakeModel(), "vae", "reward", "a cat\na dog", "blurry", "0,2", 64, 48, 7, 4.5, 2, 0.25, "saliency", 3,
            "to_k", 1e-3, 5, 11, clip="clip", **kw)
    cfg = built["cfg"]
    assert cfg.reward_target == expected
    assert (cfg.prompts, cfg.seeds, cfg.negative_prompt, cfg.width, cfg.height) == (("a cat", "a dog"), (0, 2),
                                                                                   "blurry", 64, 48)
    assert (cfg.steps, cfg.cfg_scale, cfg.K, cfg.lam, cfg.mask_source) == (7, 4.5, 2, 0.25, "saliency")
    assert (cfg.rank, cfg.targets, cfg.lr, cfg.iterations, cfg.seed) == (3, "to_k", 1e-3, 5, 11)
    assert built["reward"] == "reward" and built["dm"].clip == "clip"


def test_an_image_in_0_255_is_refused_an_overshoot_clamped():
    """Float 0..255 pixels would be clamped to a near-white image and scored without a word (fuzz review); a
    resampler's small overshoot above 1 is still clamped, as before."""
    with pytest.raises(ValueError, match=r"image has values up to 255: .*divide by 255"):
        A.image_to_bchw(torch.full((1, 8, 8, 3), 255.0))
    with pytest.raises(ValueError, match="0..255 pixel values"):
        A.image_to_bchw(torch.full((1, 8, 8, 3), 7, dtype=torch.uint8))
    assert float(A.image_to_bchw(torch.full((1, 8, 8, 3), 1.05)).max()) == 1.0


@pytest.mark.parametrize("entry, got", [(torch.zeros(77, 768), "tensor [77, 768]"),
                                        ([torch.zeros(1, 77, 768), "x"], "tensor [1, 77, 768], str"),
                                        ("text", "str"), ([torch.zeros(0, 77, 768), {}], "tensor [0, 77, 768], dict")])
def test_a_malformed_conditioning_entry_is_refused_by_name(entry, got):
    """A broken custom node's CONDITIONING ([tensor] without its entry list) read as a 2-D context before."""
    with pytest.raises(ValueError, match=rf"^negative entry 0 is not a CONDITIONING entry .*: got {re.escape(got)} "):
        A.conditioning_to_cond([entry], False, "negative")
    assert A.conditioning_to_cond([[torch.zeros(1, 77, 768), {}]], False)["context"].shape == (1, 77, 768)


@pytest.mark.parametrize("version, refused", [("2.4.1+cu121", True), ("1.13.1", True), ("2.4+cpu", True),
                                              ("2.5.0a0+872d972e41.nv24.8", False), ("2.5+cpu", False),
                                              ("2.5.1", False), ("2.13.0+cpu", False), ("3.0.0", False)])
def test_training_on_a_torch_older_than_2_5_is_refused_by_name(monkeypatch, version, refused):
    """Before torch 2.5 there is no torch.OutOfMemoryError: any failure in a run (out of memory, a NaN loss) ended
    in an AttributeError naming neither. A pre-release or vendor build of 2.5 is 2.5."""
    monkeypatch.setattr(torch, "__version__", version)
    if refused:
        with pytest.raises(RuntimeError, match=rf"FocusFix training needs torch 2\.5 or newer \(ComfyUI runs torch "
                                               rf"{re.escape(version)}\): update torch"):
            A.check_comfyui_trains()
    else:
        try:
            A.check_comfyui_trains()
        except ModuleNotFoundError as e:  # past the torch check, at the ComfyUI one (no ComfyUI here)
            assert e.name.startswith("comfy")
        except RuntimeError as e:  # past it too: a ComfyUI older than 0.3.60 on the path
            assert "needs ComfyUI" in str(e)


def test_a_clip_vision_tower_is_copied_into_cpu_memory_wherever_comfyui_keeps_it():
    """The copy was `clone()`: on the GPU after a CLIP Vision Encode (or with --gpu-only), so the reward's home was
    the GPU, and 1.2 GB stayed there between nodes where ComfyUI cannot unload it (review D1)."""
    class OnTheGPU:  # a weight as ComfyUI's CLIP_VISION holds it on a card (none here): only a copy to the CPU
        device = torch.device("cuda")

        def __init__(self, value):
            self.value = value

        def detach(self):
            return self

        def to(self, device, copy=False):
            assert torch.device(device).type == "cpu" and copy
            return self.value.clone()

    class ClipVision:
        def get_sd(self):
            return {"w": OnTheGPU(torch.ones(2))}
    used = []
    sd = A._clip_vision_copy(ClipVision(), used)()
    assert used == [True] and isinstance(sd["w"], torch.Tensor) and sd["w"].device.type == "cpu"


def test_a_clip_vision_tower_stored_in_fp8_is_named_in_the_log(caplog):
    """ComfyUI with --fp8_e4m3fn-text-enc stores CLIP vision in fp8: the 'fp32' tower was built from fp8-rounded
    weights without a word (review D3)."""
    class ClipVision:
        def __init__(self, dtype):
            self.dtype = dtype

        def get_sd(self):
            return {"w": torch.ones(2, dtype=self.dtype)}
    with caplog.at_level("WARNING"):
        A._clip_vision_copy(ClipVision(torch.float16), [])()
        assert not caplog.records
        A._clip_vision_copy(ClipVision(torch.float8_e4m3fn), [])()
    assert "clip_vision weights are stored in torch.float8_e4m3fn" in caplog.text


@pytest.mark.parametrize("method, node, refused", [("focus-n-fix", "separate-and-enhance", True),
                                                   ("separate-and-enhance", "focus-n-fix", True),
                                                   ("draft", "focus-n-fix", False),
                                                   ("separate-and-enhance", "separate-and-enhance", False)])
def test_continue_from_takes_only_a_lora_of_the_nodes_own_method(method, node, refused):
    """A Focus-N-Fix LoRA given to Train S&E trained, was saved as separate-and-enhance, and S&E's preservation
    pulled it back toward the MODEL without it (review F4). Refused by name before anything loads; DRaFT is
    Focus-N-Fix with lam 0."""
    train = load_pack().nodes.train_nodes
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.zeros(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2),
               f"{key}.alpha": torch.tensor(2.0)}
    data = A.LoraData(tensors=tensors, metadata={"focusfix_targets": '["to_k"]', "focusfix_method": method},
                      rank=2, alpha=2.0, targets=("to_k",), method=method)
    if refused:
        with pytest.raises(ValueError, match=f"continue_from .* is a {method} LoRA: this {node} run trains only "
                                             f"LoRAs of its own method further. To build on it, apply it to the "
                                             f"MODEL first"):
            train._continued_settings(data, node, 4, "attn", [])
    else:
        assert train._continued_settings(data, node, 4, "attn", []) == (2, "to_k", 2.0)
