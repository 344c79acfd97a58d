"""Property tests (hypothesis) for the Train nodes' module-level helpers (nodes/train_nodes.py): the painted MASK
input (`_mask_input`) against the core's rule for which item gets which mask, the seeds note, the batch note, the
checkpoint note, the report lines, the curve and the attention-map grid. The bug found is fixed; its test says so
("Fixed, was BUG 1")."""
from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pack_loader import load_pack

from focusfix_core.records import StepRecord
from focusfix_core.rewards.base import Reward
from focusfix_core.trainers import FixConfig, FixTrainer, batch_note

T = load_pack().nodes.train_nodes
FAST = settings(max_examples=60, deadline=None)
SOURCES = ("heatmap", "saliency", "mask", "none")


# ------------------------------------------------------------------------------------------- repeats
@FAST
@given(prompts=st.lists(st.sampled_from(["a cat", " a cat", "a dog ", "a dog", "", " ", "a bird"]), max_size=8))
def test_the_prompts_note_names_exactly_the_prompts_trained_more_than_once(prompts):
    from focusfix_core.trainers import repeated_prompts_note
    note = repeated_prompts_note(prompts, "--prompt")
    stripped = [p.strip() for p in prompts if p.strip()]
    repeated = [p for p in dict.fromkeys(stripped) if stripped.count(p) > 1]  # first-seen order
    assert note == ([f"--prompt repeat {repeated}: each repeat trains the same images again (counts them more)"]
                    if repeated else [])


# ------------------------------------------------------------------------------------------- _seed_list
@FAST
@given(seeds=st.lists(st.integers(0, 40), min_size=1, max_size=12), sep=st.sampled_from([",", ", ", " ", "\n"]))
def test_seed_list_keeps_the_seeds_and_notes_exactly_the_repeated_ones(seeds, sep):
    notes = []
    got = T._seed_list(sep.join(map(str, seeds)), notes)
    assert got == seeds
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        assert len(notes) == 1 and str(repeated) in notes[0] and "repeat" in notes[0]
    else:
        assert notes == []


# -------------------------------------------------------------------------------------------- batch_note
@FAST
@given(batch=st.integers(1, 64), n_items=st.integers(0, 200))
def test_batch_note_only_when_the_batch_is_larger_than_the_items(batch, n_items):
    notes = batch_note(batch, n_items)
    if batch <= n_items or n_items == 0:  # no items (empty prompts): refused by name elsewhere, no note
        assert notes == []
    else:
        assert len(notes) == 1 and f"batch_size {batch}" in notes[0] and f"the {n_items} (prompt, seed)" in notes[0]
        # how many times, not "twice" at 64 over 4 (review extreme)
        assert f"each of them {batch / n_items:.3g} times on average" in notes[0]


# ------------------------------------------------------------------------------------------- _mask_input
@st.composite
def _mask_case(draw):
    n_prompts, n_seeds = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 7))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    h, w = draw(st.sampled_from([(H, W), (draw(st.integers(1, 12)), draw(st.integers(1, 12)))]))
    layout = draw(st.sampled_from(["bhw", "b1hw", "hw"])) if n == 1 else draw(st.sampled_from(["bhw", "b1hw"]))
    seed = draw(st.integers(0, 2**16))
    return n_prompts, n_seeds, n, (H, W), (h, w), layout, seed


@FAST
@given(case=_mask_case(), source=st.sampled_from(SOURCES), lam=st.sampled_from([0.0, 1.0]))
def test_a_connected_mask_becomes_n_masks_at_the_image_size_with_true_notes(case, source, lam):
    n_prompts, n_seeds, n, size, (h, w), layout, seed = case
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(n, h, w, generator=g)
    given_mask = {"bhw": M, "b1hw": M[:, None], "hw": M[0]}[layout]
    notes = []
    if layout == "bhw" and n > 1 and h > 1 and w == 1:  # [B,H,1]: B masks 1 px wide or one [H,W,1]? refused
        with pytest.raises(ValueError, match=r"give it as \[1,H,W\] or \[H,W\]"):
            T._mask_input(given_mask, source, size, n_prompts, n_seeds, lam, notes)
        return
    if n not in (1, n_seeds, n_prompts * n_seeds):  # refused by the input's name, before the run
        with pytest.raises(ValueError, match=rf"^mask has {n} masks: expected 1 \(for every image\), one per seed "
                                             rf"\({n_seeds}\) or one per \(prompt, seed\) image "
                                             rf"\({n_prompts * n_seeds}, in the order of the before output\)$"):
            T._mask_input(given_mask, source, size, n_prompts, n_seeds, lam, notes)
        return
    masks, src = T._mask_input(given_mask, source, size, n_prompts, n_seeds, lam, notes)
    assert src == "mask"
    assert masks.shape == (n, 1, *size) and masks.dtype == torch.float32
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    if (h, w) == tuple(size):
        assert torch.equal(masks[:, 0], M)
    # a note says the source was replaced, only when it was; with lam 0 that the mask is not used instead
    assert any("used instead of mask_source" in s for s in notes) == (source != "mask" and lam > 0)
    assert any("lam 0: plain DRaFT" in s and "M (the connected MASK) is not used" in s for s in notes) == (lam == 0)
    assert any("resized" in s for s in notes) == ((h, w) != tuple(size))
    per_item = any("one per (prompt, seed) item" in s for s in notes)
    per_seed = any("one per seed" in s for s in notes)
    if n > 1 and n_prompts > 1 and n == n_prompts * n_seeds:
        assert per_item and not per_seed
    if n > 1 and n_prompts > 1 and n == n_seeds:
        assert per_seed and not per_item
    if n == 1 or n_prompts == 1:
        assert not per_item and not per_seed


@FAST
@given(n_prompts=st.integers(1, 3), n_seeds=st.integers(1, 3), source=st.sampled_from(SOURCES),
       lam=st.sampled_from([0.0, 1.0]))
def test_no_mask_keeps_the_source_and_mask_without_one_is_refused(n_prompts, n_seeds, source, lam):
    notes = []
    if source == "mask":
        with pytest.raises(ValueError, match="mask_source is 'mask' but no MASK is connected"):
            T._mask_input(None, source, (8, 8), n_prompts, n_seeds, lam, notes)
    else:
        assert T._mask_input(None, source, (8, 8), n_prompts, n_seeds, lam, notes) == (None, source)
        # lam 0 says the mask_source's M is not used (mask_source none needs no word)
        assert notes == ([f"lam 0: plain DRaFT, the whole image may change; M (mask_source {source!r}) is not used "
                          f"in training, only passed on at the mask output (Compare measures the change outside it)"]
                         if lam == 0 and source != "none" else [])


@FAST
@given(bad=st.sampled_from([torch.full((1, 4, 4), float("nan")), torch.ones(1, 4, 4, dtype=torch.int64),
                            torch.ones(0, 4, 4), torch.ones(2, 3, 4, 4)]))
def test_a_bad_mask_is_refused_naming_the_mask(bad):
    with pytest.raises(ValueError, match="mask"):
        T._mask_input(bad, "heatmap", (4, 4), 1, 1, 1.0, [])


# The node's notes promise the core's rule: 1 mask for every item, one per seed (item of prompt p and the j-th
# seed gets mask j, for every prompt), or one per (prompt, seed) item in prompt-major order. Checked on the core
# trainer the node hands the masks to, with a tiny model at 16 px and one sampler step.
def _small_model():
    from focusfix_core.tiny.model import TinyConfig, TinyModel
    cfg = TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    return TinyModel.random(seed=0, config=cfg)


_MODEL = None


class _RedReward(Reward):
    """Mean redness: any differentiable image reward (the painted masks do not depend on it)."""

    name = "red"

    def score(self, I):
        return I[:, 0].mean((1, 2))


def _painted_masks_used(prompts, seeds, M):
    global _MODEL
    if _MODEL is None:
        _MODEL = _small_model()
    cfg = FixConfig(prompts=tuple(prompts), seeds=tuple(seeds), height=16, width=16, steps=1, K=1, iterations=1,
                    mask_source="mask", threshold_mode="value", threshold=0.5, dilation=0)
    trainer = FixTrainer(_MODEL, _RedReward(), cfg, masks=M)
    try:
        return trainer.base(list(range(len(trainer.items))))[2]
    finally:
        trainer.lora.remove()


def _distinct_masks(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = (torch.rand(n, 16, 16, generator=g) > 0.5).float()
    for i in range(n):
        M[i, i, :] = 1  # non-empty and pairwise different
        M[i, (i + 1) % 16, :] = 0
    return M


PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@settings(max_examples=8, deadline=None)
@given(n_prompts=st.integers(1, 3), seeds=st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
       per=st.sampled_from(["one", "seed", "item"]), seed=st.integers(0, 100))
def test_each_item_gets_the_mask_the_nodes_note_promises(n_prompts, seeds, per, seed):
    n_items = n_prompts * len(seeds)
    n = {"one": 1, "seed": len(seeds), "item": n_items}[per]
    M = _distinct_masks(n, seed)
    notes = []
    masks, _ = T._mask_input(M, "mask", (16, 16), n_prompts, len(seeds), 1.0, notes)
    got = _painted_masks_used(PROMPTS[:n_prompts], seeds, masks)
    for i in range(n_items):
        p, j = divmod(i, len(seeds))
        want = M[0] if n == 1 else M[i] if n == n_items else M[j]
        assert torch.equal(got[i, 0], want), (i, p, j)  # got: [N,1,H,W]


@settings(max_examples=6, deadline=None)
@given(n_prompts=st.integers(2, 3), n_seeds=st.integers(1, 3), n=st.integers(2, 10))
def test_a_mask_count_the_notes_do_not_cover_is_refused_by_the_node_and_the_core(n_prompts, n_seeds, n):
    assume(n not in (1, n_seeds, n_prompts * n_seeds))
    M = _distinct_masks(n, 0)
    with pytest.raises(ValueError, match=f"^mask has {n} masks: expected 1"):  # named by the node's input
        T._mask_input(M, "mask", (16, 16), n_prompts, n_seeds, 1.0, [])
    with pytest.raises(ValueError, match=f"got {n} masks; expected 1, one per seed"):
        _painted_masks_used(PROMPTS[:n_prompts], list(range(n_seeds)), M[:, None])


# Fixed, was BUG 1: with a repeated seed ("5, 5", which `_seed_list` accepts with a note) and one painted mask per seed (the
# node's "one per seed (used for every prompt)"), every item of the repeated seed gets the FIRST copy's mask: the
# core maps an item to `cfg.seeds.index(seed)`, the first position of that seed value, so the second mask is
# silently never used (FixTrainer._painted_mask, focusfix_core/trainers.py). Minimal input: prompts ("a red circle",
# "a blue square"), seeds (5, 5), masks [2,16,16] (mask 0 the left half, mask 1 the top half): items 1 and 3
# ("a red circle"/"a blue square" with the 2nd seed) get mask 0, not mask 1.
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 100))
def test_a_repeated_seed_gets_its_own_painted_mask(seed):
    M = _distinct_masks(2, seed)
    got = _painted_masks_used(PROMPTS[:2], [5, 5], M)
    for i in range(4):
        assert torch.equal(got[i, 0], M[i % 2]), i


# ------------------------------------------------------------------------------------------- report lines
def _fake_folder_paths(monkeypatch, folder):
    fp = types.ModuleType("folder_paths")
    fp.get_folder_paths = lambda name: [str(folder)]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)


@FAST
@given(every=st.integers(-2, 50), iterations=st.integers(1, 60), written=st.booleans(),
       error=st.sampled_from([None, "disk full"]), sub=st.sampled_from(["", "focusfix/", "a/b/"]))
def test_checkpoint_note_says_where_the_checkpoint_went_or_why_there_is_none(tmp_path_factory, every, iterations,
                                                                              written, error, sub):
    folder = tmp_path_factory.mktemp("loras")
    with pytest.MonkeyPatch.context() as mp:
        _fake_folder_paths(mp, folder)
        path = folder.resolve() / f"{sub}checkpoint.safetensors" if written else None
        notes = T._checkpoint_note(path, every, iterations, error)
    if every <= 0:
        assert notes == []
        return
    assert len(notes) == 1
    if error is not None:
        assert error in notes[0] and "training went on" in notes[0]
        assert (f"{sub}checkpoint.safetensors holds an earlier step" in notes[0]) == written
    elif written and every < iterations:
        assert f"checkpoint: {sub}checkpoint.safetensors (every {every} iterations and after the last;" in notes[0]
    elif written:  # checkpoint_every >= iterations: the one after the last step
        assert f"checkpoint: {sub}checkpoint.safetensors (after the last iteration;" in notes[0]
    else:
        assert notes == ["checkpoint: none was written"]


def _records(draw, n, fp16=False):
    vals = st.one_of(st.none(), st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf]))
    out = []
    for i in range(n):
        out.append(StepRecord(step=i, total=n, loss=draw(st.floats(-1e3, 1e3)),
                              grad_norm=draw(st.sampled_from([0.0, 0.5, math.inf, math.nan]) if fp16 else
                                             st.sampled_from([0.0, 0.0, 1.5])),
                              seconds=draw(st.floats(0, 100)), reward=draw(vals), region=draw(vals),
                              separate=draw(vals), enhance=draw(vals), preserve=draw(vals),
                              loss_scale=draw(st.one_of(st.none(), st.sampled_from([2.0 ** 16, 1024.0])))
                              if fp16 else None))
    return out


@FAST
@given(data=st.data(), n=st.integers(1, 30), keys=st.sampled_from([T.CURVES_FIX, T.CURVES_SE]))
def test_the_curve_is_one_image_in_0_1_for_any_history(data, n, keys):
    history = _records(data.draw, n)
    img = T._curve(history, keys)
    assert img.shape == (1, 3, 256, 512) and img.dtype == torch.float32
    assert torch.isfinite(img).all() and float(img.min()) >= 0 and float(img.max()) <= 1
    assert float(img.min()) < 1  # something is drawn (a curve, a name, or "no data")


@FAST
@given(data=st.data(), n=st.integers(1, 20), target=st.one_of(st.none(), st.floats(-5, 5)))
def test_unchanged_note_only_when_every_gradient_was_exactly_zero(data, n, target):
    # Focus-N-Fix records (the only ones this note reads) always hold the step's mean reward
    history = [r if r.reward is not None else dataclasses.replace(r, reward=0.25) for r in _records(data.draw, n)]
    notes = T._unchanged_notes(history, target)
    if all(r.grad_norm == 0 for r in history):
        assert len(notes) == 1 and "did not change" in notes[0]
        assert ("reward_target" in notes[0]) == (target is not None)
    else:
        assert notes == []


@FAST
@given(data=st.data(), n=st.integers(1, 20))
def test_precision_note_counts_the_skipped_updates_of_the_scaled_steps(data, n):
    history = _records(data.draw, n, fp16=True)
    notes = T._precision_notes(history)
    scaled = [r for r in history if r.loss_scale is not None]
    if not scaled:
        assert notes == []
    else:
        skipped = sum(not math.isfinite(r.grad_norm) for r in scaled)
        assert len(notes) == 1 and f"{skipped} of {len(scaled)} updates skipped" in notes[0]
        assert f"last scale {scaled[-1].loss_scale:g}" in notes[0]


@FAST
@given(seconds=st.lists(st.floats(0, 1e4), min_size=1, max_size=30))
def test_timing_counts_the_steps_and_their_time(seconds):
    history = [StepRecord(step=i, total=len(seconds), loss=0.0, grad_norm=1.0, seconds=s)
               for i, s in enumerate(seconds)]
    line = T._timing(history)
    assert line.startswith(f"trained {len(seconds)} steps in ")
    assert f"({sum(seconds) / len(seconds):.2f} s per step)" in line


@FAST
@given(sigmas=st.lists(st.floats(0, 100), min_size=2, max_size=30), shape=st.sampled_from(["flat", "row"]))
def test_connected_sigmas_become_the_configs_values_with_a_step_count_note(sigmas, shape):
    t = torch.tensor(sigmas, dtype=torch.float32)
    notes = []
    got = T._schedule(t if shape == "flat" else t[None], notes)
    assert got == tuple(float(x) for x in t.tolist())
    assert len(notes) == 1 and f"{len(sigmas) - 1} steps" in notes[0]
    assert T._schedule(None, notes := []) == () and notes == []


@pytest.mark.parametrize("sigmas", [torch.zeros(0), torch.tensor([14.6]), torch.zeros(1, 0)])
def test_connected_sigmas_with_no_step_are_refused_by_name(sigmas):
    """Bad-input hunt (session 27): SplitSigmas past its end gives an empty SIGMAS; it read as "no sigmas" (steps
    and scheduler drew the images) while the report said "sigmas connected: -1 steps from them"."""
    with pytest.raises(ValueError, match=r"sigmas is connected but holds [01] value\(s\), expected steps \+ 1 "
                                         r"\(at least 2\): a SplitSigmas step past the end"):
        T._schedule(sigmas, [])


# ------------------------------------------------------------------------------------------- _maps_grid
@FAST
@given(P=st.integers(1, 3), n=st.integers(1, 4), h=st.integers(1, 20), w=st.integers(1, 40),
       size=st.integers(4, 64), seed=st.integers(0, 2**16), data=st.data())
def test_the_maps_grid_has_rows_per_prompt_columns_per_word_and_grey_blank_tiles(P, n, h, w, size, seed, data):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(P, n, h, w, generator=g)
    blank = data.draw(st.lists(st.tuples(st.integers(0, P - 1), st.integers(0, n - 1)), max_size=4))
    for p, i in blank:
        A[p, i] = 0
    grid = T._maps_grid(A, size)
    th, tw = max(round(size * h / max(h, w)), 1), max(round(size * w / max(h, w)), 1)
    assert grid.shape == (1, 3, P * (th + 2) + 2, n * (tw + 2) + 2)
    assert torch.isfinite(grid).all() and float(grid.min()) >= 0 and float(grid.max()) <= 1
    assert max(th, tw) == size  # the longer side is `size`, the aspect ratio kept
    for p in range(P):
        for i in range(n):
            tile = grid[0, :, 2 + p * (th + 2): 2 + p * (th + 2) + th, 2 + i * (tw + 2): 2 + i * (tw + 2) + tw]
            if (p, i) in blank:
                assert torch.equal(tile, torch.full_like(tile, 0.5)), (p, i)
            else:
                assert not torch.equal(tile, torch.full_like(tile, 0.5)), (p, i)


@FAST
@given(weak=st.floats(0.01, 0.5), seed=st.integers(0, 2**16))
def test_the_maps_grid_on_one_scale_shows_a_weak_word_weak(weak, seed):
    """Each tile was scaled by its own max: a word's map 20x weaker than the other's drew the same (review F3), so
    the attention views could not show what Enhance does. With one scale per prompt it draws weaker."""
    g = torch.Generator().manual_seed(seed)
    strong = torch.rand(1, 1, 8, 8, generator=g) + 0.1
    A = torch.cat([strong, strong * weak], 1)                                    # (1, 2, 8, 8): dog = weak * cat
    size = 8

    def red(grid, i):  # mean red of word i's tile
        return float(grid[0, 0, 2:2 + size, 2 + i * (size + 2):2 + i * (size + 2) + size].mean())
    own = T._maps_grid(A, size)
    assert red(own, 1) == pytest.approx(red(own, 0), abs=1e-5)                  # its own max: the same picture
    shared = T._maps_grid(A, size, top=A.flatten(1).amax(1))
    assert red(shared, 1) < red(shared, 0) - 0.05 * (1 - weak)
    assert torch.equal(shared[..., :2 + size], own[..., :2 + size])              # the strongest word as before


# ------------------------------------------------------------------------------------------- _text_inputs
@st.composite
def _conditioning(draw, D=8):
    entries = []
    for _ in range(draw(st.integers(1, 3))):
        B, T_ = draw(st.integers(1, 3)), draw(st.sampled_from([77, 154]))
        extra = draw(st.sets(st.sampled_from(["pooled_output", "area", "mask", "control", "strength"]), max_size=3))
        entries.append([torch.zeros(B, T_, D), {k: torch.zeros(B, 4) for k in extra}])
    return entries


@FAST
@given(clip=st.booleans(), positive=st.one_of(st.none(), _conditioning()),
       negative=st.one_of(st.none(), _conditioning()), prompts=st.lists(st.sampled_from(["a cat", "a dog", "# no"]),
                                                                          min_size=1, max_size=4))
def test_text_inputs_label_each_prompt_or_conditioning_row_and_note_what_training_ignores(clip, positive, negative,
                                                                                         prompts):
    dm = types.SimpleNamespace(clip="clip" if clip else None, is_adm=False)
    text = "\n".join(prompts)
    notes = []
    lines = [p for p in prompts if not p.startswith("#")]
    if not clip and (positive is None or negative is None):
        with pytest.raises(ValueError, match="clip input"):
            T._text_inputs(dm, text, "blurry", positive, negative, notes)
        return
    if positive is None and not lines:
        with pytest.raises(ValueError, match="prompts is empty"):
            T._text_inputs(dm, text, "blurry", positive, negative, notes)
        return
    labels, neg, cond, uncond = T._text_inputs(dm, text, "blurry", positive, negative, notes)
    if positive is None:
        assert labels == lines and cond is None
    else:
        n = sum(len(c[0]) for c in positive)
        assert labels == [f"positive[{i}]" for i in range(n)] and callable(cond)
        assert any(f"positive has {n} entries" in s for s in notes) == (n > 1)
    assert (neg, uncond is None) == (("blurry", True) if negative is None else ("negative[0]", False))
    if negative is not None:
        assert any("negative has several entries" in s for s in notes) == (sum(len(c[0]) for c in negative) > 1)
    for cond_in, name in ((positive, "positive"), (negative, "negative")):
        extra = set() if cond_in is None else {k for e in cond_in for k in e[1]} - {"pooled_output"}
        if cond_in is not None and len(cond_in) == 1 and not extra & {"area", "mask"}:
            extra.discard("strength")  # a lone entry's strength: KSampler divides it out
        line = [s for s in notes if s.startswith(f"{name}: training uses the text encoding only")]
        assert bool(line) == bool(extra)
        if extra:
            assert f"without its {', '.join(sorted(extra))}: KSampler given this CONDITIONING draws other" in line[0]


# ------------------------------------------------------------------------------------------- _continued_settings
@FAST
@given(rank=st.integers(1, 8), saved_rank=st.integers(1, 8), alpha=st.sampled_from([1.0, 2.0, 0.5, 16.0]),
       targets=st.sampled_from(["attn", "to_k", "all_linear"]),
       saved_targets=st.sampled_from([("attn",), ("to_k",), ("all_linear",), ("attn1\\.to_q$", "ff$")]),
       new=st.booleans())
def test_a_continued_lora_brings_its_own_rank_targets_and_alpha_with_a_note_when_the_nodes_differ(
        rank, saved_rank, alpha, targets, saved_targets, new):
    notes = []
    if new:
        assert T._continued_settings(None, "focus-n-fix", rank, targets, notes) == (rank, targets, None) and notes == []
        return
    data = load_pack().nodes.adapters.LoraData(tensors={"lora_unet_a.lora_down.weight": torch.zeros(saved_rank, 4)},
                                               rank=saved_rank, alpha=alpha, targets=saved_targets)
    want_targets = saved_targets[0] if len(saved_targets) == 1 else saved_targets
    assert T._continued_settings(data, "focus-n-fix", rank, targets, notes) == (saved_rank, want_targets, alpha)
    assert len(notes) == 1 and notes[0].startswith("continued LoraData(")
    assert ("are not used" in notes[0]) == ((rank, targets) != (saved_rank, want_targets))


# ------------------------------------------------------------------------------------------- _text_inputs
@pytest.mark.parametrize("positive, negative, name", [
    ([], [[torch.zeros(1, 4, 8), {}]], "positive"), ([[torch.zeros(1, 4, 8), {}]], [], "negative"),
    ([[torch.zeros(0, 4, 8), {}]], [[torch.zeros(1, 4, 8), {}]], "positive")])
def test_an_empty_conditioning_is_refused_naming_its_input_not_the_prompts(positive, negative, name):
    """Audit: positive=[] (a custom node's empty output) trained no item and was refused as 'prompts is empty',
    naming a widget the artist had not used. The CONDITIONING input is named now, before anything loads."""
    dm = types.SimpleNamespace(clip=None, is_adm=False)
    with pytest.raises(ValueError, match=rf"^{name} (must be a non-empty CONDITIONING|entry 0 is not a CONDITIONING)"):
        T._text_inputs(dm, "a cat", "", positive, negative, [])
    notes = []
    labels, negative_label, cond, uncond = T._text_inputs(dm, "ignored", "", [[torch.zeros(2, 4, 8), {}]],
                                                          [[torch.zeros(1, 4, 8), {}]], notes)
    assert labels == ["positive[0]", "positive[1]"] and negative_label == "negative[0]" and len(cond()) == 2


@pytest.mark.parametrize("text, n", [("#1 best photo of a cat\na dog", 1), ("a dog\n# off: a cat\n#x", 2),
                                     ("a dog", 0)])
def test_comment_lines_in_the_prompts_are_named_in_the_report(text, n):
    """Audit: '#1 best photo of a cat' was dropped as a comment without a word in the report."""
    dm = types.SimpleNamespace(clip=object(), is_adm=False)
    notes = []
    labels, *_ = T._text_inputs(dm, text, "", None, None, notes)
    assert labels == ["a dog"]
    assert len(notes) == (n > 0) and all(note.startswith(f"prompts: {n} line") for note in notes)


@pytest.mark.parametrize("sigmas, warned", [
    ([14.6, 3.0, 3.0, 0.5, 0.0], True), ([14.6, 14.6, 3.0, 0.5, 0.0], True), ([3.0, 3.0, 3.0, 0.0], True),
    ([14.6, 3.0, 0.5, 0.5, 0.0], False), ([14.6, 3.0, 0.5, 0.0], False), ([14.6, 14.6, 0.0], False)])
def test_the_redraw_note_warns_where_comfyuis_dpmpp_2m_draws_nan(sigmas, warned):
    """Audit: with a repeated sigma SamplerCustom's dpmpp_2m gave NaN (black) where training drew finite images,
    and the report still said SamplerCustom draws them. (Which schedules do: tests/integration, against
    ComfyUI's own sampler.) ddim has no such step."""
    note = T._redraw_note(3, 5.0, "dpmpp_2m", "normal", torch.tensor(sigmas), 64, 48)
    assert note.startswith("SamplerCustom draws these images (each prompt and seed, the negative prompt, an "
                           "Empty Latent Image of 64x48 and batch size 1) with the connected sigmas")
    assert ("after a repeated sigma ComfyUI's dpmpp_2m divides by zero" in note) == warned
    assert "divides by zero" not in T._redraw_note(3, 5.0, "ddim", "normal", torch.tensor(sigmas), 64, 48)


def test_a_continued_lora_above_the_highest_rank_is_refused_naming_continue_from():
    """A LoRA saved before the rank bound: the config's "rank must be at most 256" named the node's rank input,
    which a continued run does not use."""
    data = load_pack().nodes.adapters.LoraData(tensors={"lora_unet_a.lora_down.weight": torch.zeros(300, 4)},
                                               rank=300, alpha=300.0, targets=("attn",))
    with pytest.raises(ValueError, match=r"^continue_from \(LoraData\(.*\)\): its rank 300 is above 256, the most"):
        T._continued_settings(data, "focus-n-fix", 4, "attn", [])
