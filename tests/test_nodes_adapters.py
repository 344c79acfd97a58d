"""ComfyUI layout conversions and node helpers, without ComfyUI."""
from __future__ import annotations

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
])
def test_mask_refuses_nonfinite_empty_and_integer_review10(mask, match):
    with pytest.raises(ValueError, match=match):
        A.mask_to_b1hw(mask, (8, 8), 2)


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
    assert M.shape == (1, 1, 16, 16) and "resized from 16x1" in note
    with pytest.raises(ValueError, match=r"mask has 3 masks but there are 2 images: give 1 or 2 "
                                         r"\(mask shape \(3, 8, 8\), read as \[B,H,W\]\)"):
        A.mask_to_b1hw(torch.ones(3, 8, 8), batch=2)
