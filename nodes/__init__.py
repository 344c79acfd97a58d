"""FocusFix ComfyUI nodes (V1 API). Each module holds thin nodes; `adapters.py` converts ComfyUI objects.

This package imports without ComfyUI: every `comfy` / `folder_paths` import is inside a function.
"""
from .adapters import register_reward_folder
from .attention_nodes import FocusFixAttentionMaps
from .lora_nodes import FocusFixApplyLoRA, FocusFixLoadLoRA, FocusFixSaveLoRA
from .reward_nodes import FocusFixCombineRewards, FocusFixCompare, FocusFixLoadReward, FocusFixSaliencyMask, \
    FocusFixScoreImages
from .train_nodes import FocusFixTrainFocusNFix, FocusFixTrainSeparateEnhance

NODE_CLASS_MAPPINGS = {
    "FocusFixLoadReward": FocusFixLoadReward,
    "FocusFixCombineRewards": FocusFixCombineRewards,
    "FocusFixScoreImages": FocusFixScoreImages,
    "FocusFixSaliencyMask": FocusFixSaliencyMask,
    "FocusFixAttentionMaps": FocusFixAttentionMaps,
    "FocusFixTrainFocusNFix": FocusFixTrainFocusNFix,
    "FocusFixTrainSeparateEnhance": FocusFixTrainSeparateEnhance,
    "FocusFixApplyLoRA": FocusFixApplyLoRA,
    "FocusFixLoadLoRA": FocusFixLoadLoRA,
    "FocusFixSaveLoRA": FocusFixSaveLoRA,
    "FocusFixCompare": FocusFixCompare,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FocusFixLoadReward": "FocusFix Load Reward",
    "FocusFixCombineRewards": "FocusFix Combine Rewards",
    "FocusFixScoreImages": "FocusFix Score Images",
    "FocusFixSaliencyMask": "FocusFix Saliency Mask",
    "FocusFixAttentionMaps": "FocusFix Attention Maps",
    "FocusFixTrainFocusNFix": "FocusFix Train Focus-N-Fix",
    "FocusFixTrainSeparateEnhance": "FocusFix Train Separate-and-Enhance",
    "FocusFixApplyLoRA": "FocusFix Apply LoRA",
    "FocusFixLoadLoRA": "FocusFix Load LoRA",
    "FocusFixSaveLoRA": "FocusFix Save LoRA",
    "FocusFixCompare": "FocusFix Compare",
}

register_reward_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
