"""Small reward files in each layout `load_reward` reads (random weights): for the damaged-file tests
(test_properties3_files.py, test_reward_model_files.py) and, at other widths, the reward-family integration
tests (integration/test_reward_families_comfy.py)."""
import torch

from focusfix_core.rewards.clip_vision import CLIPVisionConfig, hf_clip_shapes, hf_to_openai

TINY = CLIPVisionConfig(width=64, layers=1, heads=1, patch=8, image_size=16, proj_dim=16, mlp_width=32)
HEAD = (16, 8, 8, 4, 4)  # the aesthetic head's widths; the real head is (768, 1024, 128, 64, 16)


def rand_tensors(shapes: dict, seed: int) -> dict:
    """Random tensors of these shapes; LayerNorm weights near 1, as a trained tower's."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
            for k, s in shapes.items()}


def tower_sd(cfg: CLIPVisionConfig = TINY, seed: int = 0) -> dict:
    """A CLIP vision tower in Hugging Face's layout (as ComfyUI's clip_vision files)."""
    return rand_tensors(hf_clip_shapes(cfg), seed)


def head_sd(seed: int = 1, widths: tuple = HEAD) -> dict:
    """The LAION aesthetic head (an MLP under layers.0 ... layers.7) of these widths."""
    shapes = {}
    for i, n, o in zip((0, 2, 4, 6, 7), widths, widths[1:] + (1,)):
        shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"] = (o, n), (o,)
    return rand_tensors(shapes, seed)


def safety_sd(seed: int = 2, cfg: CLIPVisionConfig = TINY, concepts: tuple[int, int] = (5, 2)) -> dict:
    """The SD safety checker's layout: its CLIP tower under vision_model.vision_model., the projection and the
    concept embeddings (`concepts`: how many concepts and special-care concepts) at the top."""
    g = torch.Generator().manual_seed(seed)
    sd = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tower_sd(cfg, seed).items()}
    n, m = concepts
    sd.update(concept_embeds=torch.randn(n, cfg.proj_dim, generator=g),
              special_care_embeds=torch.randn(m, cfg.proj_dim, generator=g),
              concept_embeds_weights=torch.rand(n, generator=g) * 0.2 + 0.1,
              special_care_embeds_weights=torch.rand(m, generator=g) * 0.2 + 0.1)
    return sd


REWARD_FILES = {
    "aesthetic+hf": lambda: {**head_sd(), **tower_sd()},
    "aesthetic+openai": lambda: {**head_sd(), **hf_to_openai(tower_sd())},
    "safety": safety_sd,
}
