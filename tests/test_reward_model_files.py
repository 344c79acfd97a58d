"""Reward and tiny-model files with tensors of another rank or crafted config metadata are refused with a ValueError
naming the file, not a crash from deep inside torch (the property tests' BUG 6, 7 and 10; test_properties3_*.py)."""
import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from focusfix_core import cli
from focusfix_core.rewards import convert_reward, load_reward
from focusfix_core.tiny import TinyConfig, TinyModel
from focusfix_core.tiny.rewards import DEFAULT_REWARDS
from reward_files import REWARD_FILES



def _refused(fn, name):
    with pytest.raises(ValueError, match=name):
        fn()


@pytest.mark.parametrize("kind", sorted(REWARD_FILES))
def test_the_valid_reward_files_load_and_convert(tmp_path, kind):
    path = tmp_path / "reward.safetensors"
    save_file(REWARD_FILES[kind](), str(path))
    I = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    out = convert_reward(path, tmp_path / "out.safetensors")
    torch.testing.assert_close(load_reward(out)(I), load_reward(path)(I), rtol=0, atol=0)


@pytest.mark.parametrize("kind, key, value", [
    ("safety", "concept_embeds", torch.tensor(0.5)),                   # TypeError: len() of a 0-d tensor
    ("safety", "special_care_embeds", torch.ones(2)),
    ("aesthetic+openai", "visual.proj", torch.tensor(0.5)),            # IndexError in infer_clip_config
    ("aesthetic+openai", "visual.proj", torch.ones(2, 2, 2)),          # RuntimeError from t()
    ("aesthetic+openai", "visual.transformer.resblocks.0.attn.in_proj_bias", torch.tensor(0.5)),  # from chunk
    ("aesthetic+openai", "visual.transformer.resblocks.0.attn.in_proj_weight", torch.ones(64, 64)),  # not 3*w
    ("aesthetic+hf", "visual_projection.weight", torch.tensor(0.5)),   # IndexError in infer_clip_config
    ("aesthetic+hf", "vision_model.embeddings.position_embedding.weight", torch.tensor(0.5)),
    ("aesthetic+hf", "vision_model.encoder.layers.0.mlp.fc1.weight", torch.tensor(0.5)),
])
def test_a_reward_tensor_of_another_rank_is_refused_naming_the_file_6(tmp_path, kind, key, value):
    path = tmp_path / "reward.safetensors"
    save_file({**REWARD_FILES[kind](), key: value}, str(path))
    _refused(lambda: load_reward(path), "reward.safetensors")
    _refused(lambda: convert_reward(path, tmp_path / "out.safetensors"), "reward.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family", ["tiny_artifact", "tiny_attribute"])
@pytest.mark.parametrize("width", ["-1", "-5", "0", "abc", "1.5"])
def test_a_tiny_reward_with_a_bad_width_is_refused_naming_the_file_7(tmp_path, family, width):
    path = tmp_path / "r.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"focusfix_reward": family, "width": width})
    _refused(lambda: load_reward(path), r"r\.safetensors.*width")
    _refused(lambda: convert_reward(path, tmp_path / "out.safetensors"), r"r\.safetensors.*width")


@pytest.mark.parametrize("name", sorted(DEFAULT_REWARDS))
def test_the_shipped_tiny_rewards_load_through_load_reward(name):
    reward = load_reward(DEFAULT_REWARDS[name])
    assert reward(torch.rand(2, 3, 32, 32)).shape == (2,)


CRAFTED_CONFIGS = [
    '{"heads": 0}',                     # ZeroDivisionError
    '{"channels": [-8, 16, 32]}',       # RuntimeError: negative dimension
    '{"context_dim": -1}',              # RuntimeError: negative dimension
    '[1]',                              # AttributeError
    '{"max_tokens": 1000000000000}',    # the allocator's RuntimeError
    '{"timesteps": 1000000000000}',     # the allocator's RuntimeError (the sigmas)
    '{"heads": "4"}',                   # TypeError
    '{"heads": true}',
    '{"channels": [8, 16]}',            # ValueError: not enough values to unpack
    '{"context_dim": 6}',               # not a multiple of heads: a crash when encoding a prompt
    '{"vocab": ["a", "b"]}',            # no <start>/<end>: a KeyError when tokenizing
    '{"bogus": 1}',                     # TypeError: unexpected keyword argument
    'not json',                         # JSONDecodeError, which does not name the file
    "[" * 100000 + "]" * 100000,        # RecursionError
]


@pytest.mark.parametrize("config", CRAFTED_CONFIGS, ids=lambda c: c[:30])
def test_a_crafted_tiny_model_config_is_refused_naming_the_file_10(tmp_path, config):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"focusfix_tiny_config": config})
    _refused(lambda: TinyModel.load(path), r"m\.safetensors.*focusfix_tiny_config")


def test_a_tiny_model_with_weights_of_another_shape_is_refused_naming_the_file_10(tmp_path):
    cfg = TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    path = tmp_path / "m.safetensors"
    sd = TinyModel.random(seed=0, config=cfg).state_dict()
    sd["text_encoder.position_embedding"] = torch.zeros(13, 16)  # the config says max_tokens 12
    save_file(sd, str(path), metadata={"focusfix_tiny_config": json.dumps(asdict(cfg))})
    _refused(lambda: TinyModel.load(path), r"m\.safetensors.*position_embedding")


def test_a_loaded_tiny_model_holds_real_tensors_and_its_schedule(tmp_path):
    """Built on the meta device: every weight comes from the file, the sigmas are computed."""
    cfg = TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16, text_layers=1)
    m = TinyModel.random(seed=1, config=cfg)
    m.save(tmp_path / "m.safetensors", dtype=torch.float32)
    m2 = TinyModel.load(tmp_path / "m.safetensors")
    assert m2.cfg == cfg and not m2.training
    assert not any(t.is_meta for t in [*m2.parameters(), *m2.buffers()])
    torch.testing.assert_close(m2.sigmas, m.sigmas, rtol=0, atol=0)
    x, sigma, cond = torch.randn(1, 3, 16, 16), torch.tensor([2.0]), m.encode_prompts(["a red circle"])
    torch.testing.assert_close(m2.denoise(x, sigma, m2.encode_prompts(["a red circle"])), m.denoise(x, sigma, cond))


@pytest.mark.parametrize("config", ['{"heads": 0}', '{"channels": [-8, 16, 32]}', '{"context_dim": -1}', '[1]',
                                    '{"max_tokens": 1000000000000}'])
def test_the_cli_refuses_a_crafted_tiny_model_naming_the_file_10(tmp_path, capsys, monkeypatch, config):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main sets the process's threads: not in a test
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"focusfix_tiny_config": config})
    rc = cli.main(["train-fnf", "--model", str(tmp_path / "m.safetensors"), "--prompt", "a", "--reward", "artifact",
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "m.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["int", "nan"])
def test_a_tiny_model_file_with_integer_or_nan_weights_is_refused_naming_it(tmp_path, bad):
    """`load_state_checked` cast an integer tensor to float and took NaN weights silently."""
    src = tmp_path / "good.safetensors"
    TinyModel(TinyConfig()).save(src)
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    k = next(iter(tensors))
    tensors[k] = tensors[k].long() if bad == "int" else tensors[k].fill_(float("nan"))
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"m\.safetensors.*(must be float|NaN or inf)"):
        TinyModel.load(tmp_path / "m.safetensors")
