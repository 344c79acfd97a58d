"""Training a FocusFix LoRA further: a Train node's `continue_from` takes the LoRA of an earlier run, straight from
its Train node or from a file through FocusFix Load LoRA, and starts where that run ended; I0 and the masks stay
the base MODEL's. A LoRA of another model, or one FocusFix did not save, is refused by name."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

SIZE = 64


def _hooks(net):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def _fix(comfy, checkpoint, **over):
    model, clip, vae = checkpoint
    (reward,) = comfy.run("FocusFixLoadReward", reward_name="builtin:sharpness")
    kw = dict(model=model, clip=clip, vae=vae, reward=reward, prompts="a cat", negative_prompt="", seeds="0, 1",
              width=SIZE, height=SIZE, steps=3, cfg=3.0, K=1, lam=1.0, mask_source="saliency", rank=2,
              targets="attn", lr=1e-2, iterations=2, seed=0)
    kw.update(over)
    return comfy.run("FocusFixTrainFocusNFix", **kw)


def test_focus_n_fix_continues_from_the_train_node_and_from_a_file(fresh, checkpoint, layout):
    model = checkpoint[0]
    first, _, before, after, mask, _ = _fix(fresh, checkpoint)
    (name,) = fresh.run("FocusFixSaveLoRA", lora=first, filename="fixes/first", overwrite=False)
    (loaded,) = fresh.run("FocusFixLoadLoRA", lora_name=name)
    assert (loaded.rank, loaded.alpha, loaded.targets, loaded.method) == (first.rank, first.alpha, first.targets,
                                                                          first.method)
    assert loaded.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], first.tensors[k]) for k in first.tensors)
    for source in (first, loaded):
        # a negligible step (Adam moves each weight by ~lr, the widget's least): the run starts where the first ended
        lora, _, before2, after2, mask2, report = _fix(fresh, checkpoint, continue_from=source, lr=1e-6,
                                                       iterations=1, rank=4)
        assert torch.equal(before2, before) and torch.equal(mask2, mask), "I0 and M stay the base MODEL's"
        torch.testing.assert_close(after2, after, rtol=0, atol=2e-3)
        assert (after - before).abs().max() > 1e-2, "the first run changed the images (else this proves nothing)"
        assert lora.rank == 2 and "continued LoraData(focus-n-fix" in report and "rank 4" in report, report
        assert lora.metadata["focusfix_steps_trained"] == "3"
        assert lora.metadata["focusfix_previous_config"] == first.metadata["focusfix_config"]
    more, *_ = _fix(fresh, checkpoint, continue_from=loaded, iterations=2)
    assert any(not torch.equal(more.tensors[k], first.tensors[k]) for k in first.tensors)
    assert _hooks(model.model.diffusion_model) == 0 and not model.patches
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())


def test_separate_enhance_continues(fresh, checkpoint):
    model, clip, _ = checkpoint
    kw = dict(model=model, clip=clip, prompts="a cat and a dog | cat, dog", lam_sep=1.0, lam_en=1.0, lam_preserve=1.0,
              resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k", lr=1e-2, iterations=2, seed=0)
    first, _, maps_before, maps_after, report1 = fresh.run("FocusFixTrainSeparateEnhance", **kw)
    lora, _, maps_before2, _, report = fresh.run("FocusFixTrainSeparateEnhance", **{**kw, "lr": 1e-6, "iterations": 1},
                                                 continue_from=first)

    def numbers(text: str, when: int) -> list[str]:  # the report's overlap and peaks, before (0) or after (1)
        line = next(ln for ln in text.splitlines() if ln.startswith("maps of"))
        return [pair[when] for pair in re.findall(r"([0-9.e-]+) -> ([0-9.e-]+)", line)]
    assert numbers(report, 0) == numbers(report1, 1)  # starts with the first run's LoRA (the images share no scale)
    assert numbers(report1, 0) != numbers(report1, 1)
    assert not torch.allclose(maps_before, maps_after, atol=1e-3)
    assert lora.metadata["focusfix_preservation"] == "keys" and lora.metadata["focusfix_steps_trained"] == "3"
    assert "continued" in report and _hooks(model.model.diffusion_model) == 0


def test_continuing_a_lora_the_model_already_carries_is_refused_by_name(fresh, checkpoint):
    """Audit: LoraLoader (or Apply LoRA) of a LoRA into the MODEL, and the same LoRA as continue_from, applied it
    twice: the before images were the base model's plus that LoRA, and training added it again (report region
    3.6 at step 1 where about 0 is normal). Now refused before anything loads; another LoRA upstream (a style
    LoRA, or this one at strength 0) still trains on top."""
    model, clip, _ = checkpoint
    first, *_ = _fix(fresh, checkpoint)
    (name,) = fresh.run("FocusFixSaveLoRA", lora=first, filename="fixes/twice", overwrite=False)
    (loaded,) = fresh.run("FocusFixLoadLoRA", lora_name=name)
    other, *_ = _fix(fresh, checkpoint, seed=7, lr=5e-2)
    stock = fresh.run("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=0.8)[0]
    applied = fresh.run("FocusFixApplyLoRA", model=model, lora=first, strength=1.0)[0]
    se = dict(clip=clip, prompts="a cat and a dog | cat, dog", lam_sep=1.0, lam_en=1.0, lam_preserve=1.0,
              resolution=4, width=SIZE, height=SIZE, rank=2, targets="to_k", lr=1e-2, iterations=1, seed=0)
    se_lora = fresh.run("FocusFixTrainSeparateEnhance", model=model, **se)[0]
    se_applied = fresh.run("FocusFixApplyLoRA", model=model, lora=se_lora, strength=1.0)[0]
    fresh.progress.clear()
    for m, source in ((stock, loaded), (stock, first), (applied, loaded)):
        with pytest.raises(ValueError, match=r"continue_from: the MODEL already carries this LoRA \(\d+ of its "
                                             r"layers, applied by a Load LoRA or Apply LoRA before this node\)"):
            _fix(fresh, (m, clip, checkpoint[2]), continue_from=source, iterations=1)
    with pytest.raises(ValueError, match="continue_from: the MODEL already carries this LoRA"):
        fresh.run("FocusFixTrainSeparateEnhance", model=se_applied, continue_from=se_lora, **se)
    assert not fresh.progress, "refused before any step"
    for m in (fresh.run("FocusFixApplyLoRA", model=model, lora=other, strength=1.0)[0],
              fresh.run("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=0.0)[0]):
        lora, *_, report = _fix(fresh, (m, clip, checkpoint[2]), continue_from=loaded, iterations=1)
        assert "continued" in report
    assert _hooks(model.model.diffusion_model) == 0 and not model.patches


def test_a_lora_of_another_model_is_refused_and_nothing_stays_attached(fresh):
    sd15 = fresh.run("FocusFixTestTinyCheckpoint", layout="sd15", seed=0)
    sdxl = fresh.run("FocusFixTestTinyCheckpoint", layout="sdxl", seed=0)
    lora, *_ = _fix(fresh, sd15, iterations=1)
    with pytest.raises(ValueError, match=r"the connected LoRA \(LoraData\(focus-n-fix.*does not fit this MODEL "
                                         r"\(this LoRA was trained on SD1.x, this MODEL is SDXL\)"):
        _fix(fresh, sdxl, continue_from=lora)
    assert _hooks(sdxl[0].model.diffusion_model) == 0


def test_load_lora_refuses_a_lora_focusfix_did_not_save(fresh):
    other = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, 2)}
    save_file(other, str(fresh.loras / "style.safetensors"), metadata={"ss_network_dim": "2"})
    with pytest.raises(ValueError, match="'style.safetensors' is not a LoRA FocusFix saved.*Load LoRA"):
        fresh.run("FocusFixLoadLoRA", lora_name="style.safetensors")
    with pytest.raises(Exception, match="not found|does not exist|No such"):
        fresh.run("FocusFixLoadLoRA", lora_name="../outside.safetensors")


def test_load_lora_reads_a_rewritten_file_again(fresh, checkpoint):
    """A checkpoint file is replaced during training: Load LoRA's IS_CHANGED follows the file's bytes, so ComfyUI
    reads it again instead of serving the cached LoRA; a file only touched (synced, copied back) is not read again,
    so nothing downstream retrains for it."""
    import os
    node = fresh.node("FocusFixLoadLoRA")
    first, *_ = _fix(fresh, checkpoint, iterations=1)
    (name,) = fresh.run("FocusFixSaveLoRA", lora=first, filename="fixes/ckpt", overwrite=False)
    before = node.IS_CHANGED(lora_name=name)
    assert before and node.IS_CHANGED(lora_name=name) == before
    second, *_ = _fix(fresh, checkpoint, iterations=2)
    path = fresh.loras / name
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 7))  # touched: same bytes
    assert node.IS_CHANGED(lora_name=name) == before
    fresh.run("FocusFixSaveLoRA", lora=second, filename="fixes/ckpt", overwrite=True)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime even on a coarse clock
    assert node.IS_CHANGED(lora_name=name) != before
    (loaded,) = fresh.run("FocusFixLoadLoRA", lora_name=name)
    assert all(torch.equal(loaded.tensors[k], second.tensors[k]) for k in second.tensors)
    assert node.IS_CHANGED(lora_name="missing.safetensors") == ""


def test_load_lora_reads_a_file_rewritten_with_the_same_size_and_time_again(fresh, checkpoint):
    """A coarse clock (FAT's 2 s, SMB) or a copy tool that puts the old modification time back: the same size
    and mtime, other bytes. IS_CHANGED still follows the bytes (hygiene review, 3)."""
    import os
    node = fresh.node("FocusFixLoadLoRA")
    lora, *_ = _fix(fresh, checkpoint, iterations=1)
    (name,) = fresh.run("FocusFixSaveLoRA", lora=lora, filename="fixes/same_size", overwrite=False)
    path = fresh.loras / name
    before, st = node.IS_CHANGED(lora_name=name), os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: same size
    with open(path, "r+b") as f:  # in place: same inode
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert node.IS_CHANGED(lora_name=name) != before
