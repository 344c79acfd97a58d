"""Reward nodes without ComfyUI: where the reward lives while and after a node uses it, Combine Rewards' weights,
what the saliency outputs claim, and workflow 2's mask source (review of the reward side, findings 1, 3, 7, 8)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from pack_loader import load_pack

REPO = Path(__file__).resolve().parents[1]



P = load_pack()
A, N = P.nodes.adapters, P.nodes.reward_nodes
IMAGE_REWARDS = P.focusfix_core.rewards.image
BUILTIN_REWARDS = P.focusfix_core.rewards.loading.BUILTIN_REWARDS
DEVICE = torch.device("cpu", 0)  # stands in for cuda:0: another device name, and tensors can really go there


class _Moves:
    """Records every `.to(device)` of a reward (nn.Module.to moves it in place)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return super().to(*args, **kwargs)


class Sharpness(_Moves, IMAGE_REWARDS.SharpnessReward):
    pass


class Brightness(_Moves, IMAGE_REWARDS.BrightnessReward):
    pass


class Failing(Sharpness):
    def score(self, I):
        raise RuntimeError("boom: the node failed (or was cancelled) while the reward was on the device")


class _Progress:
    """A stand-in `comfy.utils.ProgressBar` recording its updates (class-wide, in `updates`)."""
    updates: list = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total))


@pytest.fixture
def comfy_device(monkeypatch):
    """Stand-ins for `comfy.model_management` (compute device DEVICE, cancel never pressed) and `comfy.utils`."""
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: DEVICE
    mm.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")
    monkeypatch.setattr(_Progress, "updates", [])
    utils.ProgressBar = _Progress
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    return DEVICE


def _image(b=2, size=32, seed=0):
    return torch.rand(b, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _mask_inputs(**over):
    return {"mask_source": "auto", "saliency_method": "grad", "blur_sigma": 1.0, "threshold_mode": "top_percent",
            "threshold": 0.15, "dilation": 1, "feather": 0.0, **over}


# ------------------------------------------------------------------------ the reward goes back where it was (3)


def test_reward_on_moves_the_reward_to_the_device_and_back(comfy_device):
    r, x = Sharpness(), torch.zeros(2, 3, 4, 4)
    with A.grad_mode(), A.reward_on(r, x) as (on, I):
        assert on is r and r.moves == [str(comfy_device)] and torch.equal(I, x) and I is not x
    assert r.moves == [str(comfy_device), "cpu"]
    with pytest.raises(RuntimeError, match="boom"), A.grad_mode(), A.reward_on(r):
        raise RuntimeError("boom")
    assert r.moves[-2:] == [str(comfy_device), "cpu"], "an error or a cancel still moves it back"


@pytest.mark.parametrize("node", ["score", "mask", "compare"])
def test_reward_nodes_leave_the_reward_where_it_was(comfy_device, node):
    r, img = Sharpness(), _image()
    if node == "score":
        N.FocusFixScoreImages().execute(img, r)
    elif node == "mask":
        N.FocusFixSaliencyMask().execute(img, r, **_mask_inputs())
    else:
        N.FocusFixCompare().execute(img, _image(seed=1), reward=r)
    assert r.moves == [str(comfy_device), "cpu"]
    failing = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        N.FocusFixScoreImages().execute(img, failing)
    assert failing.moves == [str(comfy_device), "cpu"]


# ------------------------------------------------------------------------ one image at a time on the device


class _Cancelled(Exception):
    pass


def test_each_image_runs_one_plain_image_at_a_time_with_progress_and_cancel(comfy_device, monkeypatch):
    """The reward nodes' batches go to the device one image at a time (a gradient saliency map through a CLIP
    tower holds its activations: a whole batch could run out of memory where KSampler's batch fit), each a plain
    copy autograd may save, with ComfyUI's progress bar over the images and its cancel between them."""
    r, seen = Sharpness(), []
    with torch.inference_mode():  # as ComfyUI hands IMAGE tensors over
        I = torch.rand(3, 3, 16, 16)
    with A.grad_mode():
        out = N.each_image(r, I, lambda rr, x: seen.append((rr, x)) or float(x.sum()))
    assert [tuple(x.shape) for _, x in seen] == [(1, 3, 16, 16)] * 3
    assert all(rr is r and x.device.type == comfy_device.type and not x.is_inference() for rr, x in seen)
    assert out == pytest.approx([float(I[j].sum()) for j in range(3)])
    assert _Progress.updates == [(1, 3), (2, 3), (3, 3)] and r.moves == [str(comfy_device), "cpu"]

    calls = []

    def cancel_after_first():
        if calls:
            raise _Cancelled
    monkeypatch.setattr(sys.modules["comfy.model_management"], "throw_exception_if_processing_interrupted",
                        cancel_after_first)
    with pytest.raises(_Cancelled), A.grad_mode():
        N.each_image(r, I, lambda rr, x: calls.append(x))
    assert len(calls) == 1 and r.moves[-2:] == [str(comfy_device), "cpu"], "a cancel still moves the reward back"


class _Counted(Brightness):
    """A reward without a heatmap (as the CLIP rewards) that counts its forwards."""
    has_heatmap = False

    def forward(self, I):
        self.forwards = getattr(self, "forwards", 0) + 1
        return super().forward(I)


@pytest.mark.parametrize("reward", [Sharpness, _Counted], ids=["heatmap", "saliency"])
def test_score_images_and_compare_score_as_the_whole_batch_does(comfy_device, reward):
    """Per image, the nodes give the scores and maps the reward gives the batch."""
    r, img, after = reward(), _image(b=3), _image(b=3, seed=1)
    I, I1 = A.image_to_bchw(img), A.image_to_bchw(after)
    scores, _, heat, _ = N.FocusFixScoreImages().execute(img, r)
    assert scores == pytest.approx(r(I).tolist(), rel=1e-5)
    H = r.heatmap(I) if r.has_heatmap else P.focusfix_core.saliency.gradient_saliency(r, I)
    torch.testing.assert_close(heat, N._map_01(H, I)[:, 0])
    _, _, rb, ra, _, _ = N.FocusFixCompare().execute(img, after, reward=r)
    assert (rb, ra) == pytest.approx((float(r(I).mean()), float(r(I1).mean())), rel=1e-5)


class _TinyHeatmap(IMAGE_REWARDS.SharpnessReward):
    """A heatmap of ~1e-9 (a large reward model's scale) with a negative background, on a 4x4 square."""

    def heatmap(self, I):
        H = torch.full((I.shape[0], 1, *I.shape[-2:]), -1e-9)
        H[..., 4:8, 4:8] = 1e-9
        return H


def test_score_images_shows_a_tiny_heatmap_as_the_saliency_mask_reads_it(comfy_device):
    """Score Images normalised with an absolute 1e-8 floor and kept negative values: a ~1e-9 map peaked at 0.1
    and its zero background showed as 0.5, where Saliency Mask (the relative rule, negatives as 0) spans it to 1
    and cuts its mask from the square (review health-4)."""
    img = _image(b=1)
    heat = N.FocusFixScoreImages().execute(img, _TinyHeatmap())[2]
    assert heat.shape == (1, 32, 32)
    assert float(heat.max()) == 1.0 and float(heat[0, 5, 5]) == 1.0 and float(heat[0, 20, 20]) == 0.0
    M = N.FocusFixSaliencyMask().execute(img, _TinyHeatmap(), **{**_mask_inputs(mask_source="heatmap"),
                                                                  "blur_sigma": 0.0, "dilation": 0})[0]
    assert bool((M[0, 5, 5] == 1) & (M[0, 20, 20] == 0))


def test_score_images_scores_from_the_saliency_maps_forward():
    """A reward without a heatmap runs one forward per image: the gradient's forward gives the score too (it ran
    a second, graph-free forward for the score: a CLIP tower's forward each)."""
    r = _Counted()
    N.FocusFixScoreImages().execute(_image(b=3), r)
    assert r.forwards == 3


# ------------------------------------------------------------------------ Combine Rewards' weights (7)


def test_combine_rewards_refuses_all_zero_weights_naming_both():
    node = N.FocusFixCombineRewards
    msg = "weight_a and weight_b are both 0: the combined reward would score every image 0"
    assert node.VALIDATE_INPUTS(weight_a=0.0, weight_b=0.0).startswith(msg)  # at queue time
    assert node.VALIDATE_INPUTS(weight_a=0.0, weight_b=None) is True  # a linked weight: checked when it runs
    assert node.VALIDATE_INPUTS(weight_a=2000.0, weight_b=1.0) == "weight_a (2000.0) must be at most 1000.0"
    with pytest.raises(ValueError, match=msg):
        node().execute(None, 0.0, None, 0.0)


def test_combine_rewards_leaves_a_zero_weight_reward_unloaded_and_unrun(comfy_device):
    node = N.FocusFixCombineRewards
    assert node.INPUT_TYPES()["required"]["reward_b"][1]["lazy"] is True
    assert node().check_lazy_status(weight_a=1.0, weight_b=0.0) == ["reward_a"]  # its Load Reward never runs
    assert node().check_lazy_status(weight_a=-1.0, weight_b=2.0) == ["reward_a", "reward_b"]
    a = Sharpness()
    (r,) = node().execute(a, 1.0, None, 0.0)  # ComfyUI passes None for the lazy input it never evaluated
    assert r.name == "1*sharpness" and r.weights == [1.0] and r.has_heatmap
    b = Brightness()
    (r,) = node().execute(a, 1.0, b, 0.0)  # an older ComfyUI evaluates every input: still left out
    N.FocusFixScoreImages().execute(_image(), r)
    assert b.moves == [] and list(r.rewards) == [a], "a 0-weight reward is never moved to the device nor run"


@pytest.mark.parametrize("weights, name", [((1.0, -1.0), "1*sharpness - 1*brightness"),
                                           ((-0.5, 2.0), "-0.5*sharpness + 2*brightness"),
                                           ((1.0, 10.0), "1*sharpness + 10*brightness"),
                                           ((0.0, -2.0), "-2*brightness")])
def test_combine_rewards_names_negative_weights_readably(weights, name):
    (r,) = N.FocusFixCombineRewards().execute(Sharpness(), weights[0], Brightness(), weights[1])
    assert r.name == name


def test_chained_combine_rewards_name_the_inner_sum_in_parentheses():
    """-1 * (sharpness + 0.5 brightness) read "-1*1*sharpness + 0.5*brightness", another reward than the one that
    scored (review D2)."""
    (inner,) = N.FocusFixCombineRewards().execute(Sharpness(), 1.0, Brightness(), 0.5)
    (outer,) = N.FocusFixCombineRewards().execute(inner, -1.0, Sharpness(), 1.0)
    assert outer.name == "-1*(1*sharpness + 0.5*brightness) + 1*sharpness"


def test_compare_draws_every_rows_change_on_one_scale():
    """Each row's |after - before| was scaled to its own range: a change of 0.005 drew as red as one of 0.75
    (review D4). Blue is no change, red a change of 0.25 or more, in every row."""
    before = torch.full((3, 32, 32, 3), 0.2)
    after = before.clone()
    after[0, :16] += 0.005  # too small to see
    after[1, :16] += 0.75
    grid, *_ = N.FocusFixCompare().execute(before, after)
    step = 32 + 2  # image_grid's tiles and padding: the third column of each row
    change = torch.stack([grid[0, 2 + r * step:2 + r * step + 32, 2 + 2 * step:2 + 2 * step + 32] for r in range(3)])
    top_red = change[:, :16, :, 0].mean((1, 2))
    assert top_red[1] > 0.99 and top_red[0] < 0.05 and change[2, ..., 0].max() == 0  # row 2: no change, blue
    assert torch.allclose(change[:, 16:, :, 2], torch.ones(()))  # unchanged halves are blue


# ------------------------------------------------------------------------ saliency is sensitivity, not badness (8)


def test_saliency_outputs_say_sensitivity_not_badness():
    heat = N.FocusFixScoreImages.OUTPUT_TOOLTIPS[2]
    assert "gradient sensitivity |dr/dI|" in heat and "not where the image is worst" in heat
    assert "not a map of what is bad" in N.FocusFixScoreImages.DESCRIPTION
    source = N.FocusFixSaliencyMask.INPUT_TYPES()["required"]["mask_source"][1]["tooltip"]
    assert "saliency: gradient sensitivity |dr/dI|" in source and "not what is bad" in source


# ------------------------------------------------------------------------ workflow 2 masks what the reward dislikes (1)


def _api(name):
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


@pytest.mark.parametrize("path", sorted((REPO / "workflows" / "api").glob("*.json")), ids=lambda p: p.stem)
def test_workflows_take_the_mask_from_a_rewards_heatmap_when_it_has_one(path):
    """Gradient saliency marks where a change moves the score most (for sharpness: the sharp parts), so a workflow
    whose reward has a heatmap must take its mask from that heatmap."""
    api = json.loads(path.read_text())
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind not in ("FocusFixSaliencyMask", "FocusFixTrainFocusNFix"):
            continue
        loader = api[inputs["reward"][0]]
        name = loader["inputs"].get("reward_name", "")
        if loader["class_type"] != "FocusFixLoadReward" or not name.startswith("builtin:"):
            continue
        if BUILTIN_REWARDS[name.removeprefix("builtin:")]().has_heatmap:
            source = inputs["mask_source"]  # the same name on both nodes
            assert source in ("auto", "heatmap", "mask", "none"), f"{path.name}: {kind} uses {source} for {name}"


def test_workflow_2_mask_marks_the_blurry_half():
    """Workflow 2's Saliency Mask settings on an image with a sharp left half and a flat right half: the mask (1 =
    may change) lies in the flat half, where sharpness is low; Train uses the same settings."""
    api = _api("focusfix_2_fix_what_reward_dislikes")
    (sal,) = [n["inputs"] for n in api.values() if n["class_type"] == "FocusFixSaliencyMask"]
    (train,) = [n["inputs"] for n in api.values() if n["class_type"] == "FocusFixTrainFocusNFix"]
    assert api[sal["reward"][0]]["inputs"]["reward_name"] == "builtin:sharpness"
    assert train["mask_source"] == "heatmap" and sal["mask_source"] in ("heatmap", "auto")
    assert all(train[k] == sal[k] for k in ("threshold_mode", "threshold", "dilation"))
    g, W = torch.Generator().manual_seed(0), 64
    img = torch.full((1, W, W, 3), 0.5)
    img[:, :, : W // 2] = torch.rand(1, W, W // 2, 3, generator=g)  # sharp texture
    img[:, :, W // 2:] += 0.1 * torch.linspace(-1, 1, W // 2).view(1, 1, -1, 1)  # a smooth ramp
    settings = {k: v for k, v in sal.items() if k not in ("image", "reward")}
    M, _ = N.FocusFixSaliencyMask().execute(img, BUILTIN_REWARDS["sharpness"](), **settings)
    assert float(M[0, :, W // 2:].sum() / M[0].sum()) > 0.9


def test_smoothgrad_mask_depends_on_the_image_alone():
    """smoothgrad's noise is seeded per image: a rerun, or the same image in another batch, gives the same mask
    (unseeded, the global RNG made every run's mask differ)."""
    settings = _mask_inputs(mask_source="saliency", saliency_method="smoothgrad", threshold=0.3, blur_sigma=0.0, dilation=0)
    img = _image(b=3, seed=4)
    torch.manual_seed(1)
    M, _ = N.FocusFixSaliencyMask().execute(img, Sharpness(), **settings)
    torch.manual_seed(2)  # another global RNG state: no effect
    again, _ = N.FocusFixSaliencyMask().execute(img, Sharpness(), **settings)
    alone, _ = N.FocusFixSaliencyMask().execute(img[2:], Sharpness(), **settings)
    assert torch.equal(M, again)
    assert torch.equal(M[2:], alone)
    # the noise is there: plain grad cuts another mask from the same image
    grad, _ = N.FocusFixSaliencyMask().execute(img, Sharpness(), **{**settings, "saliency_method": "grad"})
    assert not torch.equal(M, grad)


# ------------------------------------------------------------------------ bad IMAGE and MASK inputs (review std, 10)


def _run(node, image):
    if node == "score":
        return N.FocusFixScoreImages().execute(image, Sharpness())
    if node == "mask":
        return N.FocusFixSaliencyMask().execute(image, Sharpness(), **_mask_inputs())
    return N.FocusFixCompare().execute(image, image, reward=Sharpness())


@pytest.mark.parametrize("node", ["score", "mask", "compare"])
@pytest.mark.parametrize("bad, match", [
    (torch.rand(0, 32, 32, 3), "is an empty batch"),                          # was ZeroDivisionError / IndexError
    (torch.rand(1, 1, 1, 3), r"is 1x1 pixels \(HxW\): expected at least 8"),  # was a torch padding RuntimeError
    (torch.full((1, 32, 32, 3), float("nan")), "has NaN or inf values"),      # was "heatmap H must be finite"
    ((torch.rand(1, 32, 32, 3) * 255).to(torch.uint8), "must be a float IMAGE"),  # was clamped to 0/1, silently
], ids=["empty", "1x1", "nan", "uint8"])
def test_reward_nodes_refuse_bad_images_naming_the_input_review10(node, bad, match):
    name = "before" if node == "compare" else "image"
    with pytest.raises(ValueError, match=f"^{name} {match}"):
        _run(node, bad)


def test_compare_refuses_a_nonfinite_mask_review10():
    with pytest.raises(ValueError, match="^mask has NaN or inf values"):
        N.FocusFixCompare().execute(_image(), _image(seed=1), mask=torch.full((1, 32, 32), float("nan")))


def test_compare_says_n_a_for_an_empty_region_review10():
    """The mean change over no pixels is undefined: "n/a" and NaN, not 0 (which would claim "unchanged")."""
    before, after = _image(), _image(seed=1)
    _, text, *_, inside, outside = N.FocusFixCompare().execute(before, after, mask=torch.zeros(1, 32, 32))
    assert "change inside mask n/a (empty mask), outside 0." in text and inside != inside and outside > 0
    _, text, *_, inside, outside = N.FocusFixCompare().execute(before, after, mask=torch.ones(1, 32, 32))
    assert "outside n/a (full mask)" in text and inside > 0 and outside != outside
    _, text, *_, inside, outside = N.FocusFixCompare().execute(before, after)
    assert "outside n/a (no mask)" in text and inside > 0 and outside != outside
    assert text.startswith("reward: none connected\n")  # not "reward before 0.0000", as if both had scored 0
    half = torch.zeros(1, 32, 32)
    half[:, :, :16] = 1
    _, text, *_, inside, outside = N.FocusFixCompare().execute(before, after, mask=half)
    D = (after - before).abs().mean(-1)
    assert inside == pytest.approx(float(D[..., :16].mean()), rel=1e-5)
    assert outside == pytest.approx(float(D[..., 16:].mean()), rel=1e-5)


def test_linked_or_api_values_are_range_checked_when_the_node_runs():
    """ComfyUI checks a widget's min/max only when the value is typed in the widget: one from a link (a
    PrimitiveFloat) or an API prompt (JSON's NaN) reaches execute unchecked. It is refused there by name, not
    deep inside torch or silently (fuzz review)."""
    with pytest.raises(ValueError, match=r"dilation \(100000\) must be at most 256"):
        N.FocusFixSaliencyMask().execute(_image(), Sharpness(), **_mask_inputs(dilation=100000))
    with pytest.raises(ValueError, match=r"blur_sigma \(nan\) must be a finite number"):
        N.FocusFixSaliencyMask().execute(_image(), Sharpness(), **_mask_inputs(blur_sigma=float("nan")))
    with pytest.raises(ValueError, match=r"weight_a \(nan\) must be a finite number"):
        N.FocusFixCombineRewards().execute(Sharpness(), float("nan"), Sharpness(), 1.0)
    with pytest.raises(ValueError, match=r"strength \(nan\) must be a finite number"):
        P.nodes.lora_nodes.FocusFixApplyLoRA().execute(None, None, float("nan"))


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def test_score_table_gives_the_mean_and_each_image_from_0():
    assert N.score_table([1.0, 2.0, 4.0], "sharpness") == (
        "sharpness: mean 2.3333\n  image 0: 1.0000\n  image 1: 2.0000\n  image 2: 4.0000")


def test_score_images_text_names_the_reward():
    r = P.focusfix_core.rewards.image.BrightnessReward()
    _, text, _, _ = N.FocusFixScoreImages().execute(torch.full((2, 16, 16, 3), 0.5), r)
    assert text == "brightness: mean 0.5000\n  image 0: 0.5000\n  image 1: 0.5000"


def test_compare_grid_columns_are_before_after_change():
    before, after = torch.zeros(1, 16, 16, 3), torch.full((1, 16, 16, 3), 0.5)
    grid, *_ = N.FocusFixCompare().execute(before, after)
    step = 16 + 2  # image_grid's tile and padding
    tile = lambda c: grid[0, 2:18, 2 + c * step:2 + c * step + 16]  # noqa: E731
    assert torch.equal(tile(0), before[0]) and torch.equal(tile(1), after[0])
    assert torch.equal(tile(2), torch.tensor([1.0, 0.0, 0.0]).expand(16, 16, 3))  # a change of 0.5: red


def test_compare_draws_a_change_of_a_quarter_red_and_an_eighth_mid_scale():
    before = torch.zeros(2, 16, 16, 3)
    after = before.clone()
    after[0] += 0.25
    after[1] += 0.125
    grid, *_ = N.FocusFixCompare().execute(before, after)
    step = 16 + 2
    change = lambda r: grid[0, 2 + r * step:2 + r * step + 16, 2 + 2 * step:2 + 2 * step + 16]  # noqa: E731
    torch.testing.assert_close(change(0), torch.tensor([1.0, 0.0, 0.0]).expand(16, 16, 3))
    torch.testing.assert_close(change(1), torch.tensor([0.5, 1.0, 0.5]).expand(16, 16, 3))


def test_compare_refuses_batches_of_another_size():
    import pytest
    with pytest.raises(ValueError, match="before and after must have the same shape"):
        N.FocusFixCompare().execute(torch.zeros(1, 16, 16, 3), torch.zeros(2, 16, 16, 3))


def test_compare_text_carries_the_mask_resize_note():
    mask = torch.ones(1, 8, 8)  # resized to the 16x16 images
    _, text, *_ = N.FocusFixCompare().execute(torch.zeros(1, 16, 16, 3), torch.ones(1, 16, 16, 3), mask=mask)
    note = P.nodes.adapters.mask_to_b1hw(mask, (16, 16), 1)[1]
    assert note and text.split("\n")[2:] == [note]
