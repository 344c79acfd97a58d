"""Property tests (hypothesis) for the kohya key names of SD-style UNets (`lora._kohya_name`,
`diffusers_unet_names`, `_group_kohya`): for random UNet layouts in ComfyUI's LDM layout (levels, ResBlocks per
level, which levels hold attention, transformer depth, a middle block with or without attention), built as
weightless module trees with the real path names:

- every layer gets its own key, under both namings, and no key of one naming names another layer in the other;
- a LoRA exported with kohya's diffusers names or with the LDM names (files FocusFix saved earlier, README) loads
  back into every layer (`load_kohya`, strict; `merge_kohya_into`; a saved file through `read_focusfix_lora`)."""
import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from focusfix_core.lora import LoRA, _kohya_name, diffusers_unet_names, merge_kohya_into, read_focusfix_lora
from unet_skeleton import skeleton as _skeleton

FAST = settings(max_examples=15, deadline=None)
_RES = ("in_layers.2", "emb_layers.1", "out_layers.3")  # a ResBlock's Linear/Conv2d layers
_LDM = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")


def _attention(depth: int) -> list[str]:
    """A SpatialTransformer's Linear/Conv2d layers (proj_in/out, then per block ff and attn1/attn2)."""
    out = ["proj_in", "proj_out"]
    for t in range(depth):
        out += [f"transformer_blocks.{t}.ff.net.0.proj", f"transformer_blocks.{t}.ff.net.2"]
        out += [f"transformer_blocks.{t}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v",
                                                                                           "to_out.0")]
    return out


@st.composite
def unet_layouts(draw):
    """(host paths, num_res_blocks) of an LDM-layout UNet (as ComfyUI's UNetModel builds it): per level
    `num_res_blocks[level]` input blocks [ResBlock, SpatialTransformer?] and a Downsample block (not after the last
    level); a middle block [ResBlock, SpatialTransformer, ResBlock] or [ResBlock] alone (transformer_depth_middle
    -1); per level, deepest first, `num_res_blocks + 1` output blocks, the last with an Upsample (not at level 0)."""
    res = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    attn_levels = draw(st.sets(st.integers(0, len(res) - 1)))
    depth = draw(st.integers(1, 2))
    mid_attention = draw(st.booleans())
    hosts = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"]
    i = 1
    for level, n in enumerate(res):
        for r in range(n):
            block = f"input_blocks.{i}"
            hosts += [f"{block}.0.{p}" for p in _RES]
            if r == 0 and level > 0 and draw(st.booleans()):  # the channel count changes: a skip conv
                hosts.append(f"{block}.0.skip_connection")
            if level in attn_levels:
                hosts += [f"{block}.1.{p}" for p in _attention(depth)]
            i += 1
        if level < len(res) - 1:
            hosts.append(f"input_blocks.{i}.0.op")
            i += 1
    hosts += [f"middle_block.0.{p}" for p in _RES]
    if mid_attention:
        hosts += [f"middle_block.1.{p}" for p in _attention(depth)] + [f"middle_block.2.{p}" for p in _RES]
    j = 0
    for k, n in enumerate(reversed(res)):
        level = len(res) - 1 - k
        for r in range(n + 1):
            block = f"output_blocks.{j}"
            hosts += [f"{block}.0.{p}" for p in _RES + ("skip_connection",)]
            if level in attn_levels:
                hosts += [f"{block}.1.{p}" for p in _attention(depth)]
            if r == n and level > 0:
                hosts.append(f"{block}.{2 if level in attn_levels else 1}.conv")
            j += 1
    return hosts, res


def _randomized(lora, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in lora.adapters:
            a.up.copy_(torch.randn(a.up.shape, generator=g))
            a.down.copy_(torch.randn(a.down.shape, generator=g))
    return lora


@FAST
@given(layout=unet_layouts())
def test_every_layer_gets_its_own_key_under_both_namings_and_no_key_names_two_layers(layout):
    hosts, res = layout
    net = _skeleton(hosts, num_res_blocks=list(res))
    name = diffusers_unet_names(net)
    assert name is not None
    new = [name(p) for p in hosts]
    assert len(set(new)) == len(hosts)  # one diffusers name per layer
    assert not [n for n in new if n.startswith(_LDM)]  # every layer renamed
    assert all(n.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out",
                             "time_embedding.")) for n in new)
    # the union of both namings' keys maps each key to one layer: no file key can land on another layer
    owner = {}
    for p, n in zip(hosts, new):
        for key in (_kohya_name("lora_unet", p), _kohya_name("lora_unet", n)):
            assert owner.setdefault(key, p) == p, f"{key} names {owner[key]} and {p}"
    assert diffusers_unet_names(_skeleton(hosts)) is None  # no num_res_blocks: not an SD-style UNet


@FAST
@given(layout=unet_layouts(), diffusers=st.booleans(), rank=st.integers(1, 2), alpha=st.sampled_from([0.5, 1.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_a_lora_exported_under_either_naming_loads_back_into_every_layer(layout, diffusers, rank, alpha, seed):
    hosts, res = layout
    net = _skeleton(hosts, num_res_blocks=list(res))
    lora = _randomized(LoRA.attach(net, r".", rank=rank, alpha=alpha), seed)
    sd = lora.state_dict_kohya(diffusers_names=diffusers)
    assert len(sd) == 3 * len(hosts)  # no two layers wrote the same key
    ldm_keys = any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
                   for k in sd)
    assert ldm_keys != diffusers
    again = LoRA.attach(net, r".", rank=rank, alpha=1.0)
    again.load_kohya(sd)  # strict: every key known, every layer found
    for a, b in zip(lora.adapters, again.adapters):
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and b.alpha == alpha
    lora.remove()
    again.remove()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert sorted(merge_kohya_into(net, sd)) == sorted(hosts)
    for path, a in zip(lora.module_names, lora.adapters):
        w = net.get_submodule(path).weight
        torch.testing.assert_close(w - before[f"{path}.weight"], a.weight_delta().reshape(w.shape))


@settings(max_examples=10, deadline=None)
@given(layout=unet_layouts(), diffusers=st.booleans(), seed=st.integers(0, 2**16))
def test_a_saved_file_under_either_naming_is_read_and_attached_by_read_focusfix_lora(tmp_path_factory, layout,
                                                                                    diffusers, seed):
    """A FocusFix file of an SD1.5-style UNet with LDM names (saved before FocusFix wrote kohya's diffusers names)
    or with diffusers names: read_focusfix_lora + attach continue it with the same weights."""
    hosts, res = layout
    net = _skeleton(hosts, num_res_blocks=list(res))
    lora = _randomized(LoRA.attach(net, r"attn2\.to_[kv]$|proj_in$|in_layers\.2$", rank=2, alpha=1.0), seed)
    path = tmp_path_factory.mktemp("kohya") / "fix.safetensors"
    meta = {"focusfix_targets": json.dumps([lora.targets]), "ss_network_alpha": "1", "ss_network_dim": "2"}
    save_file(lora.state_dict_kohya(diffusers_names=diffusers), str(path), metadata=meta)
    lora.remove()
    again = read_focusfix_lora(path).attach(net)
    assert again.module_names == lora.module_names
    for a, b in zip(lora.adapters, again.adapters):
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and b.alpha == 1.0
    again.remove()
