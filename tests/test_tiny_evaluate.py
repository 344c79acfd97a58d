"""Exact evaluators of the shapes world: >= 99 % accuracy on ground-truth renders (issue 4)."""
import math

import pytest
import torch

from focusfix_core.tiny.evaluate import (GLITCH_MIN_PIXELS, colour_labels, connected_components, detect_objects,
                                         evaluate, glitch_map, has_glitch, summarize)
from focusfix_core.tiny.world import COLOURS, WorldConfig, make_batch


@pytest.fixture(scope="module")
def renders():
    cfg = WorldConfig(two_object_rate=0.5, glitch_rate=0.3, include_held_out=True)
    return make_batch(200, seed=123, cfg=cfg)


def test_objects_and_shapes_match_ground_truth(renders):
    I, captions, scenes = renders
    recs = evaluate(I, captions)
    exact = [{c: d.shape for c, d in r["detections"].items()} == {o.colour: o.shape for o in s.objects}
             for r, s in zip(recs, scenes)]
    assert sum(exact) / len(exact) >= 0.99
    s = summarize(recs)
    assert s["alignment"] >= 99 and s["both_objects_rate"] >= 99


def test_glitch_detection_matches_ground_truth(renders):
    I, _, scenes = renders
    truth = torch.tensor([s.glitch is not None for s in scenes])
    assert (has_glitch(I) == truth).float().mean() >= 0.99
    assert 0.1 < truth.float().mean() < 0.5  # both classes are tested


def test_glitch_map_localises(renders):
    I, _, scenes = renders
    G = glitch_map(I)
    for i, s in enumerate(scenes):
        if s.glitch is not None:
            y, x = divmod(int(G[i].argmax()), G.shape[-1])
            assert s.glitch[0] - 1 <= x <= s.glitch[2] and s.glitch[1] - 1 <= y <= s.glitch[3]


def test_missing_and_wrong_objects_are_caught():
    I, _, _ = make_batch(2, seed=0, cfg=WorldConfig(glitch_rate=0.0),
                         prompts=["a red circle", "a blue square and a green triangle"])
    recs = evaluate(I, ["a red square", "a blue square and a yellow triangle"])
    assert recs[0]["alignment"] == 0.0 and recs[0]["both_present"]      # right colour, wrong shape
    assert recs[1]["alignment"] == 0.5 and not recs[1]["both_present"]  # yellow missing


def test_components_and_labels():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, :2, :2] = True
    m[0, 5:, 5:] = True
    lab = connected_components(m)
    assert len(lab.unique()) == 3
    grey = torch.full((1, 3, 4, 4), 0.5)
    assert (colour_labels(grey) == -1).all()


def test_bad_input():
    with pytest.raises(ValueError, match="one prompt per image"):
        evaluate(torch.rand(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        glitch_map(torch.rand(3, 32, 32))


# --- found by mutation testing (session 25) ---

GREY = 0.5
RED, BLUE = torch.tensor(COLOURS["red"]), torch.tensor(COLOURS["blue"])


def _grey(n=1, size=32):
    return torch.full((n, 3, size, size), GREY)


def test_connected_components_are_8_connected():
    # pixels touching only at a corner are one component (8-connectivity, as documented)
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    for i in range(5):
        m[0, i, i] = True
    lab = connected_components(m)
    assert len(lab[m].unique()) == 1


def test_min_area_is_inclusive_and_16_by_default():
    # a blob of exactly min_area (16) pixels is an object; 15 pixels are not
    I = _grey(2)
    I[0, :, 4:8, 4:8] = RED[:, None, None]      # 16 px
    I[1, :, 4:7, 4:9] = RED[:, None, None]      # 15 px
    d = detect_objects(I)
    assert "red" in d[0] and d[0]["red"].area == 16 and "red" not in d[1]


def test_the_largest_blob_of_a_colour_is_the_detection():
    # per colour, the largest blob is reported (its area and bbox), not a smaller one nor the sum of all
    I = _grey()
    I[0, :, 2:8, 2:8] = RED[:, None, None]       # 36 px, the object
    I[0, :, 20:24, 20:24] = RED[:, None, None]   # 16 px, a second red blob
    det = detect_objects(I)[0]["red"]
    assert det.area == 36 and det.bbox == (2, 2, 8, 8) and det.shape == "square"


def test_glitch_needs_exactly_min_pixels_above_threshold():
    # has_glitch: at least GLITCH_MIN_PIXELS (6) magenta pixels; 5 are not a glitch
    I = _grey(2)
    magenta = torch.tensor([1.0, 0.0, 1.0])
    I[0, :, 0, :GLITCH_MIN_PIXELS] = magenta[:, None]
    I[1, :, 0, :GLITCH_MIN_PIXELS - 1] = magenta[:, None]
    assert has_glitch(I).tolist() == [True, False]


def test_a_red_blue_blend_is_not_a_glitch():
    # the documented margin: a 50/50 blend of red and blue object pixels (magenta evidence 0.32) is below threshold
    I = _grey()
    I[0, :, 10:14, 10:14] = ((RED + BLUE) / 2)[:, None, None]
    assert not has_glitch(I)[0]


def test_evaluate_flags_the_glitch_of_each_image():
    # evaluate's per-image glitch flag is that image's own
    clean, _, _ = make_batch(1, seed=0, cfg=WorldConfig(glitch_rate=0.0), prompts=["a red circle"])
    glitched, _, sc = make_batch(1, seed=0, cfg=WorldConfig(glitch_rate=1.0), prompts=["a red circle"])
    assert sc[0].glitch is not None
    recs = evaluate(torch.cat([clean, glitched]), ["a red circle"] * 2)
    assert [r["glitch"] for r in recs] == [False, True]


def test_evaluators_refuse_images_that_are_not_rgb():
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        evaluate(torch.rand(1, 4, 32, 32), ["a red circle"])


def test_evaluate_scores_an_empty_prompt_without_failing():
    # an unconditional ("") prompt asks for no object: alignment 0, nothing missing, no crash
    r = evaluate(_grey(), [""])[0]
    assert r["n_objects"] == 0 and r["alignment"] == 0.0 and r["both_present"]


def test_summarize_rates_each_group_over_its_own_records():
    # alignment: single-object prompts only; alignment_all: every record; both_objects_rate: two-object prompts
    # only; n: every record; an empty group is nan, not 0
    recs = [{"n_objects": 1, "alignment": 1.0, "both_present": True, "glitch": False},
            {"n_objects": 2, "alignment": 0.5, "both_present": False, "glitch": True}]
    s = summarize(recs)
    assert s == {"artifact_rate": 50.0, "alignment": 100.0, "alignment_all": 75.0, "both_objects_rate": 0.0, "n": 2}
    assert math.isnan(summarize(recs[:1])["both_objects_rate"]) and math.isnan(summarize(recs[1:])["alignment"])
