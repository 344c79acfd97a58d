"""The tiny world's shipped rewards: load through their metadata, read renders correctly (issue 4)."""
import pytest
import torch

from focusfix_core.rewards.base import Reward
from focusfix_core.rewards.loading import load_reward
from focusfix_core.tiny.rewards import (DEFAULT_REWARDS, ArtifactReward, AttributeReward, load_default_rewards,
                                        load_tiny_reward)
from focusfix_core.tiny.world import WorldConfig, make_batch


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
