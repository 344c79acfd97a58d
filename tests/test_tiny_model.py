"""TinyModel: the DiffusionModel protocol, SD-like module names, save/load, sampling (issue 4)."""
import pytest
import torch

from focusfix_core.attention import AttentionStore
from focusfix_core.denoisers import DiffusionModel
from focusfix_core.tiny import TinyConfig, TinyModel


@pytest.fixture(scope="module")
def model():
    return TinyModel.random(seed=0)


def test_protocol_and_names(model):
    assert isinstance(model, DiffusionModel)
    assert model.latent_channels == 3 and model.latent_scale == 1
    assert torch.all(model.sigmas[1:] > model.sigmas[:-1]) and len(model.sigmas) == 1000
    attn2 = [n for n, m in model.net.named_modules() if n.endswith("attn2")]
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in attn2
    m = model.net.get_submodule(attn2[0])
    assert all(isinstance(getattr(m, a), torch.nn.Linear) for a in ("to_q", "to_k", "to_v")) and m.heads == 4
    assert isinstance(m.to_out[0], torch.nn.Linear)


def test_tokens_and_indices(model):
    toks = model.tokens("A red circle and a blue square!")
    assert toks[:9] == ["<start>", "a", "red", "circle", "and", "a", "blue", "square", "<end>"]
    assert len(toks) == model.cfg.max_tokens and model.tokens("")[:2] == ["<start>", "<end>"]
    assert model.token_indices("a red circle and a blue square", ["circle", "square"]) == [[3], [7]]
    assert model.tokens("a pink cat")[2:4] == ["<unk>", "<unk>"]


def test_denoise_decode_shapes(model):
    cond = model.encode_prompts(["a red circle", ""])
    assert cond["context"].shape == (2, 12, 64)
    x = torch.randn(2, 3, 32, 32)
    x0 = model.denoise(x, torch.tensor([1.0, 5.0]), cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert torch.allclose(model.decode(model.encode(x0)), x0, atol=1e-6)


def test_attention_capture_16x16(model):
    idx = model.token_indices("a red circle and a blue square", ["circle", "square"])
    store = AttentionStore([idx], resolution=16, keep_grad=False)
    with model.attention_capture(store):
        model.denoise(torch.randn(1, 3, 32, 32), torch.tensor([2.0]), model.encode_prompts(["a red circle and a blue square"]))
    assert store.maps().shape == (1, 2, 16, 16) and (16, 16) in store.resolutions_seen and (8, 8) in store.resolutions_seen


def test_sample_is_seeded(model):
    a = model.sample(["a red circle", "a blue square"], seeds=[1, 2], steps=2, cfg_scale=1.0)
    b = model.sample(["a blue square"], seeds=[2], steps=2, cfg_scale=1.0)
    assert a.shape == (2, 3, 32, 32) and (a[1:] - b).abs().max() < 1e-3  # batching changes only rounding


def test_save_load_roundtrip(tmp_path):
    cfg = TinyConfig(channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    m = TinyModel.random(seed=1, config=cfg)
    m.save(tmp_path / "m.safetensors", dtype=torch.float32)
    m2 = TinyModel.load(tmp_path / "m.safetensors")
    assert m2.cfg == cfg
    for (k, v), v2 in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v, v2), k


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="focusfix_tiny_config"):
        TinyModel.load(tmp_path / "x.safetensors")


def test_bad_config():
    with pytest.raises(ValueError, match="channels"):
        TinyConfig(channels=(12, 16, 32))


def test_shipped_weights_load_and_sample():
    from focusfix_core.tiny import load_default_model
    from focusfix_core.tiny.model import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS.stat().st_size < 20e6
    m = load_default_model()
    I = m.sample(["a red circle", "a blue square and a yellow triangle"], seeds=[0, 1], steps=4)
    assert I.shape == (2, 3, 32, 32) and 0 <= I.min() and I.max() <= 1 and I.std() > 0.05


def test_shipped_model_draws_the_prompted_objects():
    """The shipped model, sampled as the trainers sample it, draws what the prompt asks for, judged by the tiny
    world's exact evaluator. A wrong denoiser scaling or noise (e.g. EpsDenoiser's c_in = 1/(sigma^2 + 1), the
    review's S9) still gives images with std > 0.05, but not the prompted colour: 1 of 12 found, 12 glitched.

    Measured when written (10 steps, CFG 3, seeds 0-11): the prompted colour found in 12 of 12 images, colour and
    shape right in 4 of 12 (the model card's single-object alignment is 48 %), 0 glitches. Other seeds
    (100-111, 7000-7011) gave 12/12, 5/12, 0-1 glitches; the thresholds below leave that margin."""
    from focusfix_core.tiny import load_default_model
    from focusfix_core.tiny.evaluate import evaluate
    from focusfix_core.tiny.world import all_prompts

    m = load_default_model()
    prompts = all_prompts(1)  # every colour x shape, 12 prompts
    assert len(prompts) == 12
    with torch.no_grad():
        I = m.sample(prompts, seeds=list(range(12)), steps=10, cfg_scale=3.0)
    recs = evaluate(I, prompts)
    colour_found = sum(r["both_present"] for r in recs)
    aligned = sum(r["alignment"] for r in recs)
    glitches = sum(r["glitch"] for r in recs)
    assert colour_found >= 10, (colour_found, aligned, glitches)
    assert aligned >= 2, (colour_found, aligned, glitches)
    assert glitches <= 3, (colour_found, aligned, glitches)
