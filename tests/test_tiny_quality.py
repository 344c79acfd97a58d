"""benchmarks/quality.py (issue 4) runs end to end on its reduced CI setting; what decides its printed figures
(settings, splits, which model draws each image, regions, counts, formats) is held with a stand-in model that draws
the world's own images and stand-in trainers whose LoRA edits only the glitch or red pixels."""
import importlib.util
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from focusfix_core.tiny.evaluate import colour_labels, evaluate, glitch_map, summarize
from focusfix_core.tiny.model import DEFAULT_WEIGHTS
from focusfix_core.tiny.world import COLOURS, WorldConfig, all_prompts, make_batch, parse_caption

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped tiny weights not built")
def test_quality_benchmark_quick(quality, capsys):
    table = quality.main(["--quick", "--only", "artifact"])
    lines = table.splitlines()
    assert lines[0].startswith("| experiment | method | reward")
    assert [ln.split("|")[2].strip() for ln in lines[2:]] == ["base", "DRaFT", "Focus-N-Fix"]
    assert "setting: quick" in capsys.readouterr().out


def test_defect_regions_cover_ground_truth(quality):
    I, _, scenes = make_batch(16, seed=5, cfg=WorldConfig(glitch_rate=1.0), prompts=["a red circle"] * 16)
    R, Rr = quality.glitch_region(I, px=2), quality.colour_region(I, "red", px=0)
    for i, s in enumerate(scenes):
        if s.glitch is not None:
            x0, y0, x1, y1 = s.glitch
            assert R[i, y0:y1, x0:x1].all()                              # covers the glitch ...
            near = torch.zeros(32, 32, dtype=torch.bool)
            near[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
            assert not (R[i] & ~near).any()                              # ... within 3 px
        assert (Rr[i] <= s.masks[0] | ~s.masks[0]).all() and Rr[i][s.masks[0]].float().mean() > 0.9
    mae, psnr = quality.outside_change(I, I, R)
    assert mae == 0 and psnr == 99.0
    assert quality.outside_change(I.clamp(0.1, 0.9), I, torch.zeros_like(R))[0] > 0


def test_attribute_rows_count_the_objects_that_are_not_red(quality):
    """A fix that removes the red object and keeps the other one counts as both objects kept (evaluate's own
    both_present asks for red too, so no fix could pass it); an image that lost the other object does not."""
    clean = WorldConfig(glitch_rate=0.0)
    kept, _, _ = make_batch(4, seed=1, cfg=clean, prompts=["a blue square"] * 4)
    lost, _, _ = make_batch(4, seed=2, cfg=clean, prompts=["a green circle"] * 4)
    prompts = ["a red circle and a blue square"] * 8
    I = torch.cat([kept, lost])
    R = torch.zeros(8, 32, 32, dtype=torch.bool)
    row = quality._row("attribute", "x", 0.0, I, I, prompts, R, 0.0, red=0.0)
    assert row["both"] == pytest.approx(50.0) and row["alignment"] == pytest.approx(50.0)
    assert quality.summarize(quality.evaluate(I, prompts))["both_objects_rate"] == 0.0


RED = list(COLOURS).index("red")


class FakeModel:
    """model.sample stand-in: the world's image for each (prompt, seed) (glitch_rate 1); with a LoRA attached,
    `effect` edits it: "glitch" greys the magenta pixels, "red" greys all red pixels but 8, "shift" adds 0.1."""

    def __init__(self, effect="glitch"):
        self.effect, self.active, self.calls = effect, [], []

    def base(self, prompts, seeds):
        cfg = WorldConfig(glitch_rate=1.0)
        return torch.cat([make_batch(1, seed=int(sd), cfg=cfg, prompts=[p])[0] for p, sd in zip(prompts, seeds)])

    def sample(self, prompts, seeds, steps, cfg_scale):
        assert len(prompts) == len(seeds) <= 32
        self.calls.append({"prompts": list(prompts), "seeds": list(seeds), "steps": steps, "cfg": cfg_scale,
                           "loras": len(self.active)})
        I = self.base(prompts, seeds)
        for _ in self.active:
            I = self.edit(I)
        return I

    def edit(self, I):
        if self.effect == "shift":
            return (I + 0.1).clamp(0, 1)
        if self.effect == "glitch":
            m = glitch_map(I) > 0.3
        else:
            m = colour_labels(I) == RED
            keep = m.flatten(1).cumsum(1).view_as(m) <= 8
            m = m & ~keep
        return torch.where(m[:, None], torch.full_like(I, 0.5), I)


@dataclass
class Rec:
    step: int
    total: int

    def summary(self):
        return f"step {self.step}"


class FakeLoRA:
    def __init__(self, model, tag):
        self.model, self.tag = model, tag
        model.active.append(tag)

    def remove(self):
        self.model.active.remove(self.tag)


def fake_trainer(log):
    class FakeTrainer:
        def __init__(self, model, *args):
            self.cfg = args[-1]
            log.append({"reward": args[0] if len(args) == 2 else None, "cfg": self.cfg, "loras_before": len(model.active)})
            self.lora = FakeLoRA(model, object())

        def __iter__(self):
            return iter([Rec(i, self.cfg.iterations) for i in range(self.cfg.iterations)])
    return FakeTrainer


def mean_reward(I):
    return I.mean((1, 2, 3))


TINY = dict(steps=3, train_seeds=2, candidate_seeds=4, eval_seeds=2, fix_iterations=2, fix_batch=1, K=2,
            se_iterations=1, se_batch=1)


def run_fix(quality, monkeypatch, effect, exp, **kw):
    log = []
    monkeypatch.setattr(quality, "FixTrainer", fake_trainer(log))
    model = FakeModel(effect)
    s = replace(quality.FULL, **{**TINY, **kw})
    train_p, eval_p = ["a blue square", "a red circle"], ["a red triangle", "a green circle"]
    rows = quality.fix_experiment(model, mean_reward, exp, train_p, eval_p, s,
                                  {"mask_source": "heatmap", "threshold": 0.5}, lambda m: None)
    return rows, log, model, s, train_p, eval_p


def test_full_setting_is_the_documented_one(quality):
    """FULL is the setting benchmarks/RESULTS.md quotes (20 steps, 60 x 4 at K = 2, lam = 0.05, 8 of 48 seeds, 24 eval seeds)."""
    f = quality.FULL
    assert (f.steps, f.cfg_scale, f.fix_cfg_scale) == (20, 1.5, 1.5)
    assert (f.train_seeds, f.candidate_seeds, f.eval_seeds) == (8, 48, 24)
    assert (f.fix_iterations, f.fix_batch, f.fix_lr, f.K, f.lam) == (60, 4, 4e-3, 2, 0.05)
    assert (f.se_iterations, f.se_batch, f.se_lr, f.se_lam_preserve, f.se_seed) == (200, 2, 5e-4, 1.0, 0)


def test_split_and_eval_set_hold_prompts_and_seeds_out(quality):
    """Training and evaluation prompts are disjoint halves; evaluation seeds are 100000+, one per image, never candidates."""
    train, held = quality._split(quality.SINGLE)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(quality.SINGLE)
    ps, seeds = quality.eval_set(held, 3)
    assert ps == [p for p in held for _ in range(3)]
    assert len(set(seeds)) == len(ps) and min(seeds) >= 100_000 > quality.FULL.candidate_seeds


def test_sample_keeps_every_image_in_order_beyond_32(quality):
    """sample() draws in chunks of 32 but returns one image per (prompt, seed), in order."""
    model = FakeModel()
    prompts = (quality.SINGLE * 4)[:40]
    I = quality.sample(model, prompts, list(range(40)), replace(quality.FULL, steps=3), 1.5)
    assert I.shape[0] == 40 and [len(c["seeds"]) for c in model.calls] == [32, 8]
    assert torch.equal(I, model.base(prompts, list(range(40))))


def test_outside_change_values(quality):
    """Mean |I - I0| is in 1/255 and PSNR is 10 log10(1/MSE), both over the pixels outside R only."""
    I0 = torch.full((2, 3, 32, 32), 0.5)
    R = torch.zeros(2, 32, 32, dtype=torch.bool)
    R[:, :16] = True
    I = I0.clone()
    I[:, :, :16] += 0.3                      # inside R: not counted
    I[:, :, 16:] -= 0.1                      # outside R
    mae, psnr = quality.outside_change(I, I0, R)
    assert mae == pytest.approx(25.5, rel=1e-4) and psnr == pytest.approx(20.0, abs=1e-3)
    mae, psnr = quality.outside_change(I, I0, torch.ones_like(R))   # nothing outside: no change, not NaN
    assert mae == 0 and psnr == 99.0


def test_row_base_and_outside_region(quality):
    """The base row reports no change (0, inf); the others measure the change outside R, not inside."""
    I0, prompts, _ = make_batch(4, seed=3, cfg=WorldConfig(glitch_rate=0.0), prompts=["a red circle"] * 4)
    R = torch.zeros(4, 32, 32, dtype=torch.bool)
    R[:, :8] = True
    I = I0.clone()
    I[:, :, :8] = 1 - I[:, :, :8]            # change inside R only
    base = quality._row("artifact", "base", 0.0, I0, I0, prompts, R, 1.0)
    assert base["mae"] == 0.0 and base["psnr"] == float("inf")
    fix = quality._row("artifact", "Focus-N-Fix", 0.0, I, I0, prompts, R, 1.0)
    assert fix["mae"] == 0.0 and fix["psnr"] == 99.0


def test_attribute_row_counts_shapes_and_only_two_object_images(quality):
    """Attribute alignment asks for the right shape of each not-red object; both objects counts two-object images only."""
    clean = WorldConfig(glitch_rate=0.0)
    circle, _, _ = make_batch(4, seed=1, cfg=clean, prompts=["a blue circle"] * 4)
    single_gone, _, _ = make_batch(2, seed=2, cfg=clean, prompts=["a green circle"] * 2)
    I = torch.cat([circle, single_gone])
    prompts = ["a red circle and a blue square"] * 4 + ["a yellow square"] * 2
    row = quality._row("attribute", "x", 0.0, I, I, prompts, torch.zeros(6, 32, 32, dtype=torch.bool), 0.0, red=0.0)
    assert row["alignment"] == pytest.approx(0.0)       # blue is there, but a circle, not the square
    assert row["both"] == pytest.approx(100.0)          # 4 of 4 two-object images keep their blue object


def test_flagged_seeds_are_the_ones_the_reward_likes_least_on_average(quality):
    """flagged_seeds averages each candidate seed's reward over the prompts and keeps the train_seeds lowest."""
    class Model:
        def sample(self, prompts, seeds, steps, cfg_scale):
            val = {0: [0.9, 0.9], 1: [0.8, 0.1], 2: [0.2, 0.3], 3: [0.25, 0.05]}   # seed -> per prompt
            return torch.stack([torch.full((3, 32, 32), val[sd][["a", "b"].index(p)]) for p, sd in zip(prompts, seeds)])
    s = replace(quality.FULL, candidate_seeds=4, train_seeds=2)
    assert quality.flagged_seeds(Model(), mean_reward, ["a", "b"], s) == [2, 3]


def test_fix_experiment_settings_and_models(quality, monkeypatch):
    """DRaFT is lam 0 without masks, Focus-N-Fix is lam with the given masks; both train on the flagged seeds of the
    training prompts with the Fix settings; the base images come from the base model, each method's from its LoRA alone."""
    rows, log, model, s, train_p, eval_p = run_fix(quality, monkeypatch, "glitch", "artifact", cfg_scale=3.0)
    assert [r["method"] for r in rows] == ["base", "DRaFT", "Focus-N-Fix"]
    draft, fnf = log[0]["cfg"], log[1]["cfg"]
    assert (draft.lam, draft.mask_source) == (0.0, "none") and (fnf.lam, fnf.mask_source, fnf.threshold) == (0.05, "heatmap", 0.5)
    flagged = quality.flagged_seeds(FakeModel("glitch"), mean_reward, train_p, s)
    for c in (draft, fnf):
        assert c.prompts == tuple(train_p) and c.seeds == tuple(flagged)
        assert (c.K, c.iterations, c.batch_size, c.lr, c.steps, c.cfg_scale) == (2, 2, 1, 4e-3, 3, 1.5)
        assert c.reward_target is None
    assert [e["loras_before"] for e in log] == [0, 0] and model.active == []
    cands = [c for c in model.calls if c["seeds"][0] < 100_000]
    assert {p for c in cands for p in c["prompts"]} == set(train_p)      # seeds are picked on the training prompts
    evals = [c for c in model.calls if c["seeds"][0] >= 100_000]
    assert [c["loras"] for c in evals] == [0, 1, 1] and {c["cfg"] for c in model.calls} == {1.5}
    assert rows[0]["mae"] == 0.0 and rows[2]["mae"] == 0.0   # the fix changed only the glitch pixels


def test_attribute_fix_experiment_regions_and_red_rate(quality, monkeypatch):
    """Attribute rows: changes are measured outside the base image's red region; red % counts images with >= 16 red px
    of the method's own images."""
    rows, log, model, s, train_p, eval_p = run_fix(quality, monkeypatch, "red", "attribute")
    base, draft, fnf = rows
    I0 = model.base(*quality.eval_set(eval_p, s.eval_seeds))
    expect = 100.0 * ((colour_labels(I0) == RED).flatten(1).sum(1) >= 16).float().mean().item()
    assert base["red"] == pytest.approx(expect) and expect > 0
    assert draft["red"] == 0.0 and fnf["red"] == 0.0
    assert draft["mae"] == 0.0 and fnf["mae"] == 0.0


def test_fix_experiment_trains_on_train_reward_when_given(quality, monkeypatch):
    """train_reward (the logit objective) is what the trainer optimises; the table's reward column stays `reward`."""
    log = []
    monkeypatch.setattr(quality, "FixTrainer", fake_trainer(log))
    other = lambda I: -I.mean((1, 2, 3))  # noqa: E731
    s = replace(quality.FULL, **TINY)
    quality.fix_experiment(FakeModel("shift"), mean_reward, "attribute", ["a red circle"], ["a red square"], s,
                           {"mask_source": "saliency"}, lambda m: None, other, 2.0)
    assert all(e["reward"] is other and e["cfg"].reward_target == 2.0 for e in log)


def test_composition_experiment(quality, monkeypatch):
    """S&E trains on half the held-out two-shape pairs and is evaluated on the other half; alignment and the change
    columns come from the single-object images (eval_seeds // 2 each) against the base model's, both objects from the pairs."""
    log = []
    monkeypatch.setattr(quality, "SeparateEnhanceTrainer", fake_trainer(log))
    model = FakeModel("shift")
    s = replace(quality.FULL, **TINY)
    rows = quality.composition_experiment(model, s, lambda m: None)
    cfg = log[0]["cfg"]
    pairs = [p for p in all_prompts(2, held_out=True) if len({sh for _, sh in parse_caption(p)}) == 2]
    assert set(cfg.prompts) <= set(pairs) and len(cfg.prompts) == (len(pairs) + 1) // 2
    assert cfg.objects == tuple(tuple(sh for _, sh in parse_caption(p)) for p in cfg.prompts)
    evals = [c for c in model.calls if c["loras"] == 1]
    pair_p = [p for c in evals for p in c["prompts"] if " and " in p]
    single_p = [p for c in evals for p in c["prompts"] if " and " not in p]
    assert set(pair_p) <= set(pairs) and set(pair_p).isdisjoint(cfg.prompts)
    assert len(single_p) == len(quality.SINGLE) * (s.eval_seeds // 2)
    ss, sseeds = quality.eval_set(quality.SINGLE, s.eval_seeds // 2)
    S = model.edit(model.base(ss, sseeds))
    base, se = rows
    assert se["alignment"] == pytest.approx(summarize(evaluate(S, ss))["alignment"])
    assert se["mae"] == pytest.approx(quality.outside_change(S, model.base(ss, sseeds), torch.zeros(len(ss), 32, 32, dtype=torch.bool))[0])
    assert se["mae"] > 0 and base["mae"] == 0 and base["psnr"] == float("inf")
    assert cfg.seed == s.se_seed and model.active == []


def test_composition_uses_se_seed(quality, monkeypatch):
    """--set se_seed=N reaches SeparateEnhanceConfig.seed (the run-to-run spread)."""
    log = []
    monkeypatch.setattr(quality, "SeparateEnhanceTrainer", fake_trainer(log))
    quality.composition_experiment(FakeModel("shift"), replace(quality.FULL, **TINY, se_seed=7), lambda m: None)
    assert log[0]["cfg"].seed == 7


def test_table_formats(quality):
    """Reward with 3 decimals, Δ outside with 2, rates with 1, None as –, inf as ∞."""
    row = {"experiment": "artifact", "method": "base", "reward": -0.15234, "artifact": 6.25, "red": None,
           "mae": 2.544, "psnr": float("inf"), "alignment": 38.19, "both": float("nan"), "seconds": 33.4}
    line = quality.table([row]).splitlines()[2]
    assert line == "| artifact | base | -0.152 | 6.2 | – | 2.54 | ∞ | 38.2 | – | 33 |"


@pytest.fixture
def main_calls(quality, monkeypatch):
    calls = []
    monkeypatch.setattr(quality, "load_default_model", lambda: "model")
    monkeypatch.setattr(quality, "load_default_rewards", lambda: {"artifact": "art", "attribute": "attr"})
    monkeypatch.setattr(quality, "fix_experiment", lambda *a: calls.append(("fix", a)) or [])
    monkeypatch.setattr(quality, "composition_experiment", lambda *a: calls.append(("comp", a)) or [])
    monkeypatch.setattr(quality.torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    return calls


def test_main_passes_the_documented_experiments(quality, main_calls):
    """main: artifact on the single-object halves with heatmap masks at 0.5; attribute on the trained red prompts with
    saliency masks at 0.3 and the probability objective; composition on the setting."""
    quality.main(["--threads", "3"])
    assert main_calls[0] == ("threads", 3)
    (_, art), (_, attr), (_, comp) = main_calls[1:]
    assert art[1:4] == ("art", "artifact", quality.SINGLE[0::2]) and art[4] == quality.SINGLE[1::2] and art[5] == quality.FULL
    assert art[6] == {"mask_source": "heatmap", "threshold_mode": "value", "threshold": 0.5, "blur_sigma": 1.0, "dilation": 2}
    red = [q for q in quality.SINGLE + all_prompts(2, held_out=False) if "red" in q]
    assert attr[3] == red[0::2] and attr[4] == red[1::2]
    assert all(len(parse_caption(q)) == 1 or q in all_prompts(2, held_out=False) for q in attr[3] + attr[4])
    assert attr[6]["mask_source"] == "saliency" and attr[6]["threshold"] == 0.3
    assert attr[8:] == (None, None) and comp[1] == quality.FULL


def test_main_set_converts_types_and_hinge_target(quality, main_calls):
    """--set converts to the field's type; hinge trains on -logit P(red) up to -logit(hinge_target) = log((1-t)/t)."""
    quality.main(["--only", "attribute", "--set", "K=4", "attribute_objective=hinge", "hinge_target=0.2"])
    (_, attr), = main_calls
    assert attr[5].K == 4 and isinstance(attr[5].K, int)
    assert isinstance(attr[8], quality.LogitAttribute) and attr[9] == pytest.approx(math.log(4.0))


def test_main_refusals(quality, main_calls):
    """Unknown --set fields, an unknown attribute objective and a hinge target outside (0, 1) are refused with
    ValueError before any experiment: also when the attribute experiment would run only after the artifact one
    (minutes at the full setting), or not at all (--only artifact: the setting line would show the bad value)."""
    with pytest.raises(ValueError, match="unknown field"):
        quality.main(["--set", "bogus=1"])
    with pytest.raises(ValueError, match="hinge_target"):
        quality.main(["--only", "attribute", "--set", "attribute_objective=hinge", "hinge_target=1.0"])
    with pytest.raises(ValueError, match="hinge_target"):
        quality.main(["--set", "attribute_objective=hinge", "hinge_target=1.0"])
    with pytest.raises(ValueError, match="attribute_objective must be probability, logit or hinge"):
        quality.main(["--only", "artifact", "--set", "attribute_objective=bogus"])
    assert main_calls == []
