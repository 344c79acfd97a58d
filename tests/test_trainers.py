"""Trainers on a small random tiny model: reward goes up, region term holds the outside, state resumes exactly."""
import json
import math
import re
from dataclasses import replace

import pytest
import torch
from torch_versions import compile_checked

from focusfix_core import trainers as tr
from focusfix_core.lora import LoRA
from focusfix_core.trainers import (MAX_RANK, FixConfig, FixTrainer, NonFiniteLossError, SeparateEnhanceConfig,
                                    SeparateEnhanceTrainer, split_objects_prompt)


def fix_cfg(**kw):
    base = dict(prompts=("a red circle",), seeds=(0, 1), height=16, width=16, steps=4, K=1, iterations=6,
                lr=2e-2, batch_size=2, cfg_scale=2.0, threshold_mode="value", threshold=0.5, dilation=0)
    base.update(kw)
    return FixConfig(**base)


def run(model, reward, cfg, **kw):
    trainer = FixTrainer(model, reward, cfg, **kw)
    records = list(trainer)
    return trainer, records


def outside_change(trainer):
    idx = list(range(len(trainer.items)))
    I0, _, M = trainer.base(idx)
    from focusfix_core.sampler import sample
    with torch.no_grad():
        I = trainer.model.decode(sample(trainer.denoiser, trainer._noise(idx), trainer.sigmas, trainer._cond(idx)))
    out = 1 - M  # [N,1,H,W]
    return float(((I - I0).abs() * out).sum() / out.sum() / 3), I, I0


def test_focus_n_fix_raises_reward_and_holds_outside(small_model, square_reward):
    results = {}
    for lam in (0.0, 2.0):
        trainer, recs = run(small_model, square_reward, fix_cfg(lam=lam))
        change, I, I0 = outside_change(trainer)
        results[lam] = (float(square_reward(I).mean() - square_reward(I0).mean()), change)
        assert trainer.method == ("draft" if lam == 0 else "focus-n-fix")
        assert all(math.isfinite(r.loss) for r in recs) and len(recs) == 6
        trainer.lora.remove()
    assert results[0.0][0] > 0 and results[2.0][0] > 0, results       # both raise the reward
    assert results[2.0][1] < results[0.0][1], results                 # lam > 0 changes the outside less


def test_an_item_training_never_met_with_a_flat_map_is_shown_not_fatal(small_model, square_reward):
    """before_after() raised on an item no step had drawn whose heatmap is flat: after the whole training, the
    node failed (its LoRA lost) and the CLI exited 2 without a report (review C3). It is drawn with its empty
    mask and listed in `unmasked`; a step on it is still refused."""
    trainer, _ = run(small_model, square_reward, fix_cfg(seeds=(0, 1, 2), batch_size=1, iterations=1))
    seen = set(trainer._cache)
    assert len(seen) == 1
    square_reward.heatmap = lambda I: torch.zeros_like(I[:, :1])  # flat from now on
    I0, I, M = trainer.before_after()
    assert [trainer.items.index(it) for it in trainer.unmasked] == [i for i in range(3) if i not in seen]
    for i in range(3):
        assert bool(M[i].any()) == (i in seen)
    assert I0.shape == I.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="mask of prompt 'a red circle', seed .* is empty"):
        trainer.base([trainer.items.index(trainer.unmasked[0])])
    trainer.lora.remove()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_ctrl_c_during_the_update_lands_once_the_step_is_counted(small_model, square_reward, request, signame):
    """A Ctrl-C between the optimizer's update and the step count left Adam a step ahead of the LoRA (restored to
    the snapshot before), or state.pt a step behind its LoRA: a resume trained one step too many (review C4). It
    now waits for the step to finish; the run then goes on as if never interrupted. The same for a SIGTERM, which
    the command line turns into a Ctrl-C (review G5)."""
    import os
    import signal

    from focusfix_core.trainers import stop_as_interrupt
    if not hasattr(signal, signame):
        pytest.skip(f"this platform has no {signame}")
    sig = getattr(signal, signame)
    # SIGTERM as the command line installs it; SIGINT as Python's own, which a background job (`cmd &` in a
    # script) starts without: its shell ignores SIGINT there, and Python then keeps it ignored
    previous = signal.signal(sig, stop_as_interrupt if sig != signal.SIGINT else signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(sig, previous))
    cfg = fix_cfg(iterations=4)
    whole, _ = run(small_model, square_reward, cfg)
    expected = {k: v.clone() for k, v in whole.lora.state_dict().items()}
    whole.lora.remove()
    trainer = FixTrainer(small_model, square_reward, cfg)
    real = trainer.optimizer.step

    def step(*a, **kw):
        out = real(*a, **kw)
        if trainer.step == 1:
            os.kill(os.getpid(), sig)  # a real Ctrl-C (or SIGTERM), right after the second update
        return out
    trainer.optimizer.step = step
    steps = iter(trainer)
    next(steps)
    with pytest.raises(KeyboardInterrupt):
        next(steps)
    assert trainer.step == len(trainer.history) == 2
    assert {float(st["step"]) for st in trainer.optimizer.state.values()} == {2.0}  # Adam's count is the LoRA's
    trainer.restore_last_good()  # what the command line does on Ctrl-C
    list(trainer)
    for k, v in trainer.lora.state_dict().items():
        assert torch.equal(v, expected[k]), k
    trainer.lora.remove()


def test_region_term_logged_and_mask_cached_once(small_model, square_reward, monkeypatch):
    import focusfix_core.trainers as tr
    calls = []
    real = tr.mask_from_reward
    monkeypatch.setattr(tr, "mask_from_reward", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer, recs = run(small_model, square_reward, fix_cfg(iterations=3))
    assert len(calls) == len(trainer.items) == 2  # M once per item, not per iteration
    assert recs[0].region == pytest.approx(0.0, abs=1e-6)  # the LoRA starts as the base model: I == I0
    assert all(r.region is not None for r in recs)
    trainer.lora.remove()


def test_deterministic_and_resume_exact(small_model, square_reward, tmp_path):
    cfg = fix_cfg(iterations=4)
    a, _ = run(small_model, square_reward, cfg)
    sd_a = {k: v.clone() for k, v in a.lora.state_dict().items()}
    a.lora.remove()
    b = FixTrainer(small_model, square_reward, cfg)
    for rec in b:
        if rec.step == 1:
            b.save_state(tmp_path / "state.pt")
            break
    b.lora.remove()
    c = FixTrainer(small_model, square_reward, cfg)
    c.load_state(tmp_path / "state.pt")
    assert c.step == 2
    rest = list(c)
    assert [r.step for r in rest] == [2, 3]
    for k, v in c.lora.state_dict().items():
        torch.testing.assert_close(v, sd_a[k], rtol=1e-5, atol=1e-6)
    c.lora.remove()


def test_block_checkpointing_trains_like_whole_call_checkpointing(small_model, square_reward, monkeypatch):
    """The trainer checkpoints the model's blocks one by one when the model names them; that saves memory only: the LoRA after 3 steps equals the one trained with whole-call checkpointing."""
    from focusfix_core import trainers
    assert small_model.checkpoint_modules()
    used = []
    orig = trainers.checkpointed_modules
    monkeypatch.setattr(trainers, "checkpointed_modules", lambda mods: used.append(len(mods)) or orig(mods))
    cfg = fix_cfg(iterations=3, lam=1.0)
    a, _ = run(small_model, square_reward, cfg)
    sd_a = {k: v.clone() for k, v in a.lora.state_dict().items()}
    a.lora.remove()
    assert used and all(n == len(small_model.checkpoint_modules()) for n in used)
    monkeypatch.setattr(type(small_model), "checkpoint_modules", lambda self: [])
    b, _ = run(small_model, square_reward, cfg)
    assert used[-1] == 0
    assert any(v.abs().sum() > 0 for k, v in sd_a.items() if "up" in k)
    for k, v in b.lora.state_dict().items():
        torch.testing.assert_close(v, sd_a[k], rtol=1e-4, atol=1e-6)
    b.lora.remove()


def test_painted_mask_and_latent_space(small_model, square_reward):
    M = torch.zeros(1, 16, 16)
    M[:, 4:12, 4:12] = 1
    trainer, recs = run(small_model, square_reward, fix_cfg(mask_source="mask", mask_space="latent", iterations=2),
                        masks=M)
    _, _, Mc = trainer.base([0, 1])
    assert torch.equal(Mc, M[:, None].expand(2, -1, -1, -1))  # [N,H,W] in, [N,1,H,W] kept
    trainer.lora.remove()


def test_painted_masks_keep_the_fingerprint_saved_states_hold(small_model, square_reward):
    """Painted masks are kept [N,1,H,W] but fingerprinted as [N,H,W], as states saved before that were: they
    resume, whichever layout the masks come in."""
    from focusfix_core.trainers import _digest
    M = torch.zeros(2, 16, 16)
    M[:, 4:12, 4:12] = 1
    for given in (M, M[:, None]):
        trainer = FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask"), masks=given)
        trainer.lora.remove()
        assert trainer._painted.shape == (2, 1, 16, 16) and trainer._painted_digest == _digest(M)


def test_nan_reward_stops_and_keeps_last_good_lora(small_model, square_reward):
    class FlakyReward(type(square_reward)):
        calls = 0

        def score(self, I):
            FlakyReward.calls += 1
            s = super().score(I)
            return s * float("nan") if FlakyReward.calls > 2 else s

    trainer = FixTrainer(small_model, FlakyReward(), fix_cfg(mask_source="none", iterations=5))
    it = iter(trainer)
    next(it), next(it)                      # the 3rd reward call is step 2's
    good = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="non-finite score.*keeps the weights of step 2"):
        next(it)
    for k, v in trainer.lora.state_dict().items():
        assert torch.equal(v, good[k])
    trainer.lora.remove()


def test_nonfinite_loss_guard(small_model, square_reward):
    trainer = FixTrainer(small_model, square_reward, fix_cfg(mask_source="none"))
    good = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"keeps the weights of step 0 \(lower lr or lam, or check the "
                                                 r"reward\)$"):
        trainer._optimizer_step(torch.tensor(float("nan"), requires_grad=True))
    assert all(torch.equal(v, good[k]) for k, v in trainer.lora.state_dict().items())
    trainer.lora.remove()
    # Separate-and-Enhance has no reward and no lam: its advice names its own settings (review extreme-F2)
    se = SeparateEnhanceTrainer(small_model, se_cfg())
    with pytest.raises(NonFiniteLossError, match=r"keeps the weights of step 0 \(lower lr, lam_sep or lam_en\)$"):
        se._optimizer_step(torch.tensor(float("inf"), requires_grad=True))
    se.lora.remove()


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=()), "prompts is empty"),
    (dict(prompts=("  ",)), "prompts is empty"),
    (dict(K=5, steps=4), "K"),
    (dict(rank=0), "rank"),
    (dict(rank=257), r"rank must be at most 256, got 257"),
    (dict(rank=100000), r"rank must be at most 256, got 100000"),  # a 1.9 GB LoRA of the tiny model, "done"
    (dict(mask_source="paint"), "mask_source"),
    (dict(lam=-1.0), "lam"),
    (dict(compile="fast"), "compile must be one of"),
    (dict(reward_target=float("inf")), "reward_target must be a finite number"),
    (dict(sampler_name="euler_ancestral"), r"sampler_name must be one of \['ddim', 'euler', 'dpmpp_2m'\]"),
    (dict(scheduler=""), "scheduler must be a scheduler's name"),
    (dict(sigmas=(14.6, 2.0)), "sigmas must be positive and end at 0"),
    (dict(sigmas=(14.6, 1.0, 0.0), K=3), r"K \(3\) is more than the 2 steps of the sigmas"),
    (dict(lv_copies=2, K=2), r"lv_copies > 0 \(DRaFT-LV\).*set K to 1 \(now 2\)$"),
])
def test_fix_config_errors_name_the_input(kw, match):
    with pytest.raises(ValueError, match=match):
        fix_cfg(**kw)


def test_sampler_scheduler_and_sigmas_drive_every_trajectory(small_model, square_reward):
    """The config's sampler and schedule are I0's, the training steps' and the previews': an untrained LoRA gives
    I == I0 (region 0 at step 0) with dpmpp_2m on karras, whose images differ from ddim on normal; explicit
    sigmas replace steps and scheduler."""
    from focusfix_core.sampler import sampling_sigmas
    from focusfix_core.schedules import get_sigmas_karras
    cfg = fix_cfg(iterations=2, sampler_name="dpmpp_2m", scheduler="karras")
    trainer, recs = run(small_model, square_reward, cfg)
    assert recs[0].region == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(trainer.sigmas, sampling_sigmas(small_model, 4, "karras"))
    I0 = trainer.base([0, 1])[0]
    trainer.lora.remove()
    plain = FixTrainer(small_model, square_reward, fix_cfg(iterations=2))
    assert (plain.base([0, 1])[0] - I0).abs().max() > 1e-3
    plain.lora.remove()
    sig = get_sigmas_karras(6, float(small_model.sigmas[0]), float(small_model.sigmas[-1]))
    given = fix_cfg(iterations=1, sampler_name="dpmpp_2m", steps=20, scheduler="normal", sigmas=tuple(sig.tolist()))
    assert given.steps == 6
    trainer = FixTrainer(small_model, square_reward, given)
    torch.testing.assert_close(trainer.sigmas, sig)
    trainer.lora.remove()
    with pytest.raises(ValueError, match=r"unknown scheduler 'beta'"):
        FixTrainer(small_model, square_reward, fix_cfg(scheduler="beta"))


def test_trainer_input_errors(small_model, square_reward):
    with pytest.raises(ValueError, match="mask M is 8x8 but images are 16x16"):
        FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask"), masks=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="no masks"):
        FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask"))
    with pytest.raises(ValueError, match="targets pattern .nonexistent_layer. matches no"):
        FixTrainer(small_model, square_reward, fix_cfg(targets=("nonexistent_layer",)))

    class NoHeat(type(square_reward)):
        has_heatmap = False
    with pytest.raises(ValueError, match="heatmap"):
        FixTrainer(small_model, NoHeat(), fix_cfg(mask_source="heatmap"))


def test_a_model_that_is_no_diffusion_model_is_named_not_an_attribute_error(small_model, square_reward):
    """A ComfyUI MODEL (a ModelPatcher) or a diffusers pipeline handed to a trainer as it is failed with an
    AttributeError on `latent_scale`; each trainer now names what the model lacks (Separate-and-Enhance also the
    attention it reads)."""
    class Patcher:  # what a script might pass: a ModelPatcher has `model`, not `net`
        model = small_model.net

    with pytest.raises(TypeError, match=r"model must be a DiffusionModel .*got a Patcher without net, sigmas, "
                                        r"latent_channels, latent_scale, denoise, decode, encode_prompts$"):
        FixTrainer(Patcher(), square_reward, fix_cfg())

    class NoAttention:  # everything Focus-N-Fix calls, nothing to read cross-attention through
        def __init__(self):
            for m in tr.MODEL_MEMBERS:
                setattr(self, m, getattr(small_model, m))

    with pytest.raises(TypeError, match=r"got a NoAttention without token_indices, attention_capture$"):
        SeparateEnhanceTrainer(NoAttention(), se_cfg())
    assert FixTrainer(NoAttention(), square_reward, fix_cfg()).model.net is small_model.net


def se_cfg(**kw):
    base = dict(prompts=("a red circle and a blue square",), objects=(("circle", "square"),), height=16, width=16,
                resolution=8, iterations=8, lr=5e-2, batch_size=2, lam_preserve=0.5)
    base.update(kw)
    return SeparateEnhanceConfig(**base)


@pytest.mark.parametrize("preservation, lam", [("outputs", 0.5), ("keys", 0.1)])
def test_separate_enhance_lowers_its_losses_and_preserves(small_model, preservation, lam):
    from focusfix_core.losses import enhance_loss, separate_loss
    trainer = SeparateEnhanceTrainer(small_model, se_cfg(preservation=preservation, lam_preserve=lam))
    assert trainer.preservation == preservation
    assert trainer.cfg.preserve_prompts == ("a red circle", "a blue square")
    A0 = trainer.eval_maps()
    recs = list(trainer)
    A1 = trainer.eval_maps()
    before = separate_loss(A0) + enhance_loss(A0)
    after = separate_loss(A1) + enhance_loss(A1)
    assert A1.shape == (1, 2, 8, 8)
    assert float(after) < float(before), (before, after)
    assert all(r.preserve is not None and r.separate is not None for r in recs)
    names = trainer.lora.module_names
    assert names and all(n.endswith("attn2.to_k") for n in names)   # the paper's parameter set
    trainer.lora.remove()


def test_separate_enhance_errors(small_model):
    with pytest.raises(ValueError, match="giraffe"):
        SeparateEnhanceTrainer(small_model, se_cfg(objects=(("circle", "giraffe"),)))
    with pytest.raises(ValueError, match="two object words"):
        se_cfg(objects=(("circle",),))
    with pytest.raises(ValueError, match="needs object words"):
        split_objects_prompt("a cat and a dog")
    assert split_objects_prompt("a cat and a dog | cat, dog") == ("a cat and a dog", ["cat", "dog"])
    with pytest.raises(ValueError, match=r"prompt line ' \| cat, dog' has no prompt before '\|'"):
        split_objects_prompt(" | cat, dog")  # named at queue time, not "prompts is empty" when it runs


def test_rank_is_bounded_for_both_methods(small_model, square_reward):
    """The nodes' widget and the configs share the bound; a rank within it but above a targeted layer's size is
    refused by the LoRA, naming the layer, before any hook goes on."""
    assert MAX_RANK == 256 and fix_cfg(rank=256).rank == 256
    with pytest.raises(ValueError, match="rank must be at most 256, got 300"):
        se_cfg(rank=300)
    hooks = sum(len(m._forward_hooks) for m in small_model.net.modules())
    with pytest.raises(ValueError, match=r"rank must be at most 16, the smaller size of the targeted layer "
                                         r"'down_blocks\.1\.attentions\.0\..*attn1\.to_q' \(Linear 16 -> 16\), got 17"):
        FixTrainer(small_model, square_reward, fix_cfg(rank=17))
    assert sum(len(m._forward_hooks) for m in small_model.net.modules()) == hooks
    FixTrainer(small_model, square_reward, fix_cfg(rank=16)).lora.remove()  # full rank: the most it can use


def test_failed_setup_leaves_no_hooks(small_model, square_reward):
    def hooks():
        return sum(len(m._forward_hooks) for m in small_model.net.modules())

    before = hooks()
    with pytest.raises(ValueError, match="mask M is 8x8"):
        FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask"), masks=torch.ones(1, 8, 8))
    assert hooks() == before
    trainer = FixTrainer(small_model, square_reward, fix_cfg())
    assert hooks() > before
    I = trainer.sample_images([0, 1])
    I0, _, _ = trainer.base([0, 1])
    torch.testing.assert_close(I, I0)          # an untrained LoRA gives the base images
    trainer.lora.remove()
    assert hooks() == before


def _count_denoise(model, monkeypatch) -> list:
    calls, denoise = [], model.denoise
    monkeypatch.setattr(model, "denoise", lambda *a, **k: calls.append(1) or denoise(*a, **k))
    return calls


@pytest.mark.parametrize("batch_size", [2, 1])  # 1: the two preserve prompts are captured in two passes
def test_keys_preservation_reads_the_text_and_runs_no_unet_pass(small_model, monkeypatch, batch_size):
    trainer = SeparateEnhanceTrainer(small_model, se_cfg(batch_size=batch_size))
    assert trainer.preservation == "keys"                      # auto, to_k LoRA
    assert trainer.metadata()["focusfix_preservation"] == "keys"
    assert len(trainer._text) == 1 and trainer._text[0].shape[0] == 2   # one context shared by every attn2
    torch.testing.assert_close(trainer._key_energy, torch.stack([                # per prompt, every layer
        sum(h(trainer._text[0][i]).square().sum() for h in trainer.lora._hosts) for i in range(2)]))
    # what each adapted layer reads for a preserve prompt is the same at any noise and timestep: the kept text
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(1))
    seen = trainer._layer_inputs([1, 0], x, small_model.sigmas.float()[[3, 7]])
    for inp, k in zip(seen, trainer._slots):
        torch.testing.assert_close(inp, trainer._text[k][[1, 0]], rtol=0, atol=0)
    calls = _count_denoise(small_model, monkeypatch)
    rec = trainer.train_step()
    assert len(calls) == len({len(o) for o in trainer.cfg.objects}) and rec.preserve is not None  # maps pass only
    trainer.lora.remove()
    out = SeparateEnhanceTrainer(small_model, se_cfg(preservation="outputs"))
    calls.clear()
    out.train_step()
    assert len(calls) == 3                                     # maps + base + adapted passes
    out.lora.remove()


def _x0_change(trainer) -> float:
    """Mean |x0(LoRA) - x0(base)| on the preserve prompts at fixed noisy latents."""
    P = len(trainer.cfg.preserve_prompts)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(P, *trainer.latent_shape, generator=g) * 3
    sigma = trainer.model.sigmas.float()[-3].expand(P)
    with torch.no_grad():
        with trainer.lora.disabled():
            base = trainer.model.denoise(x, sigma, trainer.pcond)
        return (trainer.model.denoise(x, sigma, trainer.pcond) - base).abs().mean().item()


def test_keys_preservation_keeps_single_object_prompts(small_model):
    free = SeparateEnhanceTrainer(small_model, se_cfg(lam_preserve=0.0, preserve_prompts=("a red circle",),
                                                      iterations=6))
    assert free.preservation == "none"
    list(free)
    change_free = _x0_change(free)
    free.lora.remove()
    kept = SeparateEnhanceTrainer(small_model, se_cfg(lam_preserve=50.0, preserve_prompts=("a red circle",),
                                                      iterations=6))
    recs = list(kept)
    change_kept = _x0_change(kept)
    kept.lora.remove()
    assert change_free > 0
    assert change_kept < 0.5 * change_free, (change_kept, change_free)
    assert recs[0].preserve == 0.0 and recs[-1].preserve > 0   # the untrained LoRA changes no key


def test_preservation_choice_follows_the_targets(small_model):
    t = SeparateEnhanceTrainer(small_model, se_cfg(targets="attn"))
    assert t.preservation == "outputs"                         # auto: attn1 reads the image
    t.lora.remove()
    with pytest.raises(ValueError, match="preservation='keys' needs a LoRA only on cross-attention"):
        SeparateEnhanceTrainer(small_model, se_cfg(targets="attn", preservation="keys"))
    with pytest.raises(ValueError, match="preservation must be one of"):
        se_cfg(preservation="pixels")


def test_keys_preservation_checks_the_base_keys_once(small_model, monkeypatch):
    """The base keys' energy is checked when the trainer is built (a clear error for zero keys), and the step's
    key_change_loss reads no values (check_energy=False: no host sync mid-step)."""
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in small_model.net.modules())

    to_k = [m for n, m in small_model.net.named_modules() if n.endswith("attn2.to_k")]
    assert to_k
    saved, before = [m.weight.detach().clone() for m in to_k], hooks()
    try:
        with torch.no_grad():
            for m in to_k:
                m.weight.zero_()
        with pytest.raises(ValueError, match="adapted keys of a preserve prompt are zero"):
            SeparateEnhanceTrainer(small_model, se_cfg(preservation="keys"))
    finally:
        with torch.no_grad():
            for m, w in zip(to_k, saved):
                m.weight.copy_(w)
    assert hooks() == before                                   # no LoRA or capture hook left behind
    import focusfix_core.trainers as trainers
    seen = []
    real = trainers.key_change_loss
    monkeypatch.setattr(trainers, "key_change_loss", lambda d, e, **kw: seen.append(kw) or real(d, e, **kw))
    t = SeparateEnhanceTrainer(small_model, se_cfg(preservation="keys"))
    t.train_step()
    t.lora.remove()
    assert seen == [{"check_energy": False}]


def test_keys_preservation_refused_when_a_patch_feeds_the_image_to_to_k(small_model):
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in small_model.net.modules())

    attn2 = next(m for n, m in small_model.net.named_modules() if n.endswith("attn2"))
    # another node's patch: the keys now also read the hidden state
    h = attn2.register_forward_pre_hook(lambda m, args: (args[0], args[1] + args[0].mean((1, 2))[:, None, None]))
    try:
        before = hooks()
        t = SeparateEnhanceTrainer(small_model, se_cfg())
        assert t.preservation == "outputs"
        t.lora.remove()
        with pytest.raises(ValueError, match="read more than the text"):
            SeparateEnhanceTrainer(small_model, se_cfg(preservation="keys"))
        assert hooks() == before                               # no LoRA or capture hook left behind
    finally:
        h.remove()


def test_slots_by_storage_shares_only_identical_views():
    from focusfix_core.trainers import _slots_by_storage
    a, b = torch.zeros(2, 5), torch.zeros(2, 5)
    assert _slots_by_storage([a, b, a, a[:, :3], a.view(5, 2)]) == [0, 1, 0, 2, 3]


# -- compiled graph-free sampler steps (FixConfig.compile) -------------------------------------------------------
@pytest.fixture
def compiler(monkeypatch):
    """FixConfig.compile through dynamo with an eager backend (no C++/Triton build): records the size of every
    graph it is handed; `perturb` makes the compiled calls round differently from eager ones, as real kernels do."""
    import torch._dynamo

    import focusfix_core.trainers as tr
    graphs, opts = [], {"perturb": 0.0}

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))

        def run(*args):
            out = gm.forward(*args)
            return type(out)(o * (1 + opts["perturb"]) if torch.is_floating_point(o) else o for o in out)

        return run

    monkeypatch.setattr(tr, "compile_denoiser",
                        lambda denoiser, mode: torch.compile(lambda x, s, c: denoiser(x, s, c), backend=backend,
                                                             dynamic=False))
    torch._dynamo.reset()
    yield graphs, opts
    torch._dynamo.reset()


@compile_checked
def test_compiled_sampler_traces_once_and_trains_like_eager(small_model, square_reward, compiler):
    graphs, _ = compiler
    cfg = fix_cfg(iterations=3)
    eager, _ = run(small_model, square_reward, cfg)
    expected = {k: v.clone() for k, v in eager.lora.state_dict().items()}
    eager.lora.remove()
    trainer, recs = run(small_model, square_reward, replace(cfg, compile="reduce-overhead"))
    assert len(graphs) == 1                       # one graph, no break: I0, 3 trajectories, no recompile
    trainer.sample_images([0, 1])                  # previews at the training batch size reuse it
    assert len(graphs) == 1
    for k, v in trainer.lora.state_dict().items():
        assert torch.equal(v, expected[k]), k      # the eager backend computes what eager sampling does
    assert recs[0].region == 0.0
    assert json.loads(trainer.metadata()["focusfix_config"])["compile"] == "reduce-overhead"
    trainer.lora.remove()
    # a later run with other settings (cfg scale, steps, prompts, LoRA) reuses the graph: no recompile
    other, _ = run(small_model, square_reward, replace(cfg, compile="default", cfg_scale=4.5, steps=6, rank=2,
                                                       prompts=("a blue square",), negative_prompt="blurry"))
    assert len(graphs) == 1
    other.lora.remove()


@compile_checked
def test_compiled_sampler_compiles_a_model_checkpointed_in_whole_calls(small_model, square_reward, compiler,
                                                                         monkeypatch):
    """A model without named blocks: its differentiated calls are checkpointed whole. The first step's mutation
    mode, entered there at the step's start, put the compiled graph-free calls under a dispatch mode, so dynamo
    skipped the sampler's code for the whole process, for every later run too (session 23 review, 1)."""
    graphs, _ = compiler
    monkeypatch.setattr(small_model, "checkpoint_modules", lambda: [])
    whole, _ = run(small_model, square_reward, fix_cfg(iterations=2, compile="default"))
    whole.lora.remove()
    monkeypatch.undo()
    blocks, _ = run(small_model, square_reward, fix_cfg(iterations=2, compile="default"))
    blocks.lora.remove()
    assert not whole._checkpoint_modules and blocks._checkpoint_modules
    assert len(graphs) == 1
    for trainer in (whole, blocks):
        inner = trainer.sampling_denoiser.inner
        assert inner.compiled_calls > 0 and inner.eager_calls == 0, (inner.compiled_calls, inner.eager_calls)


def test_compiled_sampler_keeps_I_equal_I0_at_step_0(small_model, square_reward, compiler):
    """Compiled kernels round differently from eager ones: I0's last K steps run eagerly, like I's
    differentiated calls, so an untrained LoRA still gives I == I0 bit for bit."""
    graphs, opts = compiler
    opts["perturb"] = 1e-3
    trainer, recs = run(small_model, square_reward, fix_cfg(iterations=2, compile="default", K=2))
    assert graphs and recs[0].region == 0.0
    assert recs[1].region > 0                     # the perturbation does reach the sampler
    trainer.lora.remove()


def test_compile_failure_falls_back_to_eager_with_a_warning(small_model, square_reward, monkeypatch, caplog):
    import torch._dynamo

    import focusfix_core.trainers as tr

    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(tr, "compile_denoiser", lambda d, mode: torch.compile(d, backend=broken))
    torch._dynamo.reset()
    cfg = fix_cfg(iterations=2)
    eager, _ = run(small_model, square_reward, cfg)
    expected = {k: v.clone() for k, v in eager.lora.state_dict().items()}
    eager.lora.remove()
    with caplog.at_level("WARNING", logger="focusfix_core.sampler"):
        trainer, _ = run(small_model, square_reward, replace(cfg, compile="default"))
    torch._dynamo.reset()
    assert "RuntimeError: no working C++ compiler" in trainer.sampling_denoiser.inner.failure
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1   # once, not per call
    for k, v in trainer.lora.state_dict().items():
        assert torch.equal(v, expected[k]), k
    trainer.lora.remove()


def test_compile_refused_up_front_falls_back_to_eager(small_model, square_reward, monkeypatch, caplog):
    """torch.compile raises at once where it has no support (older torch on Windows, Python 3.15+)."""
    import focusfix_core.trainers as tr

    def unsupported(denoiser, mode):
        raise RuntimeError("Windows not yet supported for torch.compile")

    monkeypatch.setattr(tr, "compile_denoiser", unsupported)
    with caplog.at_level("WARNING", logger="focusfix_core.sampler"):
        trainer, recs = run(small_model, square_reward, fix_cfg(iterations=1, compile="default"))
    inner = trainer.sampling_denoiser.inner
    assert inner.failure == "RuntimeError: Windows not yet supported for torch.compile" and inner.eager_calls > 0
    assert sum("torch.compile is not available here" in r.getMessage() for r in caplog.records) == 1
    assert len(recs) == 1
    trainer.lora.remove()


# -- fp16 compute: loss scaling ---------------------------------------------------------------------------------
class _Faint(torch.nn.Module):
    """A reward whose per-pixel gradients are small, as a real reward's are."""

    name, has_heatmap = "faint", False

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, I):
        return 1e-4 * self.inner(I)


class _HalfModel:
    """The tiny model with its weights stored and computed in fp16 and x0 handed back in fp32, as ComfyUI runs
    SD1.5/SDXL UNets on most GPUs."""

    def __init__(self, model):
        self.inner, self.net, self.sigmas, self.name = model, model.net.half(), model.sigmas, "half"
        self.latent_channels, self.latent_scale = model.latent_channels, model.latent_scale

    def denoise(self, x, sigma, cond):
        with torch.autocast("cpu", dtype=torch.float16):
            return self.inner.denoise(x.half(), sigma, {k: v.half() for k, v in cond.items()}).float()

    def decode(self, z):
        return self.inner.decode(z)

    def encode_prompts(self, prompts):
        return self.inner.encode_prompts(prompts)


def _tiny(half: bool):
    from focusfix_core.tiny.model import TinyConfig, TinyModel
    model = TinyModel.random(seed=0, config=TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16,
                                                       text_layers=1))
    return _HalfModel(model) if half else model


def test_fp16_compute_trains_with_loss_scaling(square_reward, monkeypatch):
    import focusfix_core.trainers as tr
    cfg = fix_cfg(iterations=1, mask_source="saliency")
    (fp32,), (fp16,) = (run(_tiny(half), _Faint(square_reward), cfg)[1] for half in (False, True))
    assert fp32.loss_scale is None and fp16.loss_scale == 2.0**16
    # 2 %: a few pixels near the reward's [0, 1] clamp fall on the other side of it in fp16
    assert fp16.grad_norm == pytest.approx(fp32.grad_norm, rel=2e-2) and fp32.grad_norm > 0
    monkeypatch.setattr(tr, "_fp16_in_gradient_path", lambda model: False)  # the trainer before
    (unscaled,) = run(_tiny(True), _Faint(square_reward), cfg)[1]
    assert unscaled.grad_norm == 0.0                   # the gradients flushed to zero: the LoRA never moves


def test_fp16_overflow_skips_the_update_and_halves_the_scale(square_reward, tmp_path):
    trainer = FixTrainer(_tiny(True), _Faint(square_reward), fix_cfg(iterations=3, mask_source="saliency"))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # far too high: fp16 activations overflow
    start = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    recs = [next(iter(trainer)) for _ in range(2)]
    assert [r.skipped for r in recs] == [True, True] and "update skipped" in recs[0].summary()
    assert [r.loss_scale for r in recs] == [2.0**100, 2.0**99]
    assert all(torch.equal(v, start[k]) for k, v in trainer.lora.state_dict().items())  # nothing applied
    trainer.save_state(tmp_path / "state.pt")
    again = FixTrainer(_tiny(True), _Faint(square_reward), fix_cfg(iterations=3, mask_source="saliency"))
    again.load_state(tmp_path / "state.pt")
    assert again.scaler.get_scale() == 2.0**98 and again.history[0].skipped  # resumes with the scale it reached
    trainer.lora.remove()
    again.lora.remove()



@pytest.mark.parametrize("scaler, found", [
    ({"scale": math.inf}, "inf"),   # a run resumed at scale inf skips every update
    ("high", "'high'"),
    (None, None),                   # a missing field
])
def test_a_resume_with_an_invalid_loss_scaler_state_is_refused(square_reward, scaler, found):
    # the fp16 run's loss scale comes back from the state: a damaged one is refused by name, not trained on
    trainer = FixTrainer(_tiny(True), _Faint(square_reward), fix_cfg(iterations=3, mask_source="saliency"))
    next(iter(trainer))
    state = trainer.state_dict()
    trainer.lora.remove()
    good = state["scaler"]
    bad = {k: v for k, v in good.items() if k != "growth_interval"} if scaler is None else (
        {**good, **scaler} if isinstance(scaler, dict) else scaler)
    again = FixTrainer(_tiny(True), _Faint(square_reward), fix_cfg(iterations=3, mask_source="saliency"))
    with pytest.raises(ValueError, match="^the training state is invalid: scaler must be a GradScaler state") as e:
        again.load_state_dict({**state, "scaler": bad})
    assert found is None or found in str(e.value)
    assert again.step == 0 and again.scaler.get_scale() == 2.0**16   # left as it was
    again.load_state_dict(state)
    assert again.step == 1 and again.scaler.get_scale() == good["scale"]
    again.lora.remove()

def test_the_models_own_guidance_drives_every_cfg_call(small_model, square_reward, monkeypatch):
    """A model with `guidance_function` (a patched ComfyUI MODEL): I0, the trajectories and I's differentiated
    step all combine predictions through it (region exactly 0 at step 0); a model that refuses its patches
    stops the trainer before anything is attached."""
    calls = []

    def guidance(x, sigma, x0_c, x0_u, scale):
        calls.append(torch.is_grad_enabled())
        return x0_u + (x0_c - x0_u) * scale * 0.5  # half the guidance: another image than plain CFG
    plain = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    plain_I0 = plain.base([0, 1])[0]
    plain.lora.remove()
    monkeypatch.setattr(small_model, "guidance_function", lambda: guidance, raising=False)
    trainer, records = run(small_model, square_reward, fix_cfg(iterations=2, lr=1e-2))
    steps = trainer.cfg.steps
    assert len(calls) == steps + 2 * steps     # I0 of both items in one batch, then 2 iterations (batch 2)
    assert calls.count(True) == 2              # K = 1 differentiated call per iteration
    assert records[0].region == 0.0
    assert (trainer.base([0, 1])[0] - plain_I0).abs().max() > 1e-3
    trainer.lora.remove()

    def refuse():
        raise ValueError("the MODEL carries 'x', which training cannot follow")
    monkeypatch.setattr(small_model, "guidance_function", refuse, raising=False)
    hooks = sum(len(m._forward_hooks) for m in small_model.net.modules())
    with pytest.raises(ValueError, match="training cannot follow"):
        FixTrainer(small_model, square_reward, fix_cfg())
    assert sum(len(m._forward_hooks) for m in small_model.net.modules()) == hooks


def test_the_models_noise_scaling_starts_every_trajectory(small_model, square_reward, monkeypatch):
    """A model with `noise_scaling` (ComfyUI: KSampler's sqrt(1 + sigma^2) at the top of the schedule) sets the start
    x of I0's and I's trajectories; without it x = sigma_max * noise."""
    from focusfix_core.sampler import seed_noise
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    noise = seed_noise([0, 1], trainer.latent_shape)
    torch.testing.assert_close(trainer._noise([0, 1]), noise * trainer.sigmas[0])
    trainer.lora.remove()
    seen = []
    monkeypatch.setattr(small_model, "noise_scaling", lambda n, s: seen.append(s) or n * (1 + s * s) ** 0.5,
                        raising=False)
    trainer, records = run(small_model, square_reward, fix_cfg(iterations=1))
    sigma_max = float(trainer.sigmas[0])
    torch.testing.assert_close(trainer._noise([0, 1]), noise * (1 + sigma_max ** 2) ** 0.5)
    assert seen and all(s == sigma_max for s in seen) and records[0].region == 0.0
    trainer.lora.remove()


def test_metadata_names_the_models_family(small_model, square_reward, monkeypatch):
    """A model that names its family (the ComfyUI adapter) gets the base-model keys other UIs read; the tiny
    model, which has none, gets none."""
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    assert "ss_base_model_version" not in trainer.metadata()
    monkeypatch.setattr(small_model, "family", "sdxl", raising=False)
    meta = trainer.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.resolution"] == "16x16"
    assert meta["modelspec.title"] == "FocusFix focus-n-fix"
    trainer.lora.remove()


def test_reward_target_ends_the_push_once_reached(small_model, square_reward):
    """Below the target the first step is the unbounded one (same LoRA); with a target every image has already
    reached, training only holds the region: the LoRA stays at its start (I == I0, region 0 throughout)."""
    cfg = fix_cfg(iterations=1)
    free, _ = run(small_model, square_reward, cfg)
    sd_free = {k: v.clone() for k, v in free.lora.state_dict().items()}
    I0 = free.base([0, 1])[0]
    scores = square_reward(I0.clamp(0, 1))  # as the trainer scores it
    free.lora.remove()
    above, _ = run(small_model, square_reward, replace(cfg, reward_target=float(scores.max()) + 1.0))
    for k, v in above.lora.state_dict().items():
        torch.testing.assert_close(v, sd_free[k])
    above.lora.remove()
    reached, recs = run(small_model, square_reward, replace(cfg, iterations=3, reward_target=float(scores.min()) - 1.0))
    assert all(r.region == pytest.approx(0.0, abs=1e-6) for r in recs)
    assert all(float(v.abs().sum()) == 0 for k, v in reached.lora.state_dict().items() if "up" in k)
    reached.lora.remove()


def test_a_batch_with_a_new_item_is_sampled_whole(small_model, square_reward, monkeypatch):
    """I0 of a new item comes from the batch that first trains it (kernels round differently at other batch
    sizes), cached items keep their first I0, and a batch of cached items samples nothing; before_after()
    goes batch_size items at a time."""
    import focusfix_core.trainers as tr
    batches = []
    real = tr.sample
    monkeypatch.setattr(tr, "sample", lambda den, x, *a, **k: batches.append(len(x)) or real(den, x, *a, **k))
    trainer = FixTrainer(small_model, square_reward, fix_cfg(seeds=(0, 1, 2), batch_size=2))
    first = trainer.base([0])[0].clone()
    trainer.base([0, 1])
    trainer.base([1, 0])
    assert batches == [1, 2]
    torch.testing.assert_close(trainer.base([0])[0], first, rtol=0, atol=0)
    batches.clear()
    I0, I, M = trainer.before_after()
    assert I0.shape == I.shape == (3, 3, 16, 16) and M.shape == (3, 1, 16, 16)
    assert batches == [2, 1, 1]  # I of [0, 1] (their I0 is cached), then I0 and I of [2]
    trainer.lora.remove()


@pytest.mark.parametrize("mask_source", ["heatmap", "mask"])
def test_the_cache_and_the_before_after_images_stay_in_cpu_memory(small_model, square_reward, mask_source):
    """Device memory does not grow with the number of (prompt, seed) items: I0, z0 and M are cached in CPU
    memory and copied to the trainer's device per batch; before_after() hands back CPU tensors. (On this
    CPU-only machine the device is switched to `meta` once the cache is filled, to see where base() puts them.)"""
    masks = torch.zeros(3, 16, 16) if mask_source == "mask" else None
    if masks is not None:
        masks[:, 4:8, 4:8] = 1
    trainer = FixTrainer(small_model, square_reward, fix_cfg(seeds=(0, 1, 2), batch_size=2, mask_source=mask_source),
                         masks=masks)
    I0, I, M = trainer.before_after()
    assert {t.device.type for t in (I0, I, M)} == {"cpu"}
    assert {t.device.type for entry in trainer._cache.values() for t in entry} == {"cpu"}
    assert trainer._painted is None or trainer._painted.device.type == "cpu"
    trainer.device = torch.device("meta")  # every item is cached: base() only copies
    out = trainer.base([2, 0])
    assert [t.device.type for t in out] == ["meta"] * 3
    assert [tuple(t.shape) for t in out] == [(2, 3, 16, 16), (2, *trainer.latent_shape), (2, 1, 16, 16)]
    trainer.device = torch.device("cpu")
    trainer.release()  # the end of a run: the cache goes, images can still be drawn (hooks, not merged)
    assert trainer._cache == {} and trainer._train_denoiser.originals == []
    # in before_after()'s batches of 2: another batch size rounds differently (torch 2.5: 1.2e-5 at one pixel)
    torch.testing.assert_close(torch.cat([trainer.sample_images([0, 1]), trainer.sample_images([2])]), I)
    trainer.lora.remove()


def test_before_after_progress_announces_and_follows_every_sampler_step(small_model, square_reward):
    """progress(total) is called once; its callback follows exactly `total` sampler steps: I0 of the batches with
    an item training never saw, and every I."""
    cfg = fix_cfg(seeds=(0, 1, 2), batch_size=2, iterations=1)
    for train in (False, True):
        trainer = FixTrainer(small_model, square_reward, cfg)
        if train:
            list(trainer)  # one step on 2 of the 3 items: their batch's I0 is cached
        totals, steps = [], []
        trainer.before_after(progress=lambda total: totals.append(total) or steps.append)
        new_chunks = 1 if train else 2
        assert totals == [cfg.steps * (2 + new_chunks)] and len(steps) == totals[0]
        assert all({"i", "x", "denoised"} <= set(info) for info in steps)
        trainer.lora.remove()


class _Cancel(Exception):
    pass


def test_a_cancel_between_derived_masks_stops_before_the_next_mask(small_model, square_reward):
    """Standards audit 4: deriving masks (smoothgrad: 8 reward backwards per item) ran on for every item after a
    cancel. on_sampler_step is now asked before each item's mask; a cancel there leaves nothing cached, and the
    trainer then trains as one that was never cancelled."""
    cfg = fix_cfg(iterations=1, saliency_method="smoothgrad", mask_source="saliency", threshold_mode="top_percent",
                  threshold=0.2)
    seen = []

    def cancel_at_second_mask(info):
        if "mask_item" in info:
            seen.append(info["mask_item"])
            if len(seen) == 2:
                raise _Cancel

    ref = FixTrainer(small_model, square_reward, cfg)
    ref_loss = list(ref)[-1].loss
    ref.lora.remove()
    trainer = FixTrainer(small_model, square_reward, cfg, on_sampler_step=cancel_at_second_mask)
    with pytest.raises(_Cancel):
        trainer.train_step()
    assert seen == [0, 1] and trainer._cache == {} and trainer.step == 0
    trainer.on_sampler_step = None
    assert trainer.train_step().loss == pytest.approx(ref_loss, rel=1e-5)
    trainer.lora.remove()


@pytest.mark.parametrize("where", ["train", "before_after"])
def test_on_sampler_step_cancels_within_a_trajectory_and_leaves_the_trainer_whole(small_model, square_reward, where):
    """A cancel raised from on_sampler_step stops mid-trajectory; nothing is half-done: no step counted, the
    LoRA unchanged, enabled and unmerged, and the trainer trains on as one that was never cancelled (every batch
    holds both items here: a cancelled step has drawn its batch from the seeded order)."""
    cfg = fix_cfg(iterations=2)
    calls = []

    def cancel_at_3(info):
        if "i" not in info:  # before a mask is derived
            return
        calls.append(info["i"])
        if len(calls) == 3:
            raise _Cancel

    ref = FixTrainer(small_model, square_reward, cfg)
    ref_records = list(ref)
    ref.lora.remove()
    trainer = FixTrainer(small_model, square_reward, cfg, on_sampler_step=cancel_at_3)
    if where == "before_after":
        trainer.on_sampler_step = None
        trainer.train_step()
        trainer.on_sampler_step = cancel_at_3
    before = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    with pytest.raises(_Cancel):
        trainer.train_step() if where == "train" else trainer.before_after()
    assert len(calls) == 3
    assert trainer.step == (0 if where == "train" else 1)
    assert trainer.lora.enabled and not trainer.lora.merged
    for k, v in trainer.lora.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    trainer.on_sampler_step = None
    records = [trainer.train_step() for _ in range(cfg.iterations - trainer.step)]
    assert records[-1].loss == pytest.approx(ref_records[-1].loss, rel=1e-5)
    trainer.lora.remove()


def test_a_step_stopped_half_way_is_redrawn_the_same(small_model, square_reward):
    """restore_last_good() after a cancel mid-step puts back the item order and the RNG too: training on gives the
    uninterrupted run's LoRA exactly (3 items at batch 2, so the order decides every batch)."""
    cfg = fix_cfg(seeds=(0, 1, 2), batch_size=2, iterations=3)
    ref = FixTrainer(small_model, square_reward, cfg)
    list(ref)
    expected = {k: v.clone() for k, v in ref.lora.state_dict().items()}
    ref.lora.remove()
    calls = []

    def cancel_in_step_2(info):
        if "mask_item" in info:  # asked before each mask too: count sampler steps only
            return
        calls.append(1)
        if len(calls) == 2 * cfg.steps + 2:  # step 1 draws its batch first, then samples
            raise _Cancel

    trainer = FixTrainer(small_model, square_reward, cfg, on_sampler_step=cancel_in_step_2)
    with pytest.raises(_Cancel):
        list(trainer)
    assert trainer.step == 1
    trainer.restore_last_good()
    trainer.on_sampler_step = None
    list(trainer)
    for k, v in trainer.lora.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    trainer.lora.remove()


@pytest.mark.parametrize("where, error", [
    ("train", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore lines")),
    ("before_after", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore lines")),
    # Apple's MPS raises a plain RuntimeError
    ("train", RuntimeError("MPS backend out of memory (MPS allocated: 9 GB). Tried to allocate 2.00 GiB.\nmore lines")),
])
def test_out_of_memory_says_where_and_what_to_lower(small_model, square_reward, where, error):
    """A device OOM keeps its type (ComfyUI unloads its models on it) and gains the stage and the settings that
    lower the memory, with their values; the LoRA keeps the last finished step."""
    cfg = fix_cfg(iterations=2, K=2)
    trainer = FixTrainer(small_model, square_reward, cfg)
    if where == "before_after":
        list(trainer)
    before = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    calls = []

    def oom_at_call_3(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise error
    handle = small_model.net.register_forward_pre_hook(oom_at_call_3)
    try:
        with pytest.raises(torch.OutOfMemoryError) as info:
            list(trainer) if where == "train" else trainer.before_after()
    finally:
        handle.remove()
    msg = str(info.value)
    stage = "in training step 1 of 2" if where == "train" else "while drawing the before/after images"
    assert msg.startswith(f"out of device memory {stage}: lower batch_size (now 2) or K (now 2), then width and "
                          f"height (now 16x16)"), msg
    assert "Tried to allocate 2.00 GiB." in msg and "more lines" not in msg
    assert "precision bf16" not in msg  # advice for a CLIP reward's tower, which this reward has not
    assert info.value.__cause__ is error
    for k, v in trainer.lora.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    trainer.lora.remove()


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "2147483648 bytes. Error code 12 (Cannot allocate memory)",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
    "2147483648 bytes.",  # Windows
])
def test_running_out_of_cpu_memory_gets_the_same_advice(small_model, square_reward, message):
    """CLI bad-input hunt (session 27): the CPU allocator's failure (a CPU-only ComfyUI, the command line with a
    huge --batch-size) is a plain RuntimeError without "out of memory": it ended in a traceback."""
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    error = RuntimeError(message)

    def fail(module, args):
        raise error
    handle = small_model.net.register_forward_pre_hook(fail)
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"^out of CPU memory in training step 1 of 1: lower "
                                                         r"batch_size \(now 2\).*DefaultCPUAllocator: "):
            list(trainer)
    finally:
        handle.remove()
        trainer.lora.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_memory_advises_a_bf16_tower_only_for_a_fp32_clip_reward(small_model, dtype):
    from focusfix_core.rewards import AestheticReward, CLIPVisionConfig, CLIPVisionTower
    from focusfix_core.rewards.aesthetic import AestheticHead
    tower = CLIPVisionTower(CLIPVisionConfig(width=16, layers=1, heads=2, patch=8, image_size=16, proj_dim=8,
                                             mlp_width=32)).to(dtype)
    trainer = FixTrainer(small_model, AestheticReward(tower, AestheticHead((8, 8, 8, 4, 4)).to(dtype)),
                         fix_cfg(iterations=1, mask_source="none", lam=0.0))
    try:
        advice = trainer._memory_advice()
    finally:
        trainer.lora.remove()
    assert advice.startswith("lower batch_size (now 2) or K (now 1), then width and height (now 16x16)"), advice
    assert ("takes about 0.6 GiB less with precision bf16 (Load Reward)" in advice) == (dtype == torch.float32)


def test_other_runtime_errors_are_not_called_out_of_memory(small_model, square_reward):
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))

    def broken(module, args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    handle = small_model.net.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"):
            list(trainer)
    finally:
        handle.remove()
    trainer.lora.remove()


def test_a_refused_fp16_run_on_mps_leaves_no_hooks(small_model, square_reward, monkeypatch):
    """The refusal comes before the LoRA is attached: a ComfyUI MODEL's net is shared by its clones."""
    import focusfix_core.trainers as tr

    def refuse(device_type, version):
        raise ValueError("needs torch 2.8 or newer")
    monkeypatch.setattr(tr, "_fp16_in_gradient_path", lambda model: True)
    monkeypatch.setattr(tr, "_check_loss_scaling", refuse)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in small_model.net.modules())
    before = hooks()
    for _ in range(2):
        with pytest.raises(ValueError, match="torch 2.8"):
            FixTrainer(small_model, square_reward, fix_cfg())
    assert hooks() == before


@pytest.mark.parametrize("device, version, refused", [
    ("mps", "2.7.1", True), ("mps", "2.5.0.dev20240901", True), ("mps", "2.8.0", False), ("mps", "2.10.0a0+git", False),
    ("cuda", "2.1.2+cu121", False), ("cpu", "2.4.0", False),
])
def test_fp16_training_on_mps_needs_a_torch_whose_loss_scaler_runs_there(device, version, refused):
    from focusfix_core.trainers import _check_loss_scaling
    if refused:
        with pytest.raises(ValueError, match=f"needs torch 2.8 or newer \\(this is {re.escape(version)}\\)"):
            _check_loss_scaling(device, version)
    else:
        _check_loss_scaling(device, version)


def test_separate_enhance_out_of_memory_names_its_settings(small_model):
    cfg = SeparateEnhanceConfig(prompts=("a red circle and a blue square",), objects=(("circle", "square"),),
                                height=16, width=16, iterations=1, resolution=4, batch_size=3)
    trainer = SeparateEnhanceTrainer(small_model, cfg)
    handle = small_model.net.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"^out of device memory while drawing the attention maps: "
                           r"lower batch_size \(now 3\), then width and height \(now 16x16\)\. \(no details\)$"):
            trainer.eval_maps()
    finally:
        handle.remove()
        trainer.lora.remove()


def test_graph_free_sampling_records_no_graph(small_model, square_reward, monkeypatch):
    """I0 and the before/after images are drawn under no_grad, also inside a training step."""
    import focusfix_core.trainers as tr
    grad_on = []
    real = tr.sample
    monkeypatch.setattr(tr, "sample", lambda *a, **k: grad_on.append((k["K"], torch.is_grad_enabled()))
                        or real(*a, **k))
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    list(trainer)
    trainer.before_after()
    assert grad_on == [(0, False), (1, True), (0, False)]  # I0, the training trajectory, then I (I0 cached)
    trainer.lora.remove()


@pytest.mark.parametrize("fill, match", [(0.0, r"mask M\[1\] is empty \(every value 0\): the whole image is held fixed: "
                                               r"paint the region that may change"),
                                         (float("nan"), r"mask M\[0\] has NaN or inf values")])
def test_an_empty_or_broken_painted_mask_is_refused(small_model, square_reward, fill, match):
    """An empty painted mask would hold the whole image (the editor saved nothing, or the mask is inverted)."""
    M = torch.ones(2, 16, 16)
    M[1 if fill == 0.0 else 0] = fill
    with pytest.raises(ValueError, match=match):
        FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask"), masks=M)
    FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask", lam=0.0), masks=torch.zeros(1, 16, 16)
               ).lora.remove()  # lam 0 (plain DRaFT) reads no mask


def test_a_faint_painted_mask_trains_with_its_own_values(small_model, square_reward):
    """Bad-input hunt (session 27): a feathered or light-brush mask whose values stay under 0.5 was refused as
    "empty: the whole image is held fixed", but the region term holds it only in part: it trains."""
    M = torch.zeros(1, 16, 16)
    M[:, 4:12, 4:12] = 0.4
    trainer = FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask", iterations=1), masks=M)
    list(trainer)
    assert torch.equal(trainer.before_after()[2], M[:1, None].expand(2, 1, 16, 16))
    trainer.lora.remove()


@pytest.mark.parametrize("masks, error, match", [
    ([[1.0]], TypeError, r"masks must be a torch.Tensor \[B,H,W\] or \[B,1,H,W\], got list"),  # was an AttributeError
    (torch.ones(2, 3, 16, 16), ValueError, r"masks must be \[B,H,W\] or \[B,1,H,W\], got shape \(2, 3, 16, 16\)"),
])
def test_painted_masks_of_the_wrong_type_or_shape_are_named(small_model, square_reward, masks, error, match):
    with pytest.raises(error, match=match):
        FixTrainer(small_model, square_reward, fix_cfg(mask_source="mask"), masks=masks)


def test_separate_enhance_trains_at_portrait_and_landscape_sizes(small_model):
    """resolution is the maps' shorter side (`map_size`): a non-square size trains on maps of its shape, where a
    square r x r was asked of layers that have none (the run failed after the model had loaded)."""
    for h, w in ((16, 24), (24, 16)):
        trainer = SeparateEnhanceTrainer(small_model, se_cfg(height=h, width=w, iterations=1, batch_size=1))
        try:
            assert trainer.map_hw == ((8, 12) if h < w else (12, 8))
            rec = next(iter(trainer))
            assert math.isfinite(rec.loss)
            assert tuple(trainer.eval_maps(0).shape[-2:]) == trainer.map_hw
        finally:
            trainer.lora.remove()
    with pytest.raises(ValueError,
                       match=r"resolution 5: at this size \(width 16, height 16 px\) .* only in maps of 8x8, 4x4"):
        SeparateEnhanceTrainer(small_model, se_cfg(resolution=5))


def test_partial_sigmas_and_unusable_thresholds_are_refused_before_sampling(small_model, square_reward):
    """SIGMAS of a partial denoise (starting far below the model's top sigma) and a top_percent threshold of 0
    fail when the trainer is built, naming the input, instead of training on noise or failing after I0."""
    top = float(small_model.sigmas[-1])
    with pytest.raises(ValueError, match="sigmas start at .* far below the model's top sigma"):
        FixTrainer(small_model, square_reward, fix_cfg(sigmas=(0.3 * top, 0.1 * top, 0.0)))
    with pytest.raises(ValueError, match=r"threshold must be a fraction in \(0,1\] for 'top_percent'"):
        fix_cfg(mask_source="saliency", threshold_mode="top_percent", threshold=0.0)
    assert fix_cfg(mask_source="none", threshold_mode="top_percent", threshold=0.0).threshold == 0.0  # unused


class _Recorder(torch.nn.Module):
    """The reward's images: what it was shown in every call."""

    def __init__(self, reward, scale: float = 1.0):
        super().__init__()
        self.reward, self.scale, self.seen = reward, scale, []

    def forward(self, I):
        self.seen.append(I.detach())
        return self.reward(I * self.scale)


def test_the_reward_scores_the_image_as_vae_decode_shows_it(small_model, square_reward):
    # decoded pixels can run past [0, 1]; VAE Decode clamps them, so the reward must not be paid for them
    rec = _Recorder(square_reward)
    trainer = FixTrainer(small_model, rec, fix_cfg(mask_source="none", iterations=2, lr=0.5))
    list(trainer)
    trainer.lora.remove()
    raw = trainer.last_images
    assert raw.amin() < 0 or raw.amax() > 1                      # the case exists on this model
    assert all(0 <= float(I.amin()) and float(I.amax()) <= 1 for I in rec.seen)



def test_draft_lv_shows_one_image_per_item_not_each_copy(small_model, square_reward):
    # the preview (the train node's images) holds each item once: DRaFT-LV's copies are the reward's business
    rec = _Recorder(square_reward)
    trainer = FixTrainer(small_model, rec, fix_cfg(mask_source="none", iterations=1, lv_copies=3, K=1))
    list(trainer)
    trainer.lora.remove()
    seen = rec.seen[-1]
    assert seen.shape[0] == 2 * 3 and trainer.last_images.shape == (2, *seen.shape[1:])
    assert torch.equal(trainer.last_images.clamp(0, 1), seen[::3])   # the first copy of each item


def test_a_continued_lora_is_taken_off_the_net_when_its_trainer_cannot_be_built(small_model, square_reward):
    # a LoRA attached for a run whose settings are refused must not stay hooked onto the (shared) MODEL
    from focusfix_core.trainers import trainer_on
    net = small_model.net
    lora = LoRA.attach(net, "attn", rank=2, generator=torch.Generator().manual_seed(0))
    assert any(m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="needs a reward with a heatmap"):
        trainer_on(lambda l: FixTrainer(small_model, _Faint(square_reward), fix_cfg(mask_source="heatmap"), lora=l),
                   lora)
    assert not any(m._forward_hooks for m in net.modules())

def test_a_derived_mask_does_not_depend_on_its_batch_or_the_global_rng(small_model, square_reward):
    # an item's mask is the same alone or beside others (a resumed run draws other batches), and smoothgrad's
    # noise is seeded by the item, not by whatever torch's global RNG holds
    masks = {}
    for batch_size, global_seed in ((2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        cfg = fix_cfg(mask_source="saliency", saliency_method="smoothgrad", threshold_mode="top_percent",
                      threshold=0.3, batch_size=batch_size, blur_sigma=1.0)
        trainer = FixTrainer(small_model, square_reward, cfg)
        masks[batch_size] = trainer.base([0, 1])[2] if batch_size == 2 else torch.cat(
            [trainer.base([0])[2], trainer.base([1])[2]])
        trainer.lora.remove()
    assert masks[1].sum() > 0 and torch.equal(masks[1], masks[2])


def test_an_empty_derived_mask_stops_with_the_item_and_the_threshold(small_model, square_reward):
    cfg = fix_cfg(mask_source="saliency", threshold_mode="value", threshold=1.0, blur_sigma=0.0)
    trainer = FixTrainer(small_model, _Recorder(square_reward, scale=0.0), cfg)  # a flat reward: saliency 0
    with pytest.raises(ValueError, match=r"saliency mask of prompt 'a red circle', seed \d is empty: the reward's "
                                         r"saliency of that image is flat .* no threshold helps"):
        next(iter(trainer))
    trainer.lora.remove()
    lam0 = FixTrainer(small_model, _Recorder(square_reward, scale=0.0), replace(cfg, lam=0.0))
    next(iter(lam0))  # with lam 0 the mask is only logged
    lam0.lora.remove()


# -- Separate-and-Enhance review (preservation prompts, long prompts, map sizes, padding, duplicates) -----------------
@pytest.mark.parametrize("prompts, objects, expected", [
    (("a cat next to a dog",), (("cat", "dog"),), ("a cat", "a dog")),
    (("an astronaut riding a horse",), (("astronaut", "horse"),), ("a astronaut", "a horse")),
    (("a cat with a dog and a bird",), (("cat", "dog", "bird"),), ("a cat", "a dog", "a bird")),
    (("a red circle and a blue square",), (("circle", "square"),), ("a red circle", "a blue square")),
    (("a cat next to a dog", "a dog and a cat"), (("cat", "dog"), ("dog", "cat")), ("a cat", "a dog")),
    # "and" inside a hyphenated word does not split it (it gave "-white cat")
    (("a black-and-white cat And a dog",), (("black-and-white cat", "dog"),), ("a black-and-white cat", "a dog")),
])
def test_preservation_prompts_never_name_two_objects(prompts, objects, expected):
    """A part of the prompt is kept only when it names one object: 'a cat next to a dog' has no ' and ', and used
    to become both objects' preservation prompt (twice), holding the very composition training changes."""
    assert se_cfg(prompts=prompts, objects=objects).preserve_prompts == expected


@pytest.mark.parametrize("field, value", [("rank", 1.5), ("rank", 0), ("iterations", math.nan), ("iterations", 2.5),
                                          ("batch_size", 0), ("batch_size", math.inf)])
def test_counts_are_whole_numbers(field, value):
    """A fractional rank or a NaN iteration count was cut by int() somewhere later (or failed unnamed)."""
    for make in (fix_cfg, se_cfg):
        with pytest.raises(ValueError, match=rf"^{field} must be a whole number >= 1, got {value!r}"):
            make(**{field: value})
    assert type(fix_cfg(rank=4.0).rank) is int  # a whole float (a JSON number) is that count


@pytest.mark.parametrize("t_range", [(0.2,), (0.2, 0.5, 0.9), (0.6, 0.5)])
def test_t_range_is_named_whatever_its_length(t_range):
    with pytest.raises(ValueError, match=r"t_range must be \(lo, hi\) with 0 <= lo < hi <= 1"):
        se_cfg(t_range=t_range)


def test_the_same_object_twice_is_refused_with_distinct_words_suggested(small_model):
    with pytest.raises(ValueError, match="names the object 'cat' twice.*black cat, white cat"):
        split_objects_prompt("a black cat and a white cat | cat, Cat")
    with pytest.raises(ValueError, match="names the object 'circle' twice"):
        se_cfg(objects=(("circle", "circle"),))
    with pytest.raises(ValueError, match="'red circle' and 'circle' both land on"):  # the same token by two words
        SeparateEnhanceTrainer(small_model, se_cfg(objects=(("red circle", "circle"),)))
    assert split_objects_prompt("a cat and a dog | cat; dog") == ("a cat and a dog", ["cat", "dog"])


def test_separate_enhance_refuses_a_map_size_without_cross_attention_before_any_unet_pass(small_model, monkeypatch):
    """The tiny UNet has cross-attention at 8x8 and 4x4 only (at 16 px): resolution 16 is its 16x16 level, which
    has none; refused with the sizes it has, before the model runs (it used to fail on the first maps)."""
    calls = _count_denoise(small_model, monkeypatch)
    with pytest.raises(ValueError, match=r"resolution 16: .*only in maps of 8x8, 4x4: set resolution to 8 or 4"):
        SeparateEnhanceTrainer(small_model, se_cfg(resolution=16))
    assert calls == []


class _LongPrompt:
    """The tiny model with one prompt encoded twice as long, as a CLIP prompt over 75 tokens (154 against 77)."""

    def __init__(self, model, long: str):
        self._model, self._long = model, long

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_prompts(self, prompts):
        """One prompt at a time, joined by cat_cond, as the ComfyUI adapter encodes them."""
        from focusfix_core.denoisers import cat_cond
        conds = []
        for p in prompts:
            cond = self._model.encode_prompts([p])
            if p == self._long:
                cond = {"context": torch.cat([cond["context"], self._model.encode_prompts(["a green triangle"])["context"]], 1)}
            conds.append(cond)
        return cat_cond(*conds)


def test_separate_enhance_batches_prompts_of_different_lengths_as_each_alone(small_model):
    """Prompts of different lengths share a batch: the shorter row is repeated (cat_cond) and its maps sum every
    copy of its tokens, so each prompt's maps are those it has alone (padding with its last token moved them)."""
    long = "a blue square and a red circle"
    model = _LongPrompt(small_model, long)
    cfg = se_cfg(prompts=("a red circle and a blue square", long), objects=(("circle", "square"), ("square", "circle")),
                 lam_preserve=0.0)
    trainer = SeparateEnhanceTrainer(model, cfg)
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(0)) * 5
    sigma = small_model.sigmas.float()[[600, 600]]
    with torch.no_grad():
        both = trainer.attention_maps([0, 1], x, sigma, keep_grad=False)
    trainer.lora.remove()
    alone = []
    for i in (0, 1):  # each prompt trained alone: its context as encoded, nothing joined to it
        solo = SeparateEnhanceTrainer(model, replace(cfg, prompts=cfg.prompts[i:i + 1], objects=cfg.objects[i:i + 1]))
        with torch.no_grad():
            alone.append(solo.attention_maps([0], x[i:i + 1], sigma[i:i + 1], keep_grad=False)[0])
        solo.lora.remove()
    torch.testing.assert_close(both, torch.stack(alone), rtol=1e-4, atol=1e-6)
    T = small_model.cfg.max_tokens
    assert trainer.context_lengths == [T, 2 * T]


def test_before_after_maps_pad_a_prompt_with_fewer_objects_with_blank_maps(small_model):
    """A 2-object prompt beside a 3-object one: its third map is all zero (drawn blank), not a copy of its last."""
    cfg = se_cfg(prompts=("a red circle and a blue square", "a circle and a square and a triangle"),
                 objects=(("circle", "square"), ("circle", "square", "triangle")), lam_preserve=0.0)
    trainer = SeparateEnhanceTrainer(small_model, cfg)
    A = trainer.eval_maps()
    trainer.lora.remove()
    assert A.shape == (2, 3, 8, 8)
    assert torch.equal(A[0, 2], torch.zeros(8, 8)) and A[0, :2].amin() > 0 and A[1].amin() > 0


# ---------------------------------------------------------------- a model that writes into saved tensors (models review, 2)
def _rescale_half_in_place(module, args, out):
    """Half the channels rescaled in place by a factor computed from the features, as ComfyUI's FreeU_V2 patch
    does to a block's output: autograd saved that half for the product's backward."""
    c = out.shape[1] // 2
    out[:, :c] = out[:, :c] * (1 + 0.1 * out.mean(1, keepdim=True))
    return out


def test_fix_and_separate_enhance_train_a_model_that_writes_into_saved_tensors(small_model, square_reward):
    """Both trainers run on such a model (its first step drawn again under allow_mutation_on_saved_tensors) and
    give the steps a plain run of the same model gives where nothing is written in place."""
    out = small_model.net.mid_block
    handle = out.register_forward_hook(_rescale_half_in_place)
    try:
        fix = FixTrainer(small_model, square_reward, fix_cfg(iterations=2))
        fix_recs = list(fix)
        se = SeparateEnhanceTrainer(small_model, se_cfg(iterations=2))
        se_recs = list(se)
    finally:
        handle.remove()
    fix.lora.remove()
    se.lora.remove()
    assert fix.mutation_allowed and se.mutation_allowed
    assert [r.step for r in fix_recs] == [0, 1] and [r.step for r in se_recs] == [0, 1]

    def copy_written(module, args, out):  # the same maths without the in-place write: the reference
        c = out.shape[1] // 2
        return torch.cat([out[:, :c] * (1 + 0.1 * out.mean(1, keepdim=True)), out[:, c:]], 1)

    handle = out.register_forward_hook(copy_written)
    try:
        ref_fix, ref_se = FixTrainer(small_model, square_reward, fix_cfg(iterations=2)), SeparateEnhanceTrainer(
            small_model, se_cfg(iterations=2))
        ref_fix_recs, ref_se_recs = list(ref_fix), list(ref_se)
    finally:
        handle.remove()
    ref_fix.lora.remove()
    ref_se.lora.remove()
    assert not ref_fix.mutation_allowed
    for got, ref in ((fix_recs, ref_fix_recs), (se_recs, ref_se_recs)):
        assert [r.loss for r in got] == pytest.approx([r.loss for r in ref], rel=1e-3)  # Adam: rounding grows
    for a, b in zip(fix.lora.state_dict().values(), ref_fix.lora.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _live_tensors() -> int:
    import gc
    import warnings
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


@pytest.mark.parametrize("method", ["fix", "separate_enhance"])
def test_a_model_that_writes_into_saved_tensors_fails_no_backward_and_leaks_nothing(small_model, square_reward,
                                                                                      method):
    """A failed backward keeps its graph alive for good (its saved tensors hold it in a cycle autograd breaks only
    when a backward finishes): the first step runs in the mode that copies what is written (hygiene review, 1).
    Each run after the first leaves no tensor behind, and no step is drawn twice."""
    handle = small_model.net.mid_block.register_forward_hook(_rescale_half_in_place)
    calls, counts = [], []
    try:
        for _ in range(3):
            trainer = (FixTrainer(small_model, square_reward, fix_cfg(iterations=2)) if method == "fix" else
                       SeparateEnhanceTrainer(small_model, se_cfg(iterations=2)))
            step = trainer.train_step
            trainer.train_step = lambda: calls.append(1) or step()
            list(trainer)
            assert trainer.mutation_allowed
            trainer.lora.remove()
            del trainer, step
            counts.append(_live_tensors())
    finally:
        handle.remove()
    assert counts[2] == counts[1], counts
    assert len(calls) == 6  # 2 steps a run, none drawn again after a failed backward


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, KeyboardInterrupt])
def test_a_backward_stopped_midway_leaves_no_graph_behind(small_model, square_reward, error):
    """Out of memory (or a cancel) in a block's recompute during the backward: the failed step's graph stayed with
    autograd until the next backward, beside a retry's base images (hygiene review, 2)."""
    fired = []

    def in_backward(module, args, out):
        if torch._C._current_graph_task_id() != -1 and not fired:
            fired.append(1)
            raise error("CUDA out of memory.")  # a new one: a raised exception's traceback holds the step's frames
    before = _live_tensors()
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    inside = [m for m in trainer._checkpoint_modules[-1].modules() if not list(m.children())][0]
    handle = inside.register_forward_hook(in_backward)  # a layer of a block the backward recomputes
    raised = False
    try:
        list(trainer)
    except error:  # not pytest.raises: its traceback would keep the step's frames and tensors
        raised = True
    finally:
        handle.remove()
        trainer.lora.remove()
    del trainer
    assert raised and fired
    assert _live_tensors() == before


def test_a_model_that_writes_nothing_in_place_leaves_the_mode_after_its_first_step(small_model, square_reward):
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    modes = []
    handle = small_model.net.mid_block.register_forward_hook(
        lambda m, a, out: modes.append(_get_current_dispatch_mode() is not None) if torch.is_grad_enabled() else None)
    try:
        trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=3, K=1))
        list(trainer)
    finally:
        handle.remove()
        trainer.lora.remove()
    assert trainer.mutation_allowed is False
    assert modes == [True, False, False]  # the differentiated call of each step: only the first one in the mode


def _bad_opt_moment(s):
    opt = {**s["optimizer"], "state": {**s["optimizer"]["state"]}}
    opt["state"][0] = {**opt["state"][0], "exp_avg": torch.zeros(7)}
    return {**s, "optimizer": opt}


def _opt_group(s, **settings):
    opt = {**s["optimizer"], "param_groups": [{**g, **settings} for g in s["optimizer"]["param_groups"]]}
    return {**s, "optimizer": opt}


def _nan_opt_count(s):
    opt = {**s["optimizer"], "state": {**s["optimizer"]["state"]}}
    opt["state"][0] = {**opt["state"][0], "step": torch.tensor(math.nan)}
    return {**s, "optimizer": opt}


@pytest.mark.parametrize("change, match", [
    (lambda s: [1, 2, 3], "expected a dict .*got list"),
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "it lacks \\['step'\\]"),
    (lambda s: {**s, "step": -5}, "step must be an int >= 0, got -5"),
    (lambda s: {**s, "step": True}, "step must be an int >= 0, got True"),
    (lambda s: {**s, "config": "{not json"}, "config must be the run's settings as a JSON object"),
    (lambda s: {**s, "lora": {**s["lora"], "adapters.0.down": torch.zeros(7, 7)}},
     "lora 'adapters.0.down' is \\(7, 7\\), expected shape"),
    (lambda s: {**s, "lora": {**s["lora"], "extra": torch.zeros(1)}},
     "lora must hold this run's 80 adapter tensors; missing \\[\\], unexpected \\['extra'\\]"),
    (lambda s: {**s, "lora": {k: v.to(torch.int32) for k, v in s["lora"].items()}},
     "lora 'adapters.0.down' is torch.int32, expected a float dtype"),
    (lambda s: {**s, "lora": {**s["lora"], "adapters.1.up": s["lora"]["adapters.1.up"] * math.nan}},
     "lora 'adapters.1.up' holds NaN or inf values"),
    (lambda s: {**s, "rng": torch.zeros(3, dtype=torch.uint8)}, "rng is not a CPU generator's state"),
    (lambda s: {**s, "rng": s["rng"].float()}, "rng must be a generator state .*got torch.float32"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": []}}, "optimizer does not fit this run's LoRA"),
    (_bad_opt_moment, "optimizer 'exp_avg' has shape \\(7,\\)"),
    # an edited or damaged file: a NaN lr or count wrote a NaN LoRA blaming the reward; betas (5.0,) failed inside
    # the first step with "not enough values to unpack" (review G6)
    (lambda s: _opt_group(s, lr=math.nan), "optimizer lr is nan, but this run's is 0.02"),
    (lambda s: _opt_group(s, betas=(5.0,)), "optimizer betas is \\(5.0,\\), but this run's is \\(0.9, 0.999\\)"),
    (lambda s: _opt_group(s, lr="fast"), "optimizer lr is 'fast'"),
    (_nan_opt_count, "optimizer 'step' is nan, expected a finite count >= 0"),
    (lambda s: {**s, "order": torch.tensor([99])}, "order must be distinct item indices in 0..2 .*got \\[99\\]"),
    (lambda s: {**s, "order": torch.tensor([1, 1])}, "order must be distinct item indices"),
    (lambda s: {**s, "history": [json.dumps({"foo": 1})]}, "history must list the steps' records"),
    (lambda s: {**s, "continued": "[1,2]"}, "continued must be the continued LoRA's metadata .*got '\\[1,2\\]'"),
])
def test_an_invalid_training_state_is_refused_whole_and_leaves_the_trainer(small_model, square_reward, change,
                                                                          match):
    """A corrupt or crafted state.pt gave raw KeyError/AttributeError/RuntimeError tracebacks, an IndexError mid-run
    (order), an AttributeError after training (continued), or was accepted (step -5, an int32 LoRA): the review's
    finding 5. Each part is now checked before any is used, and the trainer stays as it was."""
    cfg = fix_cfg(seeds=(0, 1, 2), iterations=3)  # 3 items at batch 2: one item left of the pass in `order`
    first = FixTrainer(small_model, square_reward, cfg)
    next(iter(first))
    state = first.state_dict()
    first.lora.remove()
    assert state["order"].tolist() and state["step"] == 1
    trainer = FixTrainer(small_model, square_reward, cfg)
    before = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    with pytest.raises(ValueError, match=f"^the training state is invalid: {match}"):
        trainer.load_state_dict(change(state))
    assert trainer.step == 0 and trainer._order == [] and trainer.history == []
    assert all(torch.equal(v, before[k]) for k, v in trainer.lora.state_dict().items())
    trainer.load_state_dict(state)  # the valid state still loads
    assert trainer.step == 1 and trainer._order == state["order"].tolist()
    trainer.lora.remove()


def test_a_saved_tensor_written_in_place_lives_until_the_backward_is_done():
    """torch's allow_mutation_on_saved_tensors finds a written tensor's copy by its (id, data_ptr, version): once
    the tensor was freed, a new one CPython and the allocator put at the same id and address got that copy in the
    backward (FreeU_V2 on Python 3.13: a 32-channel copy for a block's 64-channel input; with equal shapes, wrong
    gradients without an error). The trainers' mutation context keeps such tensors alive until it ends."""
    import gc
    import weakref
    from contextlib import ExitStack

    a = torch.randn(2, 8, 4, 4, requires_grad=True)
    with ExitStack() as stack:
        mutation = tr._MutationContext(stack)
        with torch.enable_grad():
            mutation.enter()
            h = a * 1
            y = h.sin().sum()         # saves h
            h.mul_(2)                 # written in place: the mode copies the saved h
            kept = weakref.ref(h)
            del h
            gc.collect()
            assert kept() is not None, "freed: a new tensor could take its id, address and version"
            mutation.before_backward()
            y.backward()
        assert mutation.copied
        mutation.end()
    gc.collect()
    assert kept() is None  # released with the context
    torch.testing.assert_close(a.grad, torch.cos(a.detach()))


def test_the_mutation_context_covers_only_the_calls_that_record_a_graph(small_model, square_reward):
    """Its per-op Python is paid from the step's first UNet call with grad on to the backward: the N - K graph-free
    sampler calls before it run without it (they save nothing for a backward, so their in-place writes need no
    copy), and so do the clipping and the optimizer step after the backward."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    seen = []

    def note(module, args, out):
        seen.append((torch.is_grad_enabled(), _get_current_dispatch_mode() is not None))
        return _rescale_half_in_place(module, args, out)

    handle = small_model.net.mid_block.register_forward_hook(note)
    try:
        trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=2, steps=4, K=1))
        step = trainer.optimizer.step

        def noted_step(*args, **kwargs):
            seen.append(("optimizer", _get_current_dispatch_mode() is not None))
            return step(*args, **kwargs)
        trainer.optimizer.step = noted_step
        list(trainer)
    finally:
        handle.remove()
        trainer.lora.remove()
    assert trainer.mutation_allowed
    last_step = seen[-5:]  # 3 graph-free sampler calls, the differentiated one, then the optimizer step
    assert [grad for grad, _ in last_step] == [False, False, False, True, "optimizer"]
    # nor for the clipping and the update after the backward (on torch 2.5 the mode failed on their foreach ops)
    assert [mode for _, mode in last_step] == [False, False, False, True, False]


def test_separate_enhance_with_no_loss_weight_is_refused():
    """lam_sep = lam_en = 0 trains nothing (the LoRA starts at zero, where preservation has no gradient): refused
    before any step, not a run of 0 losses and an unchanged LoRA (fuzz review)."""
    with pytest.raises(ValueError, match="lam_sep and lam_en are both 0"):
        se_cfg(lam_sep=0.0, lam_en=0.0)
    se_cfg(lam_sep=0.0, lam_en=1.0)  # one of them is enough


def test_items_whose_images_would_not_fit_in_ram_are_refused_before_sampling(small_model, square_reward,
                                                                              monkeypatch):
    """The cache and the before/after images live in CPU memory (11 fp32 planes an item): an item count over half
    the machine's RAM is refused at setup, naming the counts and what to lower, instead of the OS ending the
    process mid-run. Where RAM cannot be read, nothing is refused."""
    import focusfix_core.trainers as tr
    assert tr.physical_memory_bytes() > 2**30  # read on this machine
    cfg = fix_cfg(prompts=("a red circle", "a blue square"), seeds=tuple(range(10)))  # 20 items at 16x16
    latent = small_model.latent_channels * (16 // small_model.latent_scale) ** 2
    need = 20 * 4 * (11 * 16 * 16 + latent)
    monkeypatch.setattr(tr, "physical_memory_bytes", lambda: 2 * need - 1)
    with pytest.raises(ValueError, match=r"2 prompt\(s\) x 10 seed\(s\) = 20 items would hold .* use fewer seeds"):
        FixTrainer(small_model, square_reward, cfg)
    monkeypatch.setattr(tr, "physical_memory_bytes", lambda: 2 * need)
    FixTrainer(small_model, square_reward, cfg).lora.remove()
    monkeypatch.setattr(tr, "physical_memory_bytes", lambda: None)
    FixTrainer(small_model, square_reward, replace(cfg, seeds=tuple(range(1000)))).lora.remove()


def test_each_batch_attends_its_own_prompts_lengths(small_model, square_reward, monkeypatch):
    """Prompts of different context lengths (a prompt over 75 tokens has 154): a batch joins only its own
    prompts' rows, so a short prompt alone is attended at its own length, not at the least common multiple of
    every prompt's (5 prompts of 77..385 tokens made that 4620 for each). A joined Cond (batch len(prompts)) is
    still taken, at its joined length; a count that does not match the prompts is refused."""
    prompts = ("a red circle", "a blue square")
    short = small_model.encode_prompts([prompts[0]])
    T = short["context"].shape[1]
    long = {"context": small_model.encode_prompts([prompts[1]])["context"].repeat(1, 3, 1)}  # 3T, same attention
    seen = []
    real = small_model.denoise
    monkeypatch.setattr(small_model, "denoise", lambda x, s, c: seen.append(c["context"].shape[1]) or real(x, s, c))
    cfg = fix_cfg(prompts=prompts, seeds=(0,), batch_size=1, iterations=2)
    trainer = FixTrainer(small_model, square_reward, cfg, cond=[short, long])
    for idx, length in (([0], T), ([1], 3 * T), ([0, 1], 3 * T)):
        seen.clear()
        trainer.sample_images(idx)
        assert set(seen) == {length}, (idx, seen)  # CFG joins the negative prompt (T) too: no longer than that
    trainer.lora.remove()
    with pytest.raises(ValueError, match=r"cond holds 1 text encoding\(s\) for 2 prompt\(s\)"):
        FixTrainer(small_model, square_reward, cfg, cond=short)
    with pytest.raises(ValueError, match=r"cond holds 3 text encoding\(s\) for 2 prompt\(s\)"):
        FixTrainer(small_model, square_reward, cfg, cond=[short, short, short])
    joined = FixTrainer(small_model, square_reward, cfg, cond={"context": torch.cat([short["context"]] * 2)})
    seen.clear()
    joined.sample_images([0])
    assert set(seen) == {T}
    joined.lora.remove()


def test_a_continued_run_draws_past_the_first_runs_batches(small_model, square_reward):
    """Continuing a saved LoRA with the same seed replayed the first run's draws: seeds 0, 1, 2 at batch 1 trained
    [2], [0] and then [2], [0] again, never seed 1. The draws are now seeded by (seed, steps already trained);
    a LoRA without steps (or a new run) draws as before, and S&E's noise moves on the same way."""
    cfg = fix_cfg(seeds=(0, 1, 2), batch_size=1, iterations=4)

    def draws(metadata=None, n=3):
        trainer = FixTrainer(small_model, square_reward, cfg)
        if metadata is not None:
            trainer.continues(metadata)
        out = [trainer._next_items()[0] for _ in range(n)]
        trainer.lora.remove()
        return out
    first = draws()
    assert draws({"focusfix_steps_trained": "2"}) != first
    assert draws({"focusfix_steps_trained": "2"}) == draws({"focusfix_steps_trained": "2"})  # still seeded
    assert draws({}) == first and draws({"focusfix_steps_trained": "x"}) == first
    se = SeparateEnhanceTrainer(small_model, se_cfg())
    x0, _ = se._noisy(2)
    se.lora.remove()
    se = SeparateEnhanceTrainer(small_model, se_cfg())
    se.continues({"focusfix_steps_trained": "8"})
    x1, _ = se._noisy(2)
    se.lora.remove()
    assert not torch.equal(x0, x1)


def test_a_resume_against_another_reward_of_the_same_name_is_refused(small_model):
    """The state named the reward (its describe()), not its weights: a reward file of the same name with other
    weights (a negated head) resumed silently, the reward per step jumping (review G4)."""
    from conftest import SquareRedReward

    class Head(SquareRedReward):
        def __init__(self, w: float):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(w), requires_grad=False)

        def score(self, I):
            return self.w * super().score(I)

    cfg = fix_cfg(iterations=2)
    first = FixTrainer(small_model, Head(1.0), cfg)
    next(iter(first))
    state = first.state_dict()
    first.lora.remove()
    assert set(state["weights"]) == {"model", "reward"}
    other = FixTrainer(small_model, Head(-1.0), cfg)
    with pytest.raises(ValueError, match="saved by a run with another reward .the same name and settings"):
        other.load_state_dict(state)
    other.lora.remove()
    same = FixTrainer(small_model, Head(1.0), cfg)
    same.load_state_dict(state)
    assert same.step == 1
    same.lora.remove()


def test_a_state_in_a_newer_format_is_refused_an_older_one_resumes(small_model, square_reward):
    """state.pt had no layout version: a newer FocusFix's state would be misread, or refused naming whichever part
    changed first. Now its format is checked first; a state from before the field (format 1) still resumes."""
    cfg = fix_cfg(iterations=2)
    first = FixTrainer(small_model, square_reward, cfg)
    next(iter(first))
    state = first.state_dict()
    first.lora.remove()
    assert state["format"] == 1 and isinstance(state["focusfix_version"], str)
    other = FixTrainer(small_model, square_reward, cfg)
    with pytest.raises(ValueError, match=r"written by a newer FocusFix \(9\.0\) in format 2; this FocusFix "
                                         r"\(.*\) reads format 1 or older: update FocusFix"):
        other.load_state_dict({**state, "format": 2, "focusfix_version": "9.0", "lora": "a new layout"})
    with pytest.raises(ValueError, match="the training state is invalid: format must be an int >= 1, got '1'"):
        other.load_state_dict({**state, "format": "1"})
    assert other.step == 0
    older = {k: v for k, v in state.items() if k not in ("format", "focusfix_version")}
    other.load_state_dict(older)
    assert other.step == 1
    other.lora.remove()


def test_a_state_saved_with_the_old_sampler_field_resumes_and_its_value_is_still_compared(small_model, square_reward):
    """`sampler` became `sampler_name` (KSampler's name, as the nodes and --sampler-name): a state saved under the
    old name is the same run, and a saved sampler that differs is still refused by name."""
    import json
    cfg = fix_cfg(iterations=2)
    first = FixTrainer(small_model, square_reward, cfg)
    next(iter(first))
    state = first.state_dict()
    first.lora.remove()
    saved = json.loads(state["config"])
    assert saved["sampler_name"] == "ddim" and "sampler" not in saved
    old = {**saved, "sampler": saved.pop("sampler_name")}
    other = FixTrainer(small_model, square_reward, cfg)
    with pytest.raises(ValueError, match=r"other settings: sampler_name 'dpmpp_2m' \(now 'ddim'\)"):
        other.load_state_dict({**state, "config": json.dumps({**old, "sampler": "dpmpp_2m"})})
    other.load_state_dict({**state, "config": json.dumps(old)})
    assert other.step == 1
    other.lora.remove()


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def test_a_state_whose_order_names_an_item_past_the_last_is_refused(small_model, square_reward):
    """order holds item indices 0..n-1: index n would fail (IndexError) at the next batch, mid-run (mutant:
    `order < n` -> `order <= n`)."""
    first = FixTrainer(small_model, square_reward, fix_cfg(batch_size=1, iterations=2))
    next(iter(first))
    state = first.state_dict()
    first.lora.remove()
    state["order"] = torch.tensor([2], dtype=torch.long)  # 2 items: 0 and 1
    again = FixTrainer(small_model, square_reward, fix_cfg(batch_size=1, iterations=2))
    try:
        with pytest.raises(ValueError, match=r"order must be distinct item indices in 0\.\.1"):
            again.load_state_dict(state)
    finally:
        again.lora.remove()


def test_lv_copies_compare_each_copy_with_its_own_items_base_image(small_model, square_reward, monkeypatch):
    """DRaFT-LV puts the n copies of each image next to each other ([a, a, b, b]): the region term must pair them
    with [I0_a, I0_a, I0_b, I0_b] and the masks alike (mutant: `.repeat` gave [a, b, a, b], each copy of a held
    to b's base image)."""
    from focusfix_core import trainers
    seen = []
    real = trainers.region_loss
    monkeypatch.setattr(trainers, "region_loss",
                        lambda I, I0, M: seen.append((I0.detach().clone(), M.detach().clone())) or real(I, I0, M))
    trainer = FixTrainer(small_model, square_reward, fix_cfg(lv_copies=2, iterations=1))
    list(trainer)
    I0, _, M = trainer.base([0, 1])
    trainer.lora.remove()
    assert not torch.equal(I0[0], I0[1])  # two seeds, two images
    got_I0, got_M = seen[0]
    order = [0, 0, 1, 1] if torch.equal(got_I0[0], I0[0]) else [1, 1, 0, 0]  # the batch's item order
    assert torch.equal(got_I0, I0[order]) and torch.equal(got_M, M[order])


def test_a_nonfinite_loss_puts_back_the_steps_draws(small_model, square_reward, monkeypatch):
    """On a NaN/inf loss the trainer restores the last good step whole, its draws (generator, item order) too, so
    a state saved after the error resumes as the run stood (mutant: restore_last_good skipped in that branch; the
    LoRA was unchanged anyway, but the draws stayed one step ahead)."""
    from focusfix_core import trainers
    trainer = FixTrainer(small_model, square_reward, fix_cfg(seeds=(0, 1, 2), batch_size=1, iterations=3))
    it = iter(trainer)
    next(it)
    rng, order = trainer.generator.get_state().clone(), list(trainer._order)
    monkeypatch.setattr(trainers, "reward_loss", lambda scores, target: scores.sum() * float("inf"))
    try:
        with pytest.raises(trainers.NonFiniteLossError, match="loss is"):
            next(it)
        assert torch.equal(trainer.generator.get_state(), rng) and trainer._order == order
    finally:
        trainer.lora.remove()


def test_grad_clip_0_means_no_clipping_not_no_update(small_model, square_reward):
    """grad_clip 0 = off (mutant: passed to clip_grad_norm_ as max_norm 0, which zeroes every gradient, so the
    LoRA never moved)."""
    trainer = FixTrainer(small_model, square_reward, fix_cfg(grad_clip=0.0, iterations=1))
    try:
        (rec,) = list(trainer)
        assert rec.grad_norm > 0
        assert any(bool(a.up.abs().sum() > 0) for a in trainer.lora.adapters)
    finally:
        trainer.lora.remove()


def test_every_pass_takes_each_item_once(small_model, square_reward):
    """Items are drawn in seeded passes: over 10 passes of 3 items in batches of 2, each item comes exactly 10
    times (mutant: the items left of a pass dropped when the next pass is drawn)."""
    from collections import Counter
    trainer = FixTrainer(small_model, square_reward, fix_cfg(seeds=(0, 1, 2), batch_size=2, iterations=2))
    try:
        drawn = [i for _ in range(15) for i in trainer._next_items()]
        assert Counter(drawn) == {0: 10, 1: 10, 2: 10}
    finally:
        trainer.lora.remove()


# Found by mutation testing (session 24), trainer input checks no earlier test held.
def test_the_largest_seed_is_taken_and_one_more_is_refused():
    from focusfix_core.trainers import MAX_SEED
    assert fix_cfg(seed=MAX_SEED, seeds=(MAX_SEED,)).seed == MAX_SEED
    for kw in (dict(seed=MAX_SEED + 1), dict(seeds=(0, MAX_SEED + 1))):
        with pytest.raises(ValueError, match="seed"):
            fix_cfg(**kw)


@pytest.mark.parametrize("method", ["fnf", "sne"])
def test_a_size_the_models_latents_cannot_hold_is_refused_before_setup(small_model, square_reward, monkeypatch, method):
    """A latent model (SD's VAE: 8 px per latent pixel) needs width and height in multiples of 8."""
    monkeypatch.setattr(small_model, "latent_scale", 8)
    with pytest.raises(ValueError, match=r"width and height must be multiples of 8 for this model, got 16x12"):
        if method == "fnf":
            FixTrainer(small_model, square_reward, fix_cfg(height=12))
        else:
            SeparateEnhanceTrainer(small_model, se_cfg(height=12))


def test_painted_masks_with_another_mask_source_are_refused(small_model, square_reward):
    with pytest.raises(ValueError, match="masks were given but mask_source is 'saliency'"):
        FixTrainer(small_model, square_reward, fix_cfg(mask_source="saliency"), masks=torch.ones(1, 16, 16))


def test_no_preservation_term_derives_no_preservation_prompts():
    assert se_cfg(lam_preserve=0.0).preserve_prompts == ()
    assert se_cfg(lam_preserve=0.5).preserve_prompts == ("a red circle", "a blue square")


def test_a_state_of_the_other_method_is_refused_by_name(small_model, square_reward):
    fix = FixTrainer(small_model, square_reward, fix_cfg(iterations=2))
    state = fix.state_dict()
    fix.lora.remove()
    sne = SeparateEnhanceTrainer(small_model, se_cfg())
    try:
        with pytest.raises(ValueError, match=f"training state is for method {fix.method!r}, not {sne.method!r}"):
            sne.load_state_dict(state)
        assert sne.step == 0
    finally:
        sne.lora.remove()


# -- second mutation round: loss reductions, LV masks, optimizer and scaler, resume, S&E terms, noise, metadata
def _painted(n):
    """n painted masks, each a different square (1 = may change)."""
    M = torch.zeros(n, 16, 16)
    for k in range(n):
        M[k, 2 * k:2 * k + 6, 3:9] = 1
    return M


def test_fix_loss_is_minus_mean_reward_plus_lam_times_batch_mean_region(small_model, square_reward, monkeypatch):
    """A step's loss is -mean reward + lam * the batch MEAN of the per-item region term, and the record's reward is
    the batch's mean score of the images as scored (clamped)."""
    real = tr.region_loss
    monkeypatch.setattr(tr, "region_loss", lambda I, I0, M: real(I, I0, M) + torch.tensor([1.0, 3.0]))
    trainer = FixTrainer(small_model, square_reward, fix_cfg(lam=0.5, iterations=1))
    (rec,) = list(trainer)
    scores = square_reward(trainer.last_images.clamp(0, 1))
    trainer.lora.remove()
    assert not torch.allclose(scores[0], scores[1])  # two seeds, two scores: a mean differs from either
    assert rec.reward == pytest.approx(float(scores.mean()), rel=1e-5)
    assert rec.region == pytest.approx(2.0, abs=1e-5)  # I == I0 at step 0: mean of the added [1, 3]
    assert rec.loss == pytest.approx(-rec.reward + 0.5 * 2.0, rel=1e-5)


def test_lv_copies_pair_each_copy_with_its_own_items_painted_mask(small_model, square_reward, monkeypatch):
    """DRaFT-LV's adjacent copies [a, a, b, b] are held by their own item's mask (one painted mask per seed),
    not by [a, b, a, b]."""
    seen = []
    real = tr.region_loss
    monkeypatch.setattr(tr, "region_loss", lambda I, I0, M: seen.append(M.detach().clone()) or real(I, I0, M))
    M = _painted(2)
    trainer = FixTrainer(small_model, square_reward, fix_cfg(lv_copies=2, iterations=1, mask_source="mask"),
                         masks=M)
    list(trainer)
    trainer.lora.remove()
    got = seen[0][:, 0]
    order = [0, 0, 1, 1] if torch.equal(got[0], M[0]) else [1, 1, 0, 0]
    assert torch.equal(got, M[order])




def test_the_optimizer_is_adamw_without_weight_decay(small_model, square_reward):
    """The LoRA's AdamW has no weight decay (torch's default 0.01 would shrink the adapters every step)."""
    trainer = FixTrainer(small_model, square_reward, fix_cfg())
    trainer.lora.remove()
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.0]


def test_the_loss_scaler_grows_after_100_good_steps(square_reward):
    """fp16 training's loss scale starts at 2**16 and grows after 100 steps without overflow."""
    trainer = FixTrainer(_tiny(True), _Faint(square_reward), fix_cfg(mask_source="saliency"))
    trainer.lora.remove()
    assert trainer.scaler.get_scale() == 2.0**16 and trainer.scaler.get_growth_interval() == 100


def test_a_non_finite_gradient_at_loss_scale_1_stops_the_run(small_model, square_reward):
    """With loss scaling, a non-finite gradient at scale 1 (or below) is not an fp16 overflow to halve away: the
    run stops with the last good LoRA."""
    trainer = FixTrainer(small_model, square_reward, fix_cfg(iterations=1))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    start = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    trainer.params[0].register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteLossError, match="gradient norm is"):
        list(trainer)
    assert trainer.step == 0
    for k, v in trainer.lora.state_dict().items():
        assert torch.equal(v, start[k])
    trainer.lora.remove()


def test_a_resumed_run_puts_back_the_resumed_lora_not_the_fresh_one(small_model, square_reward, tmp_path):
    """After load_state, the last good step is the resumed one: a failed step (restore_last_good) goes back to
    the loaded LoRA and draws, not to the new trainer's start."""
    a = FixTrainer(small_model, square_reward, fix_cfg(iterations=2))
    list(a)
    a.save_state(tmp_path / "state.pt")
    saved = {k: v.clone() for k, v in a.lora.state_dict().items()}
    a.lora.remove()
    b = FixTrainer(small_model, square_reward, fix_cfg(iterations=4))
    b.load_state(tmp_path / "state.pt")
    rng = b.generator.get_state().clone()
    b.restore_last_good()
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "up" in k)
    for k, v in b.lora.state_dict().items():
        assert torch.equal(v, saved[k])
    assert torch.equal(b.generator.get_state(), rng)
    b.lora.remove()


@pytest.mark.parametrize("preservation", ["keys", "outputs"])
def test_separate_enhance_loss_weights_each_term(small_model, preservation):
    """A Separate-and-Enhance step's loss is lam_sep * separate + lam_en * enhance + lam_preserve * preserve."""
    trainer = SeparateEnhanceTrainer(small_model, se_cfg(lam_sep=1.0, lam_en=0.5, lam_preserve=0.25,
                                                         preservation=preservation, iterations=2))
    rec = list(trainer)[-1]  # step 0's preserve is 0 (the LoRA starts as the base model)
    trainer.lora.remove()
    assert trainer.preservation == preservation and rec.preserve > 1e-8
    assert rec.loss == pytest.approx(rec.separate + 0.5 * rec.enhance + 0.25 * rec.preserve, rel=1e-5, abs=1e-7)
    assert rec.enhance != pytest.approx(rec.separate)


def test_separate_enhance_records_each_term_under_its_own_name(small_model, monkeypatch):
    """The record's separate is the Separate loss and its enhance the Enhance loss."""
    monkeypatch.setattr(tr, "separate_loss", lambda A: A.sum((1, 2, 3)) * 0 + 1.0)
    monkeypatch.setattr(tr, "enhance_loss", lambda A: A.sum((1, 2, 3)) * 0 + 10.0)
    trainer = SeparateEnhanceTrainer(small_model, se_cfg(lam_preserve=0.0, iterations=1))
    (rec,) = list(trainer)
    trainer.lora.remove()
    assert (rec.separate, rec.enhance) == (pytest.approx(1.0), pytest.approx(10.0))


def test_random_latents_are_noised_at_their_sigma(small_model):
    """_noisy draws t in t_range (rounded to the nearest timestep), then z and eps ~ N(0, I), and returns
    x = z + sigma * eps with that sigma."""
    trainer = SeparateEnhanceTrainer(small_model, se_cfg(lam_preserve=0.0))
    trainer.lora.remove()
    state = trainer.generator.get_state()
    x, sigma = trainer._noisy(3)
    g = torch.Generator()
    g.set_state(state)
    lo, hi = trainer.cfg.t_range
    T = len(small_model.sigmas)
    t = ((lo + (hi - lo) * torch.rand(3, generator=g)) * (T - 1)).round().long()  # the nearest timestep
    z = torch.randn((3, *trainer.latent_shape), generator=g)
    eps = torch.randn((3, *trainer.latent_shape), generator=g)
    assert float(sigma.min()) > 1.0  # the noisier half of the schedule: sigma matters
    assert torch.equal(sigma, small_model.sigmas.float()[t])
    torch.testing.assert_close(x, z + sigma[:, None, None, None] * eps)


def test_eval_maps_noises_latents_to_the_variance_of_their_sigma(small_model):
    """eval_maps() reads the maps at x = N(0, I) * sqrt(1 + sigma^2), the spread of a noisy latent at sigma_frac
    of the schedule, drawn from its seed."""
    trainer = SeparateEnhanceTrainer(small_model, se_cfg(lam_preserve=0.0))
    seen = []
    real = trainer.attention_maps
    trainer.attention_maps = lambda idx, x, sigma, keep_grad: seen.append((x, sigma)) or real(idx, x, sigma, keep_grad)
    trainer.eval_maps(seed=3, sigma_frac=0.8)
    trainer.lora.remove()
    (x, sigma), = seen
    T = len(small_model.sigmas)
    assert float(sigma[0]) == pytest.approx(float(small_model.sigmas.float()[round(0.8 * (T - 1))]))
    assert float(sigma[0]) > 1.0  # the scaling is not close to 1
    z = torch.randn((1, *trainer.latent_shape), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, z * (1 + sigma[0] ** 2) ** 0.5)


def test_fix_metadata_records_lam_K_and_sampler_steps(small_model, square_reward):
    """A Focus-N-Fix LoRA's metadata records its lam, K and sampler steps as trained."""
    trainer = FixTrainer(small_model, square_reward, fix_cfg(lam=0.5, K=2, steps=4))
    trainer.lora.remove()
    meta = trainer.metadata()
    assert (meta["focusfix_lam"], meta["focusfix_K"], meta["focusfix_sampler_steps"]) == (0.5, 2, 4)
