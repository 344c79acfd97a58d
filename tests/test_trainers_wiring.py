"""Trainers' wiring: each setting reaches the maths it names (lam, grad_clip, the negative prompt, each prompt's
cond, per-seed and per-item masks, the mask settings, DRaFT-LV copies, t_range, the Separate term, the
adapters-off preservation base), and a NaN score or gradient leaves the run where its last good step left it.

Each test here was checked to fail when its setting is dropped from `focusfix_core/trainers.py` (the test review's
mutations T1, T7, T8, T11, T14-T17, T19-T20, T22-T25, T29)."""
import math

import pytest
import torch

import focusfix_core.trainers as trainers
from focusfix_core.denoisers import CFGDenoiser, initial_x
from focusfix_core.losses import separate_loss
from focusfix_core.sampler import sample, seed_noise
from focusfix_core.trainers import (FixConfig, FixTrainer, NonFiniteLossError, SeparateEnhanceConfig,
                                    SeparateEnhanceTrainer)


def _fix(**kw) -> FixConfig:
    """16 px, 4 sampler steps: a step takes about 0.1 s on the small model."""
    base = dict(prompts=("a red circle",), seeds=(0, 1), height=16, width=16, steps=4, K=1, iterations=3,
                lr=2e-2, batch_size=2, cfg_scale=2.0, threshold_mode="value", threshold=0.5, dilation=0)
    base.update(kw)
    return FixConfig(**base)


def _se(**kw) -> SeparateEnhanceConfig:
    base = dict(prompts=("a red circle and a blue square",), objects=(("circle", "square"),), height=16, width=16,
                resolution=8, iterations=8, lr=5e-2, batch_size=2, lam_preserve=0.5)
    base.update(kw)
    return SeparateEnhanceConfig(**base)


def _lora(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.lora.state_dict().items()}


def _adapter_grad_norm(trainer) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params if p.grad is not None])))


def _halves():
    """Two different non-empty masks [2,16,16]: the left half and the top half."""
    M = torch.zeros(2, 16, 16)
    M[0, :, :8] = 1
    M[1, :8, :] = 1
    return M


# ---------------------------------------------------------------- the loss: lam, grad_clip
@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_lam_weights_the_region_term(small_model, square_reward, lam):
    """Focus-N-Fix eq. (2): every record's loss is -reward + lam * region (no reward_target: unbounded)."""
    trainer = FixTrainer(small_model, square_reward, _fix(lam=lam))
    recs = list(trainer)
    trainer.lora.remove()
    assert max(r.region for r in recs) > 0.1  # the LoRA moved I off I0: lam has a term to weigh
    for r in recs:
        assert r.loss == pytest.approx(-r.reward + lam * r.region, rel=1e-5, abs=1e-6), (lam, r)


def test_grad_clip_bounds_the_adapters_gradient(small_model, square_reward):
    """After a step the adapters' gradient has norm grad_clip; the record keeps the norm before clipping."""
    class Loud(type(square_reward)):  # a gradient far above the clip at step 0
        def score(self, I):
            return 1000 * super().score(I)

    clip = 1e-3
    trainer = FixTrainer(small_model, Loud(), _fix(mask_source="none", grad_clip=clip, iterations=1))
    rec = next(iter(trainer))
    norm = _adapter_grad_norm(trainer)
    trainer.lora.remove()
    assert rec.grad_norm > 5 * clip, rec.grad_norm
    assert norm <= clip * (1 + 1e-4) and norm == pytest.approx(clip, rel=1e-2), (norm, rec.grad_norm)


# ---------------------------------------------------------------- a NaN score or gradient
class _FlakyReward(torch.nn.Module):
    """The square reward whose score turns NaN from the `nan_from`-th call on, until `healthy` is set."""

    has_heatmap = False
    name = "flaky"

    def __init__(self, inner, nan_from: int):
        super().__init__()
        self.inner, self.nan_from, self.calls, self.healthy = inner, nan_from, 0, False

    def forward(self, I):
        self.calls += 1
        s = self.inner.score(I)
        return s if self.healthy or self.calls < self.nan_from else s * math.nan


def test_a_nan_score_restores_the_draws_and_the_step_is_redrawn_the_same(small_model, square_reward):
    """After a NaN score the generator and the item order are those after the last good step (nothing of the
    failed step's draws is kept), so going on with a healthy reward trains what an uninterrupted run trains."""
    cfg = _fix(seeds=(0, 1, 2), mask_source="none", iterations=4)  # 3 items at batch 2: an order is left over
    flaky = _FlakyReward(square_reward, nan_from=3)  # the 3rd call is step 2's
    trainer = FixTrainer(small_model, flaky, cfg)
    it = iter(trainer)
    next(it), next(it)
    rng, order, lora = trainer.generator.get_state(), list(trainer._order), _lora(trainer)
    assert order  # the failed step would consume it
    with pytest.raises(NonFiniteLossError, match="finite.*at step 3.*keeps the weights of step 2"):
        next(it)
    assert torch.equal(trainer.generator.get_state(), rng)
    assert trainer._order == order and trainer.step == 2
    assert all(torch.equal(v, lora[k]) for k, v in trainer.lora.state_dict().items())
    assert trainer.state_dict()["order"].tolist() == order  # what save_state would write
    flaky.healthy = True
    rest = list(trainer)
    assert [r.step for r in rest] == [2, 3]
    resumed = _lora(trainer)
    trainer.lora.remove()

    straight = FixTrainer(small_model, _FlakyReward(square_reward, nan_from=10**9), cfg)
    list(straight)
    for k, v in straight.lora.state_dict().items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0)
    straight.lora.remove()


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite score whose gradient is not."""

    @staticmethod
    def forward(ctx, I):
        return I.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


def test_a_nan_gradient_of_a_finite_score_stops_and_keeps_the_last_good_lora(small_model, square_reward):
    class NaNBackward(type(square_reward)):
        broken = False

        def score(self, I):
            return super().score(_NaNGrad.apply(I) if self.broken else I)

    reward = NaNBackward()
    trainer = FixTrainer(small_model, reward, _fix(mask_source="none", iterations=3))
    it = iter(trainer)
    next(it)
    good = _lora(trainer)
    assert any(v.abs().sum() > 0 for k, v in good.items() if "up" in k)  # step 0 moved the LoRA
    reward.broken = True
    with pytest.raises(NonFiniteLossError, match="gradient norm is nan at step 2.*keeps the weights of step 1"):
        next(it)
    assert trainer.step == 1
    for k, v in trainer.lora.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, good[k]), k
    trainer.lora.remove()


# ---------------------------------------------------------------- conditioning: negative prompt, several prompts
def test_the_negative_prompt_is_the_uncond_and_changes_I0(small_model, square_reward):
    neg = "a green triangle"
    I0 = {}
    for negative in ("", neg):
        trainer = FixTrainer(small_model, square_reward, _fix(negative_prompt=negative, cfg_scale=3.0))
        expected = small_model.encode_prompts([negative])["context"]
        torch.testing.assert_close(trainer.uncond["context"], expected, rtol=0, atol=0)
        I0[negative] = trainer.base([0, 1])[0]
        trainer.lora.remove()
    assert not torch.equal(small_model.encode_prompts([""])["context"], small_model.encode_prompts([neg])["context"])
    assert (I0[""] - I0[neg]).abs().amax() > 1e-3


def test_each_prompt_conditions_its_own_items(small_model, square_reward):
    """Two prompts, one seed: each item's I0 is what the base model samples for its own prompt and that seed."""
    prompts = ("a red circle", "a blue square")
    cfg = _fix(prompts=prompts, seeds=(3,), mask_source="none")
    trainer = FixTrainer(small_model, square_reward, cfg)
    I0 = trainer.base([0, 1])[0]
    trainer.lora.remove()
    assert (I0[0] - I0[1]).abs().amax() > 1e-2
    sigmas = trainer.sigmas
    uncond = small_model.encode_prompts([""])
    denoiser = CFGDenoiser(small_model.denoise, uncond, cfg.cfg_scale)
    for i, p in enumerate(prompts):
        x = initial_x(small_model, seed_noise([3], trainer.latent_shape), float(sigmas[0]))
        with torch.no_grad():
            direct = small_model.decode(sample(denoiser, x, sigmas, small_model.encode_prompts([p])))
        torch.testing.assert_close(I0[i], direct[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- masks: per seed, per item, the derivation settings
def test_a_mask_per_seed_goes_to_every_prompts_item_of_that_seed(small_model, square_reward):
    """2 prompts x 2 seeds, one painted mask per seed: item i gets the mask of its own seed (prompt-major items)."""
    seeds = (7, 3)  # not 0, 1: a seed must not double as its index
    M = _halves()
    trainer = FixTrainer(small_model, square_reward, _fix(prompts=("a red circle", "a blue square"), seeds=seeds,
                                                          mask_source="mask"), masks=M)
    assert trainer.items == [("a red circle", 7), ("a red circle", 3), ("a blue square", 7), ("a blue square", 3)]
    got = trainer.base([0, 1, 2, 3])[2]  # (4, 1, H, W)
    trainer.lora.remove()
    for i, (_, seed) in enumerate(trainer.items):
        assert torch.equal(got[i, 0], M[seeds.index(seed)]), i


def test_the_region_term_gets_each_batch_items_own_mask(small_model, square_reward, monkeypatch):
    """The M handed to region_loss is the items' masks in the batch's order, for every step."""
    M = torch.cat([_halves(), torch.zeros(1, 16, 16)])
    M[2, 4:12, 4:12] = 1
    trainer = FixTrainer(small_model, square_reward, _fix(seeds=(0, 1, 2), mask_source="mask"), masks=M)
    batches, seen = [], []
    next_items = trainer._next_items
    monkeypatch.setattr(trainer, "_next_items", lambda: batches.append(next_items()) or batches[-1])
    real = trainers.region_loss
    monkeypatch.setattr(trainers, "region_loss", lambda I, I0, Mb: seen.append(Mb.detach().clone()) or real(I, I0, Mb))
    list(trainer)
    trainer.lora.remove()
    assert len(seen) == len(batches) == 3
    for idx, Mb in zip(batches, seen):
        assert torch.equal(Mb, M[idx][:, None]), idx  # [b,1,H,W]


def test_a_derived_mask_gets_the_configs_mask_settings(small_model, square_reward, monkeypatch):
    calls = []
    real = trainers.mask_from_reward

    def spy(reward, I, **kw):
        calls.append(dict(kw))
        return real(reward, I, **kw)

    monkeypatch.setattr(trainers, "mask_from_reward", spy)
    cfg = _fix(mask_source="saliency", saliency_method="grad_x_input", blur_sigma=1.5, threshold_mode="top_percent",
               threshold=0.3, dilation=1, feather=0.5)
    trainer = FixTrainer(small_model, square_reward, cfg)
    trainer.base([0, 1])
    trainer.lora.remove()
    assert len(calls) == 2
    for kw in calls:
        assert isinstance(kw.pop("generator"), torch.Generator)
        assert kw == dict(mask_source="saliency", saliency_method="grad_x_input", blur_sigma=1.5,
                          threshold_mode="top_percent", threshold=0.3, dilation=1, feather=0.5)


@pytest.mark.parametrize("mask_source", ["saliency", "heatmap"])
def test_the_mask_is_derived_from_I0_as_vae_decode_shows_it(small_model, square_reward, mask_source):
    """The reward sees I0 clamped to [0, 1] when it draws the mask, as it scores I in training."""
    class Seeing(type(square_reward)):
        seen = []

        def score(self, I):
            self.seen.append(I.detach().clone())
            return super().score(I)

        def heatmap(self, I):
            self.seen.append(I.detach().clone())
            return super().heatmap(I)

    reward = Seeing()
    trainer = FixTrainer(small_model, reward, _fix(mask_source=mask_source, threshold_mode="top_percent", threshold=0.2))
    I0 = trainer.base([0, 1])[0]
    trainer.lora.remove()
    assert I0.amin() < 0 and I0.amax() > 1  # the case exists on this model
    assert len(reward.seen) == 2  # one image at a time
    for I in reward.seen:
        assert 0 <= float(I.amin()) and float(I.amax()) <= 1
    torch.testing.assert_close(torch.cat(reward.seen), I0.clamp(0, 1))


# ---------------------------------------------------------------- DRaFT-LV
def test_lv_copies_show_the_reward_that_many_copies_of_each_image(small_model, square_reward):
    class Counting(type(square_reward)):
        sizes = []

        def score(self, I):
            self.sizes.append(len(I))
            return super().score(I)

    reward = Counting()
    trainer = FixTrainer(small_model, reward, _fix(lv_copies=3, K=1, iterations=2))
    recs = list(trainer)
    trainer.lora.remove()
    assert reward.sizes == [3 * 2, 3 * 2]  # heatmap masks call no score: these are the two steps' batches
    assert all(math.isfinite(r.loss) and r.region is not None for r in recs)


# ---------------------------------------------------------------- Separate-and-Enhance
def test_the_separate_term_alone_lowers_the_overlap(small_model):
    """lam_en 0 and no preservation: training on Separate alone lowers Separate on the fixed evaluation maps."""
    trainer = SeparateEnhanceTrainer(small_model, _se(lam_en=0.0, lam_preserve=0.0))
    before = float(separate_loss(trainer.eval_maps()).mean())
    recs = list(trainer)
    after = float(separate_loss(trainer.eval_maps()).mean())
    trainer.lora.remove()
    assert trainer.preservation == "none" and all(r.preserve is None for r in recs)
    assert after < 0.95 * before, (before, after)


def test_outputs_preservation_compares_with_the_adapters_off(small_model):
    """The base x0 is the adapters-off model's: 0 while the LoRA is untrained, > 0 once it has moved."""
    trainer = SeparateEnhanceTrainer(small_model, _se(preservation="outputs", iterations=3))
    recs = list(trainer)
    trainer.lora.remove()
    assert trainer.preservation == "outputs"
    assert recs[0].preserve == 0.0  # an untrained LoRA adds exactly 0
    assert recs[-1].preserve > 0, [r.preserve for r in recs]


def test_noisy_latents_are_drawn_inside_t_range(small_model, monkeypatch):
    lo, hi = 0.3, 0.6
    trainer = SeparateEnhanceTrainer(small_model, _se(t_range=(lo, hi), lam_preserve=0.0, batch_size=4,
                                                      iterations=2))
    drawn, noisy = [], trainer._noisy

    def recording(b):
        x, sigma = noisy(b)
        drawn.append(sigma.clone())
        return x, sigma

    monkeypatch.setattr(trainer, "_noisy", recording)
    list(trainer)
    trainer.lora.remove()
    sig = small_model.sigmas.float()
    T = len(sig)
    low, high = sig[round(lo * (T - 1))], sig[round(hi * (T - 1))]
    s = torch.cat(drawn)
    assert len(s) == 8
    assert bool((s >= low).all() and (s <= high).all()), (s, low, high)
    assert len(s.unique()) > 1
