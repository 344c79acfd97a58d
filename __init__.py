"""FocusFix: Focus-N-Fix and Separate-and-Enhance for ComfyUI (V1 node API; see README "Why the V1 node API")."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# served under /extensions/<pack folder>/: web/docs/<node id>.md is the node's help page in ComfyUI's frontend
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
