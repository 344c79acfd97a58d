"""Score Images, Saliency Mask and Compare given bad IMAGE and MASK inputs inside a real ComfyUI: a ValueError that
names the input, never a raw torch error or a silent wrong number (review std, findings 10 and 11)."""
from __future__ import annotations

import math

import pytest
import torch

SIZE = 32
BAD_IMAGES = {
    "empty": (torch.rand(0, SIZE, SIZE, 3), "is an empty batch"),         # was ZeroDivisionError / IndexError
    "1x1": (torch.rand(1, 1, 1, 3), r"is 1x1 pixels \(HxW\)"),            # was a torch padding RuntimeError
    "nan": (torch.full((1, SIZE, SIZE, 3), float("nan")), "has NaN or inf values"),  # was "heatmap H ..."
    "uint8": ((torch.rand(1, SIZE, SIZE, 3) * 255).to(torch.uint8), "must be a float IMAGE"),  # was clamped to 0/1
}


def _image(seed=0, b=2):
    return torch.rand(b, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sharpness(comfy):
    (reward,) = comfy.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    return reward


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_reward_nodes_name_the_bad_image(comfy, sharpness, case):
    image, match = BAD_IMAGES[case]
    with pytest.raises(ValueError, match=f"^image {match}"):
        comfy.run("FocusFixScoreImages", image=image, reward=sharpness)
    with pytest.raises(ValueError, match=f"^image {match}"):
        comfy.run("FocusFixSaliencyMask", image=image, reward=sharpness, mask_source="auto", saliency_method="grad",
                  blur_sigma=2.0, threshold_mode="top_percent", threshold=0.15, dilation=2, feather=0.0)
    with pytest.raises(ValueError, match=f"^after {match}"):
        comfy.run("FocusFixCompare", before=_image(b=max(len(image), 1)), after=image, reward=sharpness)


def test_compare_masks(comfy, sharpness):
    before, after = _image(), _image(seed=1)
    with pytest.raises(ValueError, match="^mask has NaN or inf values"):
        comfy.run("FocusFixCompare", before=before, after=after, mask=torch.full((1, SIZE, SIZE), float("nan")))
    (empty,) = comfy.run("SolidMask", value=0.0, width=SIZE, height=SIZE)
    _, text, rb, ra, inside, outside = comfy.run("FocusFixCompare", before=before, after=after, mask=empty,
                                                 reward=sharpness)
    assert "change inside mask n/a (empty mask)" in text and math.isnan(inside) and outside > 0 and rb != ra
    # ComfyUI's own masks pass: a SolidMask 1 pixel wide is [1,H,1], one mask (resized, with a note)
    (thin,) = comfy.run("SolidMask", value=1.0, width=1, height=SIZE)
    _, text, *_ = comfy.run("FocusFixCompare", before=before, after=after, mask=thin)
    assert f"resized from {SIZE}x1" in text


def test_mask_with_a_channel_axis_names_its_shape(comfy):
    """An [H,W,1] mask read as H masks: "got 64 masks" without the shape (finding 11)."""
    with pytest.raises(ValueError, match=rf"mask has shape \({SIZE}, {SIZE}, 1\): .*\[1,H,W\] or \[H,W\]"):
        comfy.run("FocusFixCompare", before=_image(), after=_image(seed=1), mask=torch.rand(SIZE, SIZE, 1))
    _, text, *_ = comfy.run("FocusFixCompare", before=_image(), after=_image(seed=1), mask=torch.rand(2, SIZE, SIZE, 1))
    assert "change inside mask 0." in text
