"""The tiny world's shipped rewards: load through their metadata, read renders correctly (issue 4)."""
import pytest
import torch

from focusfix_core.rewards.base import Reward
from focusfix_core.rewards.loading import load_reward
from focusfix_core.tiny.evaluate import glitch_map
from focusfix_core.tiny.rewards import (DEFAULT_REWARDS, ArtifactReward, AttributeReward, _artifact_batch,
                                        _attribute_batch, load_default_rewards, load_tiny_reward, save_reward,
                                        train_artifact_reward, train_attribute_reward)
from focusfix_core.tiny.world import TRAIN_WORLD, WorldConfig, make_batch


@pytest.fixture(scope="module")
def rewards():
    return load_default_rewards()


@pytest.mark.parametrize("family", ["tiny_artifact", "tiny_attribute"])
def test_generic_loader_reads_metadata(family):
    r = load_reward(DEFAULT_REWARDS[family.removeprefix("tiny_")])
    assert isinstance(r, Reward) and r.describe()["family"] == family
    assert r.has_heatmap == (family == "tiny_artifact")


def test_rewards_read_renders(rewards):
    I, captions, scenes = make_batch(64, seed=4242, cfg=WorldConfig(two_object_rate=0.4, glitch_rate=0.4, include_held_out=True))
    glitch = torch.tensor([s.glitch is not None for s in scenes])
    red = torch.tensor(["red" in c for c in captions])
    with torch.no_grad():
        art, att = rewards["artifact"](I), rewards["attribute"](I)
    assert art.shape == (64,) and (art <= 0).all() and (art >= -1).all()
    assert ((art < -0.5) == glitch).float().mean() >= 0.95
    assert ((att < -0.5) == red).float().mean() >= 0.95


def test_heatmap_localises_glitch(rewards):
    I, _, scenes = make_batch(32, seed=7, cfg=WorldConfig(glitch_rate=1.0))
    with torch.no_grad():
        H = rewards["artifact"].heatmap(I)
    assert H.shape == (32, 1, 32, 32)
    for i, s in enumerate(scenes):
        if s.glitch is not None:
            y, x = divmod(int(H[i, 0].argmax()), 32)
            assert s.glitch[0] - 2 <= x < s.glitch[2] + 2 and s.glitch[1] - 2 <= y < s.glitch[3] + 2


def test_reward_is_differentiable(rewards):
    I = torch.rand(2, 3, 32, 32, requires_grad=True)
    with torch.enable_grad():
        rewards["attribute"](I).sum().backward()
    assert I.grad is not None and I.grad.abs().sum() > 0


def test_load_tiny_reward_errors():
    sd = ArtifactReward().state_dict()
    with pytest.raises(ValueError, match="focusfix_reward"):
        load_tiny_reward(sd, {"focusfix_reward": "tiny_nope"})
    with pytest.raises(ValueError, match="weight names differ"):
        load_tiny_reward({k: v for k, v in sd.items() if k != "bias"}, {"focusfix_reward": "tiny_artifact"})
    with pytest.raises(ValueError, match="has shape"):
        load_tiny_reward({**sd, "bias": torch.zeros(2)}, {"focusfix_reward": "tiny_artifact"})
    with pytest.raises(ValueError, match="colour"):
        AttributeReward(colour="pink")


def test_a_tiny_reward_file_claiming_a_huge_width_allocates_nothing_and_is_refused(tmp_path):
    """The reward is built on the meta device, so a crafted width (1e5: ~1 TB of weights at fp32) is refused by
    the shape check instead of allocating first."""
    from safetensors.torch import save_file
    good = ArtifactReward(width=16)
    path = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(path),
              {"focusfix_reward": "tiny_artifact", "width": "100000"})
    with pytest.raises(ValueError, match="has shape .*expected"):
        load_reward(path)
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(path),
              {"focusfix_reward": "tiny_artifact", "width": "16"})
    r = load_reward(path)
    assert all(p.device.type == "cpu" for p in r.parameters())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r(images), good.eval()(images))  # the file's weights, on the CPU


# --- found by mutation testing (session 25) ---

def test_artifact_heatmap_is_a_probability_high_on_the_glitch(rewards):
    # heatmap(I) is P(glitch) per pixel: in [0, 1], above 0.5 on glitches, low on clean images on average
    I, _, scenes = make_batch(8, seed=7, cfg=WorldConfig(glitch_rate=1.0))
    clean, _, _ = make_batch(8, seed=8, cfg=WorldConfig(glitch_rate=0.0))
    with torch.no_grad():
        H, Hc = rewards["artifact"].heatmap(I), rewards["artifact"].heatmap(clean)
    assert 0 <= H.min() and H.max() <= 1 and 0 <= Hc.min() and Hc.max() <= 1
    for i, s in enumerate(scenes):
        x0, y0, x1, y1 = s.glitch
        assert H[i, 0, y0:y1, x0:x1].max() > 0.5
    assert Hc.mean() < 0.25  # mostly low on clean images


def test_attribute_reward_colour_survives_describe_save_and_load(tmp_path):
    # an attribute reward of another colour and width is described, saved and loaded as that colour and width
    r = AttributeReward(colour="blue", width=8)
    assert r.describe()["colour"] == "blue"
    save_reward(r, tmp_path / "blue.safetensors")
    r2 = load_reward(tmp_path / "blue.safetensors")
    assert isinstance(r2, AttributeReward) and r2.colour == "blue" and r2.describe()["colour"] == "blue"
    I = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(r2(I), r.eval()(I))


def test_metadata_without_width_or_colour_means_the_shipped_16_and_red():
    # the documented defaults: width 16, colour red
    art = ArtifactReward(width=16)
    r = load_tiny_reward(art.state_dict(), {"focusfix_reward": "tiny_artifact"})
    assert r.net[0].out_channels == 16
    att = load_tiny_reward(AttributeReward(width=16).state_dict(), {"focusfix_reward": "tiny_attribute"})
    assert att.colour == "red"


def test_loaded_and_trained_rewards_are_frozen_but_pass_gradients_to_images(rewards):
    # a reward is a fixed judge: no trainable parameters after loading or training, gradients still reach the image
    trained = [train_artifact_reward(steps=1, batch=2, log=None), train_attribute_reward(steps=1, batch=2, log=None)]
    for r in [*rewards.values(), *trained]:
        assert not r.training and not any(p.requires_grad for p in r.parameters())
        I = torch.rand(1, 3, 32, 32, requires_grad=True)
        r(I).sum().backward()
        assert I.grad is not None and I.grad.abs().sum() > 0


def test_artifact_training_targets_mark_the_glitch():
    # the artifact reward's training batch: images in [0, 1], label = "has a glitch mask", and the pixel mask
    # sits where the (faded, blurred) glitch's magenta evidence is
    I, label, M = _artifact_batch(32, seed=3, cfg=TRAIN_WORLD)
    assert 0 <= I.min() and I.max() <= 1
    assert torch.equal(label.bool(), M.flatten(1).any(1)) and 0 < label.mean() < 1
    G = glitch_map(I)[:, None]
    for i in label.nonzero()[:, 0].tolist():
        inside = G[i][M[i].bool()].mean()
        outside = G[i][~M[i].bool()].mean()
        assert inside > outside + 0.03, (i, float(inside), float(outside))
    Ia, _ = _attribute_batch(8, seed=3, cfg=TRAIN_WORLD, colour="red")
    assert 0 <= Ia.min() and Ia.max() <= 1
