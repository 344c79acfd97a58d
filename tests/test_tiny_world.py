"""The tiny shapes world: determinism, captions, ground truth (issue 4)."""
import pytest
import torch

from focusfix_core.tiny.world import (COLOURS, GLITCH_COLOUR, SHAPES, Obj, Scene, WorldConfig, all_prompts, is_held_out,
                                      make_batch, parse_caption, render, sample_scenes, shape_mask)


def test_world_is_deterministic():
    I1, c1, s1 = make_batch(8, seed=3)
    I2, c2, s2 = make_batch(8, seed=3)
    assert torch.equal(I1, I2) and c1 == c2 and [s.glitch for s in s1] == [s.glitch for s in s2]
    I3, c3, _ = make_batch(8, seed=4)
    assert not torch.equal(I1, I3)


def test_world_does_not_touch_global_rng():
    state = torch.get_rng_state()
    make_batch(4, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_batch_shapes_and_range():
    I, captions, scenes = make_batch(16, seed=0)
    assert I.shape == (16, 3, 32, 32) and I.dtype == torch.float32
    assert 0 <= I.min() and I.max() <= 1
    for cap, sc in zip(captions, scenes):
        assert parse_caption(cap) == [(o.colour, o.shape) for o in sc.objects]
        assert sc.masks.shape == (len(sc.objects), 32, 32) and sc.masks.flatten(1).any(1).all()


def test_failure_modes_are_planted():
    _, captions, scenes = make_batch(400, seed=1)
    glitch = sum(s.glitch is not None for s in scenes) / 400
    two = [parse_caption(c) for c in captions if " and " in c]
    assert 0.15 < glitch < 0.35, glitch                      # TRAIN_WORLD.glitch_rate = 0.25
    assert 0.05 < len(two) / 400 < 0.25                      # two_object_rate = 0.15: rare
    assert not any(is_held_out(p) for p in two)              # held-out pairs never seen in training


def test_prompts_render_what_they_say():
    prompts = ["a red circle", "a blue square and a yellow triangle"]
    I, captions, scenes = make_batch(2, seed=0, cfg=WorldConfig(glitch_rate=0.0), prompts=prompts)
    assert captions == prompts and all(s.glitch is None for s in scenes)


def test_prompt_lists():
    assert len(all_prompts(1)) == len(COLOURS) * len(SHAPES)
    held, seen = all_prompts(2, held_out=True), all_prompts(2, held_out=False)
    assert len(held) + len(seen) == len(all_prompts(2)) and held and not set(held) & set(seen)


def test_bad_inputs():
    with pytest.raises(ValueError, match="glitch_rate"):
        WorldConfig(glitch_rate=1.5)
    with pytest.raises(ValueError, match="prompt 'a dog'"):
        parse_caption("a dog")
    with pytest.raises(ValueError, match="prompts must have n=2"):
        make_batch(2, seed=0, prompts=["a red circle"])


# --- found by mutation testing (session 25) ---

@pytest.mark.parametrize("kwargs, name", [
    (dict(size=15, single_size=(4, 9), pair_size=(4, 9)), "^size must be >= 16"),  # below the 16-pixel minimum
    (dict(glitch_rate=-0.1), "^glitch_rate"),                   # rates are fractions: [0, 1] on both sides
    (dict(two_object_rate=-0.5), "^two_object_rate"),
    (dict(single_size=(14, 12)), "^single_size"),               # lo > hi
    (dict(pair_size=(8, 19)), "^pair_size"),                    # hi > size/2 + 2 = 18
])
def test_world_config_refuses_values_outside_its_documented_limits(kwargs, name):
    # WorldConfig validates every field it documents, naming the field
    with pytest.raises(ValueError, match=name):
        WorldConfig(**kwargs)
    WorldConfig(size=16, single_size=(4, 10), pair_size=(4, 10), glitch_rate=0.0, two_object_rate=1.0)  # the limits


@pytest.mark.parametrize("prompt", ["a red", "a red circle and a blue", "red"])
def test_parse_caption_refuses_a_colour_without_a_shape_with_a_value_error(prompt):
    # a caption cut off after its colour is outside the grammar: a ValueError naming the stuck word, not a crash
    with pytest.raises(ValueError, match="stuck at"):
        parse_caption(prompt)


def test_held_out_split_is_the_one_the_model_card_quotes():
    # MODEL_CARD: "a quarter of the two-object combinations (28 of 108 ordered pairs) never occur in training";
    # two objects always have distinct colours. The shipped model was trained on exactly this split.
    two = all_prompts(2)
    assert len(two) == 108 and len(all_prompts(2, held_out=True)) == 28
    assert all(a != b for a, b in (tuple(c for c, _ in parse_caption(p)) for p in two))
    assert is_held_out([("red", "circle"), ("yellow", "circle")])
    assert is_held_out([("yellow", "circle"), ("red", "circle")])       # both orders
    assert not is_held_out([("red", "circle"), ("green", "square")])
    assert not is_held_out([("red", "circle")])                         # one object is never held out


def test_two_objects_are_drawn_at_least_two_pixels_apart():
    # separate shapes stay separate blobs (the evaluator and the masks rely on it): 2 px between the boxes
    cfg = WorldConfig(two_object_rate=1.0, include_held_out=True, glitch_rate=0.0)
    for sc in sample_scenes(200, seed=11, cfg=cfg):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o.bbox for o in sc.objects)
        assert ax0 >= bx1 + 2 or bx0 >= ax1 + 2 or ay0 >= by1 + 2 or by0 >= ay1 + 2, sc.objects


def test_training_scenes_use_every_colour_and_shape_in_every_slot():
    # the training distribution covers the whole palette and every shape, for single objects and for both objects
    # of a pair (nothing outside the documented held-out pairs is missing from training)
    singles = sample_scenes(300, seed=3, cfg=WorldConfig(two_object_rate=0.0, glitch_rate=0.0))
    assert {o.colour for s in singles for o in s.objects} == set(COLOURS)
    assert {o.shape for s in singles for o in s.objects} == set(SHAPES)
    pairs = sample_scenes(300, seed=3, cfg=WorldConfig(two_object_rate=1.0, glitch_rate=0.0, include_held_out=True))
    for slot in (0, 1):
        assert {s.objects[slot].colour for s in pairs} == set(COLOURS)
        assert {s.objects[slot].shape for s in pairs} == set(SHAPES)


def test_triangle_has_its_apex_at_the_top_and_its_base_at_the_bottom():
    # the world's triangles point up (the shipped model and the evaluator's shape fit both assume it)
    m = shape_mask("triangle", (0, 0, 16, 16), 16)
    rows = m.sum(1)
    assert rows[0] < rows[-1] and rows[-1] >= 14 and rows[0] <= 2
    assert torch.all(rows[1:] >= rows[:-1])


def _one_object_scene(background, glitch=None):
    return Scene([Obj("red", "square", (1.0, 1.0, 5.0, 5.0))], background, glitch)


def test_background_is_its_base_colour_plus_a_gradient_centred_on_the_image():
    # Scene.background = (r, g, b, gx, gy): gx is the change across the whole image, centred so the image's mean
    # background is the base colour
    I = render([_one_object_scene((0.5, 0.4, 0.3, 0.1, 0.0))])[0]
    row = I[:, 20]                                              # far from the object
    torch.testing.assert_close(row[:, -1] - row[:, 0], torch.full((3,), 0.1))
    torch.testing.assert_close((row[:, 10] + row[:, 21]) / 2, torch.tensor([0.5, 0.4, 0.3]))


def test_render_stays_in_0_1_for_any_scene():
    # render's documented range holds for a hand-built scene whose bright background plus gradient passes 1
    I = render([_one_object_scene((0.95, 0.95, 0.05, 0.3, -0.3))])
    assert 0 <= I.min() and I.max() <= 1


def test_glitch_is_a_checkerboard_of_two_pixel_cells():
    # the glitch is a magenta/black checkerboard of 2x2-pixel cells, starting black at its top-left corner
    I = render([_one_object_scene((0.5, 0.5, 0.5, 0.0, 0.0), glitch=(20, 20, 26, 26))])[0]
    black, magenta = torch.zeros(3), GLITCH_COLOUR
    for (y, x), want in {(20, 20): black, (20, 21): black, (21, 21): black, (20, 22): magenta,
                         (21, 23): magenta, (22, 20): magenta, (22, 22): black, (25, 25): black}.items():
        assert torch.equal(I[:, y, x], want), (y, x)


def test_shape_mask_refuses_an_unknown_shape():
    # a shape outside SHAPES is an error naming it, not silently drawn as some other shape
    with pytest.raises(ValueError, match="'star'"):
        shape_mask("star", (0, 0, 8, 8), 16)
