"""Small reward files in each layout `load_reward` reads (random weights), for the damaged-file tests
(test_properties3_files.py, test_reward_model_files.py)."""
import torch

from focusfix_core.rewards.clip_vision import CLIPVisionConfig, hf_clip_shapes, hf_to_openai

TINY = CLIPVisionConfig(width=64, layers=1, heads=1, patch=8, image_size=16, proj_dim=16, mlp_width=32)
HEAD = (16, 8, 8, 4, 4)  # the aesthetic head's widths; the real head is (768, 1024, 128, 64, 16)


def rand_tensors(shapes: dict, seed: int) -> dict:
    """Random tensors of these shapes; LayerNorm weights near 1, as a trained tower's."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
            for k, s in shapes.items()}


def head_sd(seed: int = 1) -> dict:
    shapes = {}
    for i, n, o in zip((0, 2, 4, 6, 7), HEAD, HEAD[1:] + (1,)):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (o, n), (o,)
    return rand_tensors(shapes, seed)


def safety_sd(seed: int = 2) -> dict:
    """The SD safety checker's layout: its CLIP tower under vision_model.vision_model., the projection and the
    concept embeddings at the top."""
    sd = {"vision_model." + k if k.startswith("vision_model.") else k: v
          for k, v in rand_tensors(hf_clip_shapes(TINY), seed).items()}
    sd.update(concept_embeds=torch.randn(5, 16), special_care_embeds=torch.randn(2, 16),
              concept_embeds_weights=torch.rand(5), special_care_embeds_weights=torch.rand(2))
    return sd


REWARD_FILES = {
    "aesthetic+hf": lambda: {**head_sd(), **rand_tensors(hf_clip_shapes(TINY), 0)},
    "aesthetic+openai": lambda: {**head_sd(), **hf_to_openai(rand_tensors(hf_clip_shapes(TINY), 0))},
    "safety": safety_sd,
}
