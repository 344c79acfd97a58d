"""TinyModel: the DiffusionModel protocol, SD-like module names, save/load, sampling (issue 4)."""
import json
from dataclasses import asdict

import pytest
import torch

from focusfix_core.attention import AttentionStore
from focusfix_core.denoisers import missing_members
from focusfix_core.tiny import TinyConfig, TinyModel
from focusfix_core.tiny.model import CrossAttention, Tokenizer


@pytest.fixture(scope="module")
def model():
    return TinyModel.random(seed=0)


def test_protocol_and_names(model):
    # not isinstance(model, DiffusionModel): on Python 3.12+ a protocol check looks attributes up statically and
    # misses an nn.Module's submodules and buffers (net, sigmas)
    assert missing_members(model, ("token_indices", "attention_capture", "checkpoint_modules")) == []
    assert missing_members(model) == []
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


# --- found by mutation testing (session 25) ---

SMALL = dict(channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=18), "image_size"),   # not divisible by 4: the UNet's two downsamplings would not line up
    (dict(max_tokens=2), "max_tokens"),    # no room for <start> and <end> around a word
    (dict(timesteps=1), "timesteps"),      # a schedule needs two steps
])
def test_config_refuses_sizes_the_model_cannot_use(kwargs, name):
    # TinyConfig refuses each documented impossible size with a ValueError naming the field
    with pytest.raises(ValueError, match=name):
        TinyConfig(**kwargs)


def test_tokenizer_check_accepts_exactly_max_tokens_minus_two_words():
    # check() refuses any prompt whose words would be cut off (T - 2 = 10 words at T = 12), and nothing shorter
    tok = Tokenizer(TinyConfig().vocab, 12)
    ten = "a red circle and a blue square and a green"
    tok.check(ten)
    eleven = ten + " triangle"
    assert tok.tokens(eleven)[-1] == "<end>" and "triangle" not in tok.tokens(eleven)  # it would be cut off
    with pytest.raises(ValueError, match="has 11 words; the tiny model reads at most 10"):
        tok.check(eleven)
    with pytest.raises(ValueError, match=r"does not know \['pink'\]"):
        tok.check("a pink circle", "--prompt")


def test_encode_prompts_refuses_a_bare_string():
    # a str is not a list of prompts (it would be read letter by letter as a batch of one-letter prompts)
    m = TinyModel.random(seed=0, config=TinyConfig(**SMALL))
    with pytest.raises(TypeError, match="list of str"):
        m.encode_prompts("a red circle")


def test_attention_levels_are_the_16_and_8_pixel_levels():
    # the documented cross-attention levels of the 32 px model: 16x16 (level 1) and 8x8 (level 2), nothing else
    assert TinyModel.random(seed=0, config=TinyConfig(**SMALL)).attention_levels() == [1, 2]


def test_checkpoint_modules_cover_every_resnet_and_attention():
    # block-wise gradient checkpointing covers the whole UNet body: every cross-attention sits inside a listed module
    m = TinyModel.random(seed=0, config=TinyConfig(**SMALL))
    mods = m.checkpoint_modules()
    covered = {id(sub) for mod in mods for sub in mod.modules()}
    attn = [a for a in m.net.modules() if isinstance(a, CrossAttention)]
    assert attn and all(id(a) in covered for a in attn)
    convs = [c for c in m.net.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3)
             and c.stride == (1, 1) and c is not m.net.conv_in and c is not m.net.conv_out]
    assert convs and all(id(c) in covered for c in convs)   # every resnet conv too


def test_sample_default_seeds_are_0_to_b_minus_1_and_a_seed_per_prompt_is_required(small_model):
    # sample(prompts) uses seeds 0..B-1; a seed list of another length is a ValueError saying so
    p = ["a red circle", "a blue square"]
    torch.testing.assert_close(small_model.sample(p, steps=2), small_model.sample(p, seeds=[0, 1], steps=2))
    with pytest.raises(ValueError, match="one seed per prompt"):
        small_model.sample(p, seeds=[0, 1, 2], steps=2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        small_model.sample(p, seeds=[0], steps=2)


def test_sample_applies_its_cfg_scale(small_model):
    # classifier-free guidance is applied: another cfg_scale gives other images
    p = ["a red circle"]
    a = small_model.sample(p, seeds=[3], steps=2, cfg_scale=1.0)
    b = small_model.sample(p, seeds=[3], steps=2, cfg_scale=6.0)
    assert (a - b).abs().max() > 1e-3


def test_save_writes_float16_by_default_and_keeps_the_name(tmp_path):
    # save() stores fp16 weights unless told otherwise (the shipped file's size), and load() restores the name
    from focusfix_core.io import load_tensor_file_with_metadata

    m = TinyModel(TinyConfig(**SMALL), name="my-tiny")
    m.save(tmp_path / "m.safetensors")
    tensors, meta = load_tensor_file_with_metadata(tmp_path / "m.safetensors")
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    m2 = TinyModel.load(tmp_path / "m.safetensors")
    assert m2.name == "my-tiny" and {p.dtype for p in m2.parameters()} == {torch.float32}


@pytest.mark.parametrize("config", ["[]", "5", "null", "true"])
def test_load_refuses_a_config_that_is_not_a_json_object_naming_the_file(tmp_path, config):
    # any JSON that is not an object is a ValueError naming the file, never a TypeError from deep inside
    from safetensors.torch import save_file

    m = TinyModel(TinyConfig(**SMALL))
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"focusfix_tiny_config": config})
    with pytest.raises(ValueError, match=r"m\.safetensors.*focusfix_tiny_config"):
        TinyModel.load(path)
    json.dumps(asdict(m.cfg))  # (the real config is JSON-serialisable)


def test_shipped_model_predicts_as_when_it_was_trained():
    """The architecture code matches the shipped weights: a fixed denoising call gives the values recorded when this
    test was written. Mismatches that still load and sample plausibly (bilinear instead of nearest upsampling, a
    dropped LayerNorm, a non-causal text encoder) move these 16x16-pooled predictions by 2e-3 to 1e-2 and break the
    exact 4-decimal agreement; the tolerance 1e-3 is far above float32 rounding. Record them again when the shipped
    weights are retrained on purpose."""
    from focusfix_core.tiny import load_default_model
    from focusfix_core.tiny.world import make_batch, WorldConfig

    m = load_default_model()
    I, caps, _ = make_batch(2, seed=5, cfg=WorldConfig(glitch_rate=0.0),
                            prompts=["a red circle", "a blue square and a yellow triangle"])
    eps = torch.randn(I.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m.denoise(m.encode(I) + eps, torch.tensor([1.0, 1.0]), m.encode_prompts(caps))
    pooled = torch.nn.functional.avg_pool2d(out, 16).flatten()
    want = torch.tensor([0.4885, 0.2615, 0.6727, 0.394, 0.0883, 0.1656, -0.1788, 0.1351, 0.1594, 0.2369, -0.1352,
                         0.1986, 0.1709, -0.2121, 0.1121, -0.0527, 0.3492, 0.035, 0.2775, 0.1461, 0.1362, 0.3905,
                         0.008, 0.0365])
    torch.testing.assert_close(pooled, want, atol=1e-3, rtol=0)
