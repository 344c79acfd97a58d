"""A weightless stand-in UNet for LoRA key-name tests (tests/test_lora.py, tests/test_properties3_kohya_names.py)."""
from torch import nn


def skeleton(paths: list[str], **attrs) -> nn.Module:
    """A weightless stand-in net holding a 2-channel Linear or 1x1 Conv2d at each path (never run forward): 2, the
    tests' rank-2 LoRAs, since LoRA.attach refuses a rank above a layer's size."""
    net = nn.Module()
    for path in paths:
        *parents, leaf = path.split(".")
        m = net
        for p in parents:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        linear = any(s in path for s in ("transformer_blocks", "emb_layers", "time_embed"))
        m.add_module(leaf, nn.Linear(2, 2) if linear else nn.Conv2d(2, 2, 1))
    for k, v in attrs.items():
        setattr(net, k, v)
    return net
