"""nodes/attention_nodes.py without ComfyUI: FocusFix Attention Maps' checks and outputs around the sampling, with the
sampling replaced by fixed maps (the node is otherwise only run by the ComfyUI integration tests, skipped without
COMFYUI_DIR; found by mutation testing)."""
import pytest
import torch
from pack_loader import load_pack

P = load_pack()
AN = P.nodes.attention_nodes
ARGS = dict(model=None, clip=None, prompt="a cat and a dog", seed=0, steps=2, cfg=5.0, resolution=4, width=64,
            height=64)


@pytest.fixture
def fixed_maps(monkeypatch):
    """prompt_attention_maps returns two 4x4 maps of peaks 2 and 0.5 (word 0 top-left, word 1 bottom-right)."""
    A = torch.zeros(1, 2, 4, 4)
    A[0, 0, 0, 0], A[0, 1, 3, 3] = 2.0, 0.5
    calls = []

    def maps(dm, prompt, names, **kw):
        calls.append(names)
        return A.clone(), torch.zeros(1, 4, 8, 8)
    monkeypatch.setattr(AN, "ComfyDiffusionModel", lambda model, clip, vae: None)
    monkeypatch.setattr(AN, "prompt_attention_maps", maps)
    monkeypatch.setattr(AN, "sampling_progress", lambda model, steps: None)
    return calls


def test_attention_maps_refuses_empty_words_before_sampling(fixed_maps):
    with pytest.raises(ValueError, match="words is empty"):
        AN.FocusFixAttentionMaps().execute(words=" , ;", **ARGS)
    assert fixed_maps == []


def test_attention_maps_scales_each_map_to_1_and_lays_the_tiles_in_one_row(fixed_maps):
    maps, overlay, overlap, text = AN.FocusFixAttentionMaps().execute(words="cat, dog", **ARGS)
    assert fixed_maps == [["cat", "dog"]]
    assert maps.shape == (2, 64, 64)
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(2))  # each word's map has max 1
    assert overlay.shape == (1, 64 + 4, 3 * (64 + 2) + 2, 3)  # image | cat | dog, one row
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith("overlap ") and lines[1].startswith("cat: peak ") \
        and lines[2].startswith("dog: peak ")


def test_attention_maps_checks_the_map_size_at_queue_time():
    assert AN.FocusFixAttentionMaps.VALIDATE_INPUTS(resolution=16, width=512, height=512) is True
    msg = AN.FocusFixAttentionMaps.VALIDATE_INPUTS(resolution=5, width=512, height=512)
    assert isinstance(msg, str) and msg
