"""Denoiser helpers: cond batching and the model's own cond preparation (pinned by session 24's mutation testing)."""
import pytest
import torch

from focusfix_core.denoisers import cond_batch_size, prepare_cond, repeat_cond


def test_repeat_cond_keeps_copies_of_a_row_adjacent():
    """[a, b] -> [a, a, b, b] (DRaFT-LV's copies of an image are adjacent), not [a, b, a, b]."""
    cond = {"context": torch.tensor([1.0, 2.0])[:, None, None], "y": torch.tensor([[3.0], [4.0]])}
    out = repeat_cond(cond, 2)
    assert out["context"].flatten().tolist() == [1.0, 1.0, 2.0, 2.0]
    assert out["y"].flatten().tolist() == [3.0, 3.0, 4.0, 4.0]


def test_cond_batch_size_refuses_two_batch_sizes():
    with pytest.raises(ValueError, match="batch size"):
        cond_batch_size({"context": torch.zeros(2, 3, 4), "y": torch.zeros(3, 5)})


def test_prepare_cond_uses_the_models_own():
    """A model's prepare_cond (SDXL's size embeddings) is called once with the latent size as ints."""
    calls = []

    class Model:
        def prepare_cond(self, cond, latent_hw):
            calls.append(latent_hw)
            return {**cond, "y": torch.ones(1, 2)}

    cond = {"context": torch.zeros(1, 3, 4)}
    out = prepare_cond(Model(), cond, torch.tensor([8, 6]))
    assert calls == [(8, 6)] and all(type(s) is int for s in calls[0])
    assert set(out) == {"context", "y"}
    assert prepare_cond(object(), cond, (8, 6)) is cond
