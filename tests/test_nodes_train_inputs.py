"""The Train nodes' inputs reach the core configs, and their queue-time checks, without ComfyUI (nodes/train_nodes.py):
the run is replaced by one that builds the config and stops, as in tests/test_nodes_adapters.py."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from comfy_stubs import folder_paths_stub
from pack_loader import load_pack

from focusfix_core.records import StepRecord

PACK = load_pack()
T = PACK.nodes.train_nodes
A = PACK.nodes.adapters
FNF = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainFocusNFix"]
SNE = PACK.NODE_CLASS_MAPPINGS["FocusFixTrainSeparateEnhance"]


class _ConfigBuilt(Exception):
    pass


class _FakeModel:
    def clone(self):
        return self


def _fake_runs(monkeypatch, built):
    def fake_fix(dm, reward, make_cfg, **kw):
        built["cfg"], built["kw"] = make_cfg(), kw
        raise _ConfigBuilt

    def fake_sne(dm, make_cfg, **kw):
        built["cfg"], built["kw"] = make_cfg(), kw
        raise _ConfigBuilt

    monkeypatch.setattr(T, "check_comfyui_trains", lambda: None)  # reads comfy
    monkeypatch.setattr(T, "ComfyDiffusionModel", lambda model, clip, vae=None: types.SimpleNamespace(
        clip=clip, is_adm=False))
    monkeypatch.setattr(T, "run_focus_n_fix", fake_fix)
    monkeypatch.setattr(T, "run_separate_enhance", fake_sne)
    monkeypatch.setattr(T, "graph_metadata", lambda prompt, extra_pnginfo: {})  # reads comfy.cli_args


def _fix(**kw):
    args = dict(model=_FakeModel(), vae="vae", reward="reward", prompts="a cat", negative_prompt="", seeds="0",
                width=64, height=64, steps=4, cfg=5.0, K=1, lam=1.0, mask_source="heatmap", rank=4, targets="attn",
                lr=1e-4, iterations=3, seed=0, clip="clip")
    args.update(kw)
    with pytest.raises(_ConfigBuilt):
        T.FocusFixTrainFocusNFix().execute(**args)


def _lora(method, rank=2, alpha=2.0):
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    return A.LoraData(tensors={f"{key}.lora_down.weight": torch.zeros(rank, 8), f"{key}.lora_up.weight":
                               torch.zeros(8, rank), f"{key}.alpha": torch.tensor(alpha)},
                      metadata={"focusfix_targets": '["to_k"]', "focusfix_method": method},
                      rank=rank, alpha=alpha, targets=("to_k",), method=method)


def test_focus_n_fix_passes_its_mask_sampler_and_batch_widgets_to_the_config(monkeypatch):
    # every widget the artist sets changes the run: none may be dropped for its default on the way to FixConfig
    built = {}
    _fake_runs(monkeypatch, built)
    _fix(mask_source="saliency", threshold_mode="value", threshold=0.4, dilation=5, saliency_method="smoothgrad",
         sampler_name="euler", scheduler="karras", batch_size=2, seeds="0, 1")
    cfg = built["cfg"]
    assert (cfg.threshold_mode, cfg.threshold, cfg.dilation, cfg.saliency_method) == ("value", 0.4, 5, "smoothgrad")
    assert (cfg.sampler_name, cfg.scheduler, cfg.batch_size) == ("euler", "karras", 2)


def test_focus_n_fix_trains_with_connected_sigmas(monkeypatch):
    built = {}
    _fake_runs(monkeypatch, built)
    _fix(sigmas=torch.tensor([14.6, 3.0, 0.5, 0.0]))
    assert built["cfg"].sigmas == pytest.approx((14.6, 3.0, 0.5, 0.0))


def test_separate_enhance_passes_its_widgets_to_the_config(monkeypatch):
    # lam_preserve is its own weight, not lam_sep's or lam_en's
    built = {}
    _fake_runs(monkeypatch, built)
    with pytest.raises(_ConfigBuilt):
        T.FocusFixTrainSeparateEnhance().execute(_FakeModel(), "clip", "a cat and a dog | cat, dog", 0.5, 0.25, 3.0,
                                                 8, 64, 64, 3, "to_k", 1e-3, 7, 11, batch_size=2)
    cfg = built["cfg"]
    assert (cfg.lam_sep, cfg.lam_en, cfg.lam_preserve) == (0.5, 0.25, 3.0)
    assert (cfg.prompts, cfg.objects) == (("a cat and a dog",), (("cat", "dog"),))
    assert (cfg.resolution, cfg.width, cfg.height, cfg.rank, cfg.targets) == (8, 64, 64, 3, "to_k")
    assert (cfg.lr, cfg.iterations, cfg.seed, cfg.batch_size) == (1e-3, 7, 11, 2)


@pytest.mark.parametrize("node", ["fix", "sne"])
def test_a_continued_lora_is_trained_at_its_own_alpha(monkeypatch, node):
    # continuing with alpha = rank would rescale every weight the first run trained (alpha/rank 0.5 -> 1)
    built = {}
    _fake_runs(monkeypatch, built)
    if node == "fix":
        data = _lora("focus-n-fix", rank=4, alpha=2.0)
        _fix(continue_from=data, rank=8, targets="attn")
    else:
        data = _lora("separate-and-enhance", rank=4, alpha=2.0)
        with pytest.raises(_ConfigBuilt):
            T.FocusFixTrainSeparateEnhance().execute(_FakeModel(), "clip", "a cat and a dog | cat, dog", 1.0, 1.0,
                                                     1.0, 8, 64, 64, 8, "attn", 1e-4, 2, 0, continue_from=data)
    cfg = built["cfg"]
    assert (cfg.rank, cfg.targets, cfg.alpha) == (4, "to_k", 2.0)
    assert built["kw"]["continue_from"] is data


def test_the_negative_conditioning_of_every_item_is_its_first_entry():
    # the report says "the first is the negative prompt of every item": the uncond must be that entry
    dm = types.SimpleNamespace(clip=None, is_adm=False)
    first, second = torch.full((1, 4, 8), 1.0), torch.full((1, 4, 8), 2.0)
    notes = []
    _, label, _, uncond = T._text_inputs(dm, "", "", [[torch.zeros(1, 4, 8), {}]], [[first, {}], [second, {}]],
                                         notes)
    assert label == "negative[0]" and torch.equal(uncond()["context"], first)
    assert any("negative has several entries: the first" in n for n in notes)


def test_a_continued_lora_of_the_highest_rank_is_accepted():
    # rank 256 is the rank widget's own maximum: a LoRA the node trained at it can be continued
    data = _lora("focus-n-fix", rank=T.MAX_RANK, alpha=1.0)
    assert T._continued_settings(data, "focus-n-fix", 4, "attn", [])[0] == T.MAX_RANK


def test_a_bad_checkpoint_name_is_refused_at_queue_time_also_when_checkpoint_every_is_linked(tmp_path, monkeypatch):
    # checkpoint_every from a link (None at queue time) may be on: the name must be checked now, not after training
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths_stub(tmp_path))
    for node, base in ((FNF, dict(steps=4, K=1)), (SNE, dict(prompts="a cat and a dog | cat, dog"))):
        assert "checkpoint_name: filename '../x' must stay inside" in node.VALIDATE_INPUTS(
            **base, checkpoint_every=None, checkpoint_name="../x")
        assert node.VALIDATE_INPUTS(**base, checkpoint_every=0, checkpoint_name="../x") is True  # off: unused


# ------------------------------------------------------------------ the Train nodes' outputs from a finished run
RUNS = PACK.nodes.runs


def _node_returns(monkeypatch, runner: str, run):
    """The Train node's run (`runner`: run_focus_n_fix or run_separate_enhance) replaced by one that returns `run`."""
    monkeypatch.setattr(T, "check_comfyui_trains", lambda: None)
    monkeypatch.setattr(T, "ComfyDiffusionModel", lambda model, clip, vae=None: types.SimpleNamespace(
        clip=clip, is_adm=False, redraw_caveats=lambda: []))
    monkeypatch.setattr(T, runner, lambda *a, **k: run)
    monkeypatch.setattr(T, "graph_metadata", lambda prompt, extra_pnginfo: {})
    return run


def _finished_fix_run(monkeypatch, M=None, grad_norm=1.0, reward=0.1):
    lora = _lora("focus-n-fix")
    I0, I = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    history = [StepRecord(step=i, total=2, loss=0.0, grad_norm=grad_norm, seconds=1.0, reward=reward, region=0.0)
               for i in range(2)]
    return _node_returns(monkeypatch, "run_focus_n_fix", RUNS.FixRun(lora, history, I0, I, M, None))


def _execute_fix(**kw):
    args = dict(model=_FakeModel(), vae="vae", reward="reward", prompts="a cat", negative_prompt="", seeds="0, 1",
                width=16, height=16, steps=4, cfg=5.0, K=1, lam=0.0, mask_source="none", rank=2, targets="to_k",
                lr=1e-4, iterations=2, seed=0, clip="clip")
    args.update(kw)
    return T.FocusFixTrainFocusNFix().execute(**args)


def test_focus_n_fix_outputs_before_after_and_a_full_mask_for_plain_draft(monkeypatch):
    # before = I0 (no LoRA), after = I (trained); plain DRaFT holds nothing, so its mask output is all "may change"
    run = _finished_fix_run(monkeypatch)
    lora, curve, before, after, mask, report = _execute_fix()
    assert lora is run.lora and curve.shape[-1] == 3
    assert torch.equal(before, run.I0.movedim(1, -1)) and torch.equal(after, run.I.movedim(1, -1))
    assert mask.shape == (2, 8, 8) and bool((mask == 1).all())


def test_focus_n_fix_report_names_empty_masks_and_a_reward_target_already_met(monkeypatch):
    M = torch.ones(2, 1, 8, 8)
    M[1] = 0
    _finished_fix_run(monkeypatch, M=M, grad_norm=0.0, reward=0.5)
    *_, mask, report = _execute_fix(mask_source="heatmap", lam=1.0, reward_target=0.3)
    assert torch.equal(mask, M[:, 0])
    assert "M[1] is empty (every value 0): the whole image is held fixed" in report
    assert "M[0] is full (every value 1)" in report
    assert "already at or above reward_target (0.3;" in report


def test_with_lam_0_the_report_says_the_mask_is_not_used_and_names_no_empty_mask(monkeypatch):
    """Bad-input hunt (session 27): with lam 0 and a mask, the report said "a MASK is connected: it is used
    instead of mask_source" and "M[0] is empty: the whole image is held fixed", though plain DRaFT holds nothing."""
    M = torch.zeros(2, 1, 8, 8)
    _finished_fix_run(monkeypatch, M=M)
    *_, mask, report = _execute_fix(mask_source="heatmap", lam=0.0, mask=torch.zeros(1, 16, 16))
    assert torch.equal(mask, M[:, 0])  # passed on for Compare
    assert ("lam 0: plain DRaFT, the whole image may change; M (the connected MASK) is not used in training"
            in report)
    assert "used instead of mask_source" not in report and "is empty" not in report
    *_, report = _execute_fix(mask_source="heatmap", lam=1.0, mask=torch.ones(1, 16, 16))
    assert "a MASK is connected: it is used instead of mask_source 'heatmap'" in report and "lam 0" not in report
    assert "M[0] is empty (every value 0)" in report  # the run's M (zeros here) is checked when lam > 0


@pytest.mark.parametrize("positive, negative, missing", [
    (None, None, "the prompts and the negative_prompt"),
    (None, [[torch.zeros(1, 4, 8), {}]], "the prompts and the negative_prompt"),
    ([[torch.zeros(1, 4, 8), {}]], None, "the negative_prompt"),
])
def test_without_clip_the_error_names_what_cannot_be_encoded(positive, negative, missing):
    # the artist learns which text needs the CLIP (or which CONDITIONING to connect instead)
    dm = types.SimpleNamespace(clip=None, is_adm=False)
    with pytest.raises(ValueError, match=rf"^connect the checkpoint's CLIP \(clip input\) to encode {missing}, or "
                                         rf"connect both positive and negative CONDITIONING"):
        T._text_inputs(dm, "a cat", "", positive, negative, [])


def _finished_sne_run(monkeypatch, before, after):
    history = [StepRecord(step=0, total=1, loss=0.0, grad_norm=1.0, seconds=1.0, separate=0.1, enhance=0.2,
                          preserve=0.0)]
    return _node_returns(monkeypatch, "run_separate_enhance",
                         RUNS.SeparateEnhanceRun(_lora("separate-and-enhance"), history, before, after, None))


def _execute_sne(prompts):
    return T.FocusFixTrainSeparateEnhance().execute(_FakeModel(), "clip", prompts, 1.0, 1.0, 1.0, 8, 64, 64, 2,
                                                    "to_k", 1e-4, 1, 0)


def test_separate_enhance_report_reads_each_prompts_own_words_maps(monkeypatch):
    # a prompt with fewer objects than another has all-zero maps in the unused columns: they are no word of it,
    # and must not lower its overlap
    from focusfix_core.losses import overlap_and_peaks
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 3, 8, 8, generator=g)
    A[0, 2] = 0
    _finished_sne_run(monkeypatch, A, A)
    *_, report = _execute_sne("a cat and a dog | cat, dog\na cat, a dog and a bird | cat, dog, bird")
    o, _ = overlap_and_peaks(A[:1, :2])
    assert f"maps of 'a cat and a dog': overlap {o:.4g} -> {o:.4g};" in report


def test_a_repeated_prompt_line_is_noted_by_both_train_nodes(monkeypatch):
    """Bad-input hunt (session 27): a repeated seed was noted ("each repeat trains the same image again"), a
    repeated prompt line, which is the same items again, was not."""
    A = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    _finished_sne_run(monkeypatch, A, A)
    *_, report = _execute_sne("a cat and a dog | cat, dog\na cat and a dog|cat,dog")  # one item, however spaced
    assert ("prompts repeat ['a cat and a dog | cat, dog']: each repeat trains the same prompt again (counts it "
            "more)") in report
    _finished_fix_run(monkeypatch)
    *_, report = _execute_fix(prompts="a cat\n a cat \n# a cat\na dog")
    assert "prompts repeat ['a cat']: each repeat trains the same images again" in report
    *_, report = _execute_fix(prompts="a cat\na dog")
    assert "prompts repeat" not in report


def test_separate_enhance_draws_before_and_after_maps_on_one_scale_per_prompt(monkeypatch):
    # Enhance makes a word's map stronger: after must look stronger than before, and a weak word weaker than a
    # strong one (each map scaled by its own max would draw them all the same)
    size = 128
    strong = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    before = torch.cat([strong, strong * 0.2], 1)                  # (1, 2, 8, 8): dog 5x weaker than cat
    after = before * 2
    _finished_sne_run(monkeypatch, before, after)
    lora, curve, img_before, img_after, report = _execute_sne("a cat and a dog | cat, dog")

    def tile(img, i):  # word i's tile in the IMAGE [1,H,W,3]
        return img[0, 2:2 + size, 2 + i * (size + 2):2 + i * (size + 2) + size]
    assert (tile(img_before, 0) - tile(img_before, 1)).abs().mean() > 0.05  # the weak word looks weak
    assert (img_after - img_before).abs().mean() > 0.05                     # after looks other than before
