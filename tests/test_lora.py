import json
import os

import pytest
import torch
from torch import nn

from focusfix_core.lora import (
    TARGET_PRESETS,
    LoRA,
    LoRAAdapter,
    load_lora_file,
    lora_delta,
    lora_metadata,
    lora_weight_delta,
    merge_kohya_into,
    resolve_targets,
    save_lora,
)
from unet_skeleton import skeleton as _skeleton
from safetensors.torch import save_file
from focusfix_core.lora import continued_metadata, steps_trained



class SubLinear(nn.Linear):
    """Like comfy.ops.disable_weight_init.Linear: a subclass with its own forward(*args, **kwargs)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class Attention(nn.Module):
    def __init__(self, d, ctx, linear=nn.Linear):
        super().__init__()
        self.to_q = linear(d, d, bias=False)
        self.to_k, self.to_v = linear(ctx, d, bias=False), linear(ctx, d, bias=False)
        self.to_out = nn.Sequential(linear(d, d), nn.Dropout(0.0))

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # [B,N,d], [B,T,d], [B,T,d]
        A = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)  # [B,N,T]
        return self.to_out(A @ v)


class Block(nn.Module):
    def __init__(self, d, ctx, linear=nn.Linear):
        super().__init__()
        self.attn1, self.attn2, self.ff = Attention(d, d, linear), Attention(d, ctx, linear), linear(d, d)

    def forward(self, x, context):
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class TinyNet(nn.Module):
    """conv_in -> one transformer block on the HW tokens -> conv_out. x: [B,C,H,W], context: [B,T,ctx]."""

    def __init__(self, C=3, d=8, ctx=6, linear=nn.Linear):
        super().__init__()
        self.conv_in = nn.Conv2d(C, d, 3, padding=1)
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Identity(), Block(d, ctx, linear)])])
        self.conv_out = nn.Conv2d(d, C, 3, padding=1, stride=1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.conv_in(x)  # [B,d,H,W]
        t = h.flatten(2).transpose(1, 2)  # [B,HW,d]
        t = self.input_blocks[0][1](t, context)
        return self.conv_out(t.transpose(1, 2).reshape(B, -1, H, W))


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=g).to(dtype), torch.randn(2, 5, 6, generator=g).to(dtype)


def _net(dtype=torch.float32, linear=nn.Linear):
    torch.manual_seed(0)
    return TinyNet(linear=linear).to(dtype)


def _randomize(lora, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


ALL = ["conv_in", "input_blocks.0.1.attn1.to_q", "input_blocks.0.1.attn2.to_k", "input_blocks.0.1.attn2.to_out.0",
       "conv_out"]  # Linear and Conv2d hosts


class TestResolveTargets:
    def test_presets(self):
        net = _net()
        assert resolve_targets(net, "to_k") == ["input_blocks.0.1.attn2.to_k"]
        attn = resolve_targets(net, "attn")
        assert len(attn) == 8 and all(".attn1." in n or ".attn2." in n for n in attn)
        assert "input_blocks.0.1.attn2.to_out.0" in attn
        assert resolve_targets(net, "all_linear") == attn[:4] + attn[4:] + ["input_blocks.0.1.ff"]
        assert set(TARGET_PRESETS) == {"to_k", "attn", "all_linear"}

    def test_regex_and_conv(self):
        net = _net()
        assert resolve_targets(net, [r"conv_", "to_k$"]) == ["conv_in", "input_blocks.0.1.attn1.to_k",
                                                             "input_blocks.0.1.attn2.to_k", "conv_out"]

    def test_subclasses_qualify(self):
        assert resolve_targets(_net(linear=SubLinear), "to_k") == ["input_blocks.0.1.attn2.to_k"]

    def test_no_match(self):
        with pytest.raises(ValueError, match=r"'attn3'.*example module names.*conv_in"):
            resolve_targets(_net(), "attn3")

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="regex"):
            resolve_targets(_net(), "to_k(")
        with pytest.raises(ValueError, match="empty"):
            resolve_targets(_net(), [])
        with pytest.raises(TypeError, match="targets"):
            resolve_targets(_net(), 3)
        with pytest.raises(TypeError, match="net"):
            resolve_targets("net", "to_k")


class TestAdapter:
    def test_init_and_repr(self):
        a = LoRAAdapter(8, 4, rank=2, alpha=1.0)
        assert a.down.shape == (2, 8) and a.up.shape == (4, 2)
        assert a.down.dtype == a.up.dtype == torch.float32
        assert torch.count_nonzero(a.up) == 0 and torch.count_nonzero(a.down) > 0
        assert "rank=2" in repr(a) and "alpha=1" in repr(a)
        assert a.scale == 0.5

    def test_generator_reproducible(self):
        a = LoRAAdapter(8, 4, 2, 1.0, generator=torch.Generator().manual_seed(3))
        b = LoRAAdapter(8, 4, 2, 1.0, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.down, b.down)

    def test_conv_shapes(self):
        host = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
        a = LoRAAdapter.for_module(host, rank=2, alpha=2)
        assert a.down.shape == (2, 3, 3, 3) and a.up.shape == (5, 2, 1, 1)
        x = torch.randn(1, 3, 7, 7)
        assert a.delta(x).shape == host(x).shape == (1, 5, 4, 4)

    def test_grouped_conv_refused(self):
        with pytest.raises(ValueError, match="groups"):
            LoRAAdapter.for_module(nn.Conv2d(4, 4, 3, groups=2), 2, 2)

    def test_delta_is_low_rank_product(self):
        down, up, x = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 5)
        expected = 0.5 * x.double() @ (up @ down).t()
        assert torch.allclose(lora_delta(x, down.float(), up.float(), 0.5).double(), expected, atol=1e-5)
        assert torch.allclose(lora_weight_delta(down, up, alpha=1.5), 0.5 * up @ down)
        assert torch.allclose(lora_weight_delta(down, up), up @ down)  # no alpha: scale 1

    def test_weight_delta_shape_error(self):
        with pytest.raises(ValueError, match="down/up"):
            lora_weight_delta(torch.randn(3, 5), torch.randn(4, 2))

    def test_gradcheck(self):
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
        down = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        up = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
        # lora_delta works in fp32; check the weight form, which shares the math, in float64
        f = lambda d, u: torch.nn.functional.conv2d(x, lora_weight_delta(d, u, 1.0).double(), padding=1)  # noqa: E731
        assert torch.autograd.gradcheck(f, (down, up), fast_mode=True)
        x = torch.randn(2, 5, dtype=torch.float64)
        down = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        up = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda d, u: lora_delta(x, d, u, 0.5), (down, up), fast_mode=True)


class TestAttach:
    @pytest.mark.parametrize("targets", ["to_k", "attn", "all_linear", [r"conv_", "attn2"]])
    def test_identical_at_init(self, targets):
        net = _net()
        x, c = _inputs()
        base = net(x, c)
        lora = LoRA.attach(net, targets, rank=2)
        assert torch.equal(net(x, c), base)
        assert lora.num_parameters() > 0

    def test_changes_output_and_restores(self):
        net = _net()
        x, c = _inputs()
        base = net(x, c)
        lora = LoRA.attach(net, ALL, rank=2, alpha=1)
        _randomize(lora)
        assert not torch.allclose(net(x, c), base)
        lora.remove()
        assert torch.equal(net(x, c), base)

    def test_disabled_after_training_is_bit_exact(self):
        net = _net()
        net.requires_grad_(False)
        x, c = _inputs()
        base = net(x, c)
        lora = LoRA.attach(net, "attn", rank=2)
        for _ in range(3):  # plain SGD
            lora.zero_grad()
            net(x, c).square().mean().backward()
            with torch.no_grad():
                for p in lora.parameters():
                    p -= 0.1 * p.grad
        assert not torch.allclose(net(x, c), base)
        with lora.disabled():
            assert torch.equal(net(x, c), base)
        assert lora.enabled
        with pytest.raises(KeyError):
            with lora.disabled():
                raise KeyError("x")
        assert lora.enabled
        lora.enabled = False
        with lora.disabled():
            pass
        assert not lora.enabled

    def test_strength(self):
        net = _net()
        x, c = _inputs()
        base = net(x, c)
        lora = LoRA.attach(net, "to_k", rank=2)
        _randomize(lora)
        lora.strength = 0.0
        assert torch.allclose(net(x, c), base)

    def test_parameters_are_adapters_only(self):
        net = _net()
        lora = LoRA.attach(net, "to_k", rank=3)
        params = list(lora.parameters())
        assert len(params) == 2
        assert lora.num_parameters() == 3 * 6 + 8 * 3
        assert not any(p is q for p in params for q in net.parameters())
        assert all(p.requires_grad for p in net.parameters())  # host requires_grad untouched

    def test_subclass_keeps_class(self):
        net = _net(linear=SubLinear)
        x, c = _inputs()
        lora = LoRA.attach(net, "attn", rank=2)
        assert type(net.input_blocks[0][1].attn2.to_k) is SubLinear
        _randomize(lora)
        with lora.disabled():
            base = net(x, c)
        assert not torch.allclose(net(x, c), base)  # the hook runs on the subclass too

    def test_keyword_call(self):
        host = SubLinear(4, 3)
        lora = LoRA.attach(nn.Sequential(host), "all_linear", rank=2)
        _randomize(lora)
        x = torch.randn(2, 4)
        assert torch.allclose(host(input=x), host(x))
        with lora.disabled():
            base = host(input=x)
        assert torch.equal(base, nn.functional.linear(x, host.weight, host.bias))
        assert not torch.allclose(host(input=x), base)  # the hook saw the keyword input

    @pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(padding="same")])
    def test_conv_merge_equals_hooked(self, kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, **kw))
        x = torch.randn(1, 3, 7, 7)
        lora = LoRA.attach(net, "0", rank=2, alpha=3)
        _randomize(lora)
        hooked = net(x)
        lora.merge()
        assert torch.allclose(net(x), hooked, atol=1e-5)

    def test_a_merged_lora_cannot_be_disabled(self):
        # after merge() the delta is in the weights: disabled() would silently keep the LoRA's output
        lora = LoRA.attach(_net(), "to_k", rank=2)
        _randomize(lora)
        lora.merge()
        with pytest.raises(RuntimeError, match="merged into the weights"):
            with lora.disabled():
                pass

    def test_attributes(self):
        lora = LoRA.attach(_net(), "to_k", rank=4)
        assert lora.module_names == ["input_blocks.0.1.attn2.to_k"]
        assert (lora.rank, lora.alpha, lora.targets) == (4, 4.0, "to_k")
        assert "rank=4" in repr(lora)

    @pytest.mark.parametrize("rank, alpha", [(0, None), (-1, None), (2, 0.0), (2, -1.0)])
    def test_rank_alpha_errors(self, rank, alpha):
        with pytest.raises(ValueError, match="rank|alpha"):
            LoRA.attach(_net(), "to_k", rank=rank, alpha=alpha)

    @pytest.mark.parametrize("targets, rank, message", [
        ("to_k", 7, r"at most 6, the smaller size of the targeted layer 'input_blocks\.0\.1\.attn2\.to_k' "
                    r"\(Linear 6 -> 8\), got 7"),
        ("conv_in", 9, r"at most 8, .* layer 'conv_in' \(Conv2d 3x3x3 -> 8\), got 9"),  # down: [r, 3*3*3]
        (ALL, 4, r"at most 3, .* layer 'conv_out' \(Conv2d 8x3x3 -> 3\), got 4"),  # the smallest is named
    ])
    def test_a_rank_above_a_layers_size_is_refused_by_name(self, targets, rank, message):
        net = _net()
        with pytest.raises(ValueError, match=f"rank must be {message}: a larger rank is no low-rank adapter"):
            LoRA.attach(net, targets, rank=rank)
        assert not any(m._forward_hooks for m in net.modules())
        LoRA.attach(net, targets, rank=rank - 1).remove()  # full rank: the most the layer can use

    def test_a_file_whose_rank_is_above_a_layers_size_is_read_exactly(self):
        """The rank check guards the choice of a new rank: a LoRA file of rank 7 on a 6-wide layer (another
        tool's, or an earlier FocusFix's) applies exactly, as the stock Load LoRA applies it, so from_kohya reads
        it (to continue training it, or to compare)."""
        net = _net()
        g = torch.Generator().manual_seed(0)
        key = "lora_unet_input_blocks_0_1_attn2_to_k"
        tensors = {f"{key}.lora_down.weight": torch.randn(7, 6, generator=g),
                   f"{key}.lora_up.weight": torch.randn(8, 7, generator=g), f"{key}.alpha": torch.tensor(3.5)}
        lora = LoRA.from_kohya(net, tensors, "to_k", rank=7, alpha=3.5)
        (a,) = lora.adapters
        assert torch.equal(a.down, tensors[f"{key}.lora_down.weight"])
        assert torch.equal(a.up, tensors[f"{key}.lora_up.weight"])
        lora.remove()
        with pytest.raises(ValueError, match="rank must be at most 6"):
            LoRA.attach(net, "to_k", rank=7)  # a new adapter at that rank is still refused

    def test_unknown_target(self):
        with pytest.raises(ValueError, match="nothing_here"):
            LoRA.attach(_net(), "nothing_here")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_host(self, dtype):
        net = _net(dtype)
        net.requires_grad_(False)
        x, c = _inputs(dtype)
        try:
            base = net(x, c)
        except RuntimeError as e:  # some CPU builds lack fp16 kernels
            pytest.skip(f"{dtype} not supported on CPU: {e}")
        lora = LoRA.attach(net, ALL, rank=2)
        assert all(p.dtype == torch.float32 for p in lora.parameters())
        out = net(x, c)
        assert out.dtype == dtype and torch.equal(out, base)
        net(x, c).float().square().mean().backward()
        grads = [p.grad for p in lora.parameters()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)

    def test_no_grad(self):
        net = _net()
        x, c = _inputs()
        lora = LoRA.attach(net, "attn", rank=2)
        _randomize(lora)
        with torch.no_grad():
            out = net(x, c)
        assert not out.requires_grad
        assert torch.allclose(out, net(x, c))


class TestKohya:
    def test_key_names(self):
        net = nn.Module()  # the SD1.5 path input_blocks.1.1.transformer_blocks.0.attn2.to_k
        blocks = nn.ModuleList([nn.Identity(), nn.ModuleList([nn.Identity(), nn.Module()])])
        blocks[1][1].transformer_blocks = nn.ModuleList([Block(8, 6)])
        net.input_blocks = blocks
        lora = LoRA.attach(net, "to_k", rank=2, alpha=1)
        assert lora.module_names == ["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
        sd = lora.state_dict_kohya()
        key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
        assert set(sd) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"}
        assert sd[f"{key}.lora_down.weight"].shape == (2, 6)
        assert sd[f"{key}.lora_up.weight"].shape == (8, 2)
        assert sd[f"{key}.alpha"].ndim == 0 and sd[f"{key}.alpha"].item() == 1.0

    def test_conv_key_shapes(self):
        sd = LoRA.attach(_net(), "conv_in", rank=2).state_dict_kohya(prefix="p")
        assert sd["p_conv_in.lora_down.weight"].shape == (2, 3, 3, 3)
        assert sd["p_conv_in.lora_up.weight"].shape == (8, 2, 1, 1)

    def test_round_trip_exact(self):
        net = _net()
        x, c = _inputs()
        a = LoRA.attach(net, ALL, rank=2, alpha=1.5)
        _randomize(a)
        out = net(x, c)
        sd = a.state_dict_kohya()
        a.remove()
        b = LoRA.attach(net, ALL, rank=2, alpha=7)
        b.load_kohya(sd)
        assert torch.equal(net(x, c), out)
        assert all(torch.equal(sd[k], v) for k, v in b.state_dict_kohya().items())

    def test_load_errors(self):
        a = LoRA.attach(_net(), "attn", rank=2)
        sd = a.state_dict_kohya()
        with pytest.raises(ValueError, match="lora_unet_bogus"):
            a.load_kohya({**sd, "lora_unet_bogus.alpha": torch.tensor(1.0)})
        part = {k: v for k, v in sd.items() if "attn1_to_q" not in k}
        with pytest.raises(ValueError, match="attn1_to_q"):
            a.load_kohya(part)
        a.load_kohya(part, strict=False)
        wrong = dict(sd)
        k = "lora_unet_input_blocks_0_1_attn2_to_k.lora_down.weight"
        wrong[k] = torch.zeros(3, 6)
        with pytest.raises(ValueError, match=r"attn2.to_k.*\(2, 6\).*\(3, 6\)"):
            a.load_kohya(wrong, strict=False)
        with pytest.raises(ValueError, match="lora_unet_"):
            a.load_kohya(sd, prefix="lora_te")

    def test_from_kohya_continues_a_saved_lora(self):
        """from_kohya hooks the saved adapters back on, trainable; a mismatch leaves nothing attached."""
        net = _net()
        x, c = _inputs()
        a = LoRA.attach(net, "attn", rank=2, alpha=1.5)
        _randomize(a)
        out, sd = net(x, c), a.state_dict_kohya()
        a.remove()
        b = LoRA.from_kohya(net, sd, "attn", rank=2, alpha=1.5)
        assert torch.equal(net(x, c), out) and b.module_names == a.module_names
        assert all(p.requires_grad and p.device.type == "cpu" for p in b.parameters())
        b.remove()
        hooks = sum(len(m._forward_hooks) for m in net.modules())
        for targets, rank, match in (("to_k", 2, "keys this LoRA does not know"), ("attn", 3, "shape mismatches")):
            with pytest.raises(ValueError, match=match):
                LoRA.from_kohya(net, sd, targets, rank=rank)
            assert sum(len(m._forward_hooks) for m in net.modules()) == hooks == 0

    def test_missing_alpha_means_rank(self):
        a = LoRA.attach(_net(), "to_k", rank=2, alpha=1)
        sd = {k: v for k, v in a.state_dict_kohya().items() if not k.endswith("alpha")}
        a.load_kohya(sd)
        assert a.adapters[0].alpha == 2.0


class TestMerge:
    def test_merge_equals_hooked(self):
        net = _net()
        x, c = _inputs()
        lora = LoRA.attach(net, ALL, rank=2, alpha=1)
        _randomize(lora)
        lora.strength = 0.7
        hooked = net(x, c)
        lora.merge(strength=0.7)
        assert not lora.enabled
        assert torch.allclose(net(x, c), hooked, atol=1e-5)
        with pytest.raises(RuntimeError, match="merged already"):
            lora.merge()

    def test_merge_kohya_into_plain_net(self):
        net = _net()
        x, c = _inputs()
        lora = LoRA.attach(net, ALL + ["ff"], rank=3, alpha=2)
        _randomize(lora)
        hooked = net(x, c)
        sd = lora.state_dict_kohya(dtype=torch.float16)  # files are often fp16
        plain = _net()
        base = plain(x, c)
        merged = merge_kohya_into(plain, sd)
        assert merged == lora.module_names
        assert torch.allclose(plain(x, c), hooked, atol=1e-2)
        assert not torch.allclose(plain(x, c), base, atol=1e-2)

    def test_merge_bf16_host(self):
        net = _net(torch.bfloat16)
        lora = LoRA.attach(net, "to_k", rank=2)
        _randomize(lora)
        w0 = net.input_blocks[0][1].attn2.to_k.weight.clone()
        lora.merge()
        w = net.input_blocks[0][1].attn2.to_k.weight
        assert w.dtype == torch.bfloat16
        assert torch.allclose(w.float(), w0.float() + lora.adapters[0].weight_delta(), atol=2e-2)

    def test_merge_kohya_into_errors_leave_net(self):
        net = _net()
        sd = LoRA.attach(_net(), "attn", rank=2).state_dict_kohya()
        w0 = [p.clone() for p in net.parameters()]
        with pytest.raises(ValueError, match="lora_unet_bogus"):
            merge_kohya_into(net, {**sd, "lora_unet_bogus.lora_up.weight": torch.zeros(1, 1)})
        bad = {**sd, "lora_unet_conv_out.lora_down.weight": torch.zeros(2, 8, 3, 3),
               "lora_unet_conv_out.lora_up.weight": torch.zeros(4, 2, 1, 1)}
        with pytest.raises(ValueError, match="conv_out"):
            merge_kohya_into(net, bad)
        assert all(torch.equal(a, b) for a, b in zip(w0, net.parameters()))


class TestSaveLoad:
    def test_save_load_metadata(self, tmp_path):
        net = _net()
        x, c = _inputs()
        lora = LoRA.attach(net, "attn", rank=2, alpha=1)
        _randomize(lora)
        out = net(x, c)
        meta = {"method": "focus-n-fix", "lam": 0.5, "K": 1, "rewards": ["hps"]}
        p = save_lora(tmp_path / "fix.safetensors", lora, meta)
        tensors, meta = load_lora_file(p)
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
        assert json.loads(meta["focusfix_targets"]) == ["attn"] and "focusfix_version" in meta
        assert meta["method"] == "focus-n-fix" and json.loads(meta["lam"]) == 0.5
        assert json.loads(meta["rewards"]) == ["hps"]
        lora.remove()
        LoRA.attach(net, "attn", rank=2).load_kohya(tensors)
        assert torch.equal(net(x, c), out)

    def test_refuses_overwrite(self, tmp_path):
        lora = LoRA.attach(_net(), "to_k", rank=2)
        p = save_lora(tmp_path / "fix.safetensors", lora)
        before = p.read_bytes()
        _randomize(lora)
        with pytest.raises(FileExistsError, match="fix.safetensors"):
            save_lora(p, lora)
        assert p.read_bytes() == before
        save_lora(p, lora, overwrite=True)
        assert p.read_bytes() != before

    def test_metadata_ours_win(self):
        lora = LoRA.attach(_net(), "to_k", rank=2)
        meta = lora_metadata(lora, {"ss_network_dim": "99", "steps": 5, "note": "x"})
        assert meta["ss_network_dim"] == "2" and meta["steps"] == "5" and meta["note"] == "x"
        assert all(isinstance(v, str) for v in meta.values())

    def test_metadata_type_error(self, tmp_path):
        with pytest.raises(TypeError, match="metadata"):
            save_lora(tmp_path / "x.safetensors", LoRA.attach(_net(), "to_k"), {1: "a"})


class CastLinear(nn.Linear):
    """Like comfy.ops.manual_cast.Linear: weights stored in a narrow dtype (fp8), cast to x's dtype per call."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _trained_lora(net, targets=(r"to_q$", r"to_k$")):
    lora = LoRA.attach(net, targets, rank=2, alpha=2.0)
    with torch.no_grad():
        for a in lora.adapters:  # a trained LoRA: up is nonzero (a fresh one's delta is exactly 0)
            a.up.normal_(generator=torch.Generator().manual_seed(1)).mul_(0.1)
    return lora


@pytest.mark.parametrize("offload", [False, True])
def test_merged_when_no_grad_equals_hooks_and_restores_exactly(offload):
    """Merged graph-free calls equal the hooks; restore is bit-exact, also from offloaded (CPU) originals,
    and a second trajectory merges again from the restored weights."""
    from focusfix_core.lora import MergedWhenNoGrad
    torch.manual_seed(0)
    net = Attention(8, 6)
    lora = _trained_lora(net)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        hooked = net(x, ctx)
        merged = MergedWhenNoGrad(lambda x, s, c: net(x, c), lora, offload=offload)
        assert merged.offload == offload and len(merged.originals) == 2
        got = merged(x, None, ctx)
        assert merged.merged and not lora.enabled  # the hooks are idle, the weights carry the delta
        assert not torch.equal(net.to_q.weight, before["to_q.weight"])
    torch.testing.assert_close(got, hooked, rtol=1e-5, atol=1e-6)
    merged.restore()
    assert lora.enabled and all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    with torch.no_grad():
        again = merged(x, None, ctx)
    merged.restore()
    assert torch.equal(again, got) and all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_a_merge_that_fails_part_way_is_restored_whole(monkeypatch):
    """Out of memory in the second layer's delta: restore() (the trainer's `finally`) puts every original back,
    the first layer's too; the LoRA's delta was left baked into the (shared) weights before."""
    from focusfix_core.lora import MergedWhenNoGrad
    torch.manual_seed(0)
    net = Attention(8, 6)
    lora = _trained_lora(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    merged = MergedWhenNoGrad(lambda x, s, c: net(x, c), lora)
    real = type(lora.adapters[1]).weight_delta

    def delta(self, *a, **k):
        if self is lora.adapters[1]:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return real(self, *a, **k)
    monkeypatch.setattr(type(lora.adapters[1]), "weight_delta", delta)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        merged(torch.randn(2, 5, 8), None, torch.randn(2, 3, 6))
    merged.restore()
    assert lora.enabled and all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_release_restores_drops_the_copy_and_later_calls_use_the_hooks():
    from focusfix_core.lora import MergedWhenNoGrad, release_pinned_memory
    torch.manual_seed(0)
    net = Attention(8, 6)
    lora = _trained_lora(net)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    merged = MergedWhenNoGrad(lambda x, s, c: net(x, c), lora)
    with torch.no_grad():
        hooked = net(x, ctx)
        merged(x, None, ctx)
        merged.release()
        assert merged.originals == [] and not merged.merged and lora.enabled
        assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
        assert torch.equal(merged(x, None, ctx), hooked) and not merged.merged
    release_pinned_memory()  # no CUDA here: a no-op, not an error


def test_merged_when_no_grad_keeps_hooks_on_fp8_weights():
    """fp8 storage would round the delta away (3 mantissa bits): the graph-free calls keep the hooks."""
    from focusfix_core.lora import MergedWhenNoGrad
    torch.manual_seed(0)
    net = Attention(8, 6, linear=CastLinear)
    with torch.no_grad():
        for lin in (net.to_q, net.to_k, net.to_v):
            lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    lora = _trained_lora(net)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    w8 = net.to_q.weight.detach().clone()
    with torch.no_grad():
        hooked = net(x, ctx)
        with lora.disabled():
            base = net(x, ctx)
        merged = MergedWhenNoGrad(lambda x, s, c: net(x, c), lora)
        got = merged(x, None, ctx)
    assert not merged.mergeable and not merged.merged and lora.enabled
    assert torch.equal(got, hooked) and not torch.allclose(got, base)  # the LoRA acts in graph-free calls
    assert torch.equal(net.to_q.weight.view(torch.uint8), w8.view(torch.uint8))


def test_merge_into_fp8_weights_sums_in_fp32():
    """Baking a LoRA into fp8-stored weights (torch cannot promote float8) sums in fp32, stores fp8."""
    torch.manual_seed(0)
    net = Attention(8, 6, linear=CastLinear)
    net.to_q.weight.data = net.to_q.weight.data.to(torch.float8_e4m3fn)
    w = net.to_q.weight.detach().float().clone()
    lora = _trained_lora(net, targets=(r"to_q$",))
    delta = lora.adapters[0].weight_delta(1.0)
    lora.merge()
    assert net.to_q.weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(net.to_q.weight.float(), (w + delta).to(torch.float8_e4m3fn).float())


def test_base_model_metadata_files_the_lora_under_its_base():
    """kohya's and the SAI model spec's base-model keys, as A1111/Forge read them: ss_base_model_version starting
    "sdxl_" -> SDXL, ss_v2 "True" -> SD2, else SD1; nothing for a model of no known family."""
    from focusfix_core.lora import BASE_FAMILIES, base_model_metadata
    got = {f: base_model_metadata(f, width=1024, height=768) for f in BASE_FAMILIES}
    assert got["sdxl"]["ss_base_model_version"].startswith("sdxl_") and got["sdxl"]["ss_v2"] == "False"
    assert got["sdxl_refiner"]["ss_base_model_version"].startswith("sdxl_")
    assert got["sd2"]["ss_v2"] == "True" and not got["sd2"]["ss_base_model_version"].startswith("sdxl_")
    assert got["sd1"]["ss_base_model_version"] == "sd_v1" and got["sd1"]["ss_v2"] == "False"
    assert got["sd1"]["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert {m["modelspec.resolution"] for m in got.values()} == {"1024x768"}
    v = base_model_metadata("sd2", v_prediction=True)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["modelspec.prediction_type"] == "v"
    assert base_model_metadata(None) == {} and base_model_metadata("tiny") == {}
    assert all(isinstance(x, str) for m in got.values() for x in m.values())  # safetensors metadata is str -> str


def test_a_lora_that_does_not_fit_names_both_families_when_its_metadata_says():
    """Bad-input hunt (session 27): a LoRA of another family was refused with "(trained on another model type?)",
    though its metadata names the family it was trained on: the message names both."""
    from focusfix_core.lora import BASE_FAMILIES, base_model_metadata, family_mismatch, metadata_family
    assert {f: metadata_family(base_model_metadata(f)) for f in BASE_FAMILIES} == {f: f for f in BASE_FAMILIES}
    assert metadata_family({}) is None and metadata_family({"ss_base_model_version": "flux"}) is None
    assert (family_mismatch(base_model_metadata("sd1"), "sdxl_refiner")
            == "this LoRA was trained on SD1.x, this MODEL is the SDXL refiner")
    assert family_mismatch(base_model_metadata("sd2"), "sd1") == "this LoRA was trained on SD2.x, this MODEL is SD1.x"
    for metadata, family in ((base_model_metadata("sdxl"), "sdxl"), ({}, "sd1"), (base_model_metadata("sd1"), None)):
        assert family_mismatch(metadata, family) == "trained on another model type?"  # same, or one unknown


def test_read_focusfix_lora_refuses_targets_that_are_not_a_list(tmp_path):
    """'"attn"' (valid JSON, not a list) used to become the targets ('a', 't', 't', 'n'): regexes matching almost
    every module, and a misleading error later."""
    from safetensors.torch import save_file

    from focusfix_core.lora import read_focusfix_lora
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}
    for bad in ('"attn"', "[]", "[1]"):
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path), metadata={"focusfix_targets": bad})
        with pytest.raises(ValueError, match="unreadable FocusFix metadata .focusfix_targets must be a list"):
            read_focusfix_lora(path)
    save_file(tensors, str(path), metadata={"focusfix_targets": '["attn"]'})
    assert read_focusfix_lora(path).targets == ("attn",)


def _saved_lora_file(tmp_path, dtype=None, alpha=2.0):
    """A FocusFix LoRA file of `_net()` (rank 2): (path, its tensors, its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora = LoRA.attach(_net(), "attn", rank=2, alpha=alpha)
    _randomize(lora)
    path = save_lora(tmp_path / "fix.safetensors", lora, dtype=dtype)
    lora.remove()
    with safe_open(str(path), "pt") as f:
        return path, load_file(str(path)), f.metadata()


_UP = "lora_unet_input_blocks_0_1_attn1_to_q.lora_up.weight"
_ALPHA_KEY = "lora_unet_input_blocks_0_1_attn1_to_q.alpha"


@pytest.mark.parametrize("change, match", [
    (lambda sd: {**sd, _UP: torch.full_like(sd[_UP], float("nan"))},
     f"1 LoRA tensors hold NaN or inf values, e.g. \\['{_UP}'\\]"),
    (lambda sd: {**sd, _UP: torch.full_like(sd[_UP], float("inf"))}, "1 LoRA tensors hold NaN or inf values"),
    (lambda sd: {k: v.to(torch.int8) for k, v in sd.items()},
     "LoRA tensors must be float .*got torch.int8 for 24 keys"),
    (lambda sd: {**sd, _ALPHA_KEY: torch.tensor(-2.0)}, f"each .alpha must be one number > 0, got \\[-2.0\\] for "
                                                        f"\\['{_ALPHA_KEY}'\\]"),
    (lambda sd: {**sd, _ALPHA_KEY: torch.tensor(3.0)}, f"1 .alpha tensors differ from the metadata's alpha "
                                                       f"\\(ss_network_alpha 2\\), e.g. {_ALPHA_KEY} = 3"),
])
def test_read_focusfix_lora_refuses_bad_tensors_naming_file_and_key(tmp_path, change, match):
    """A NaN LoRA loaded silently and turned KSampler's latent NaN; an int8 one, or an .alpha of -2 while the
    metadata says 2, were accepted (the review's finding 6)."""
    from safetensors.torch import save_file

    from focusfix_core.lora import read_focusfix_lora
    _, sd, meta = _saved_lora_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    save_file(change(sd), str(bad), metadata=meta)
    with pytest.raises(ValueError, match=f"^'bad.safetensors': {match}"):
        read_focusfix_lora(bad)


def test_a_saved_loras_own_patterns_are_never_run_its_keys_name_its_layers(tmp_path, monkeypatch):
    """focusfix_targets comes from a file someone may share: a regex built to backtrack (`^(.|.)*attn2\\.to_kk$`)
    hung the continuing run inside `re`, where no cancel reaches (review B1). Patterns that are not presets are
    now never compiled; the file's keys name the layers, so a continued LoRA is the saved one."""
    from safetensors.torch import load_file, save_file

    from focusfix_core import lora as lora_mod
    from focusfix_core.lora import read_focusfix_lora

    x, c = _inputs()
    saved = LoRA.attach(_net(), [r"attn2\.to_(k|v)$", "conv_in"], rank=2, alpha=1.0)
    _randomize(saved)
    path = save_lora(tmp_path / "fix.safetensors", saved)
    want, expected = saved.module_names, _forward_with(saved, x, c)
    net = _net()
    for shared in (r"^(.|.)*attn2\.to_kk$", "(", "attn"):  # a trap, an invalid regex, a preset that does not fit
        meta = {**read_focusfix_lora(path).metadata, "focusfix_targets": json.dumps([shared, "x"])}
        bad = tmp_path / "shared.safetensors"
        save_file(load_file(str(path)), str(bad), metadata=meta)
        monkeypatch.setattr(lora_mod, "resolve_targets", lambda *a: pytest.fail("a file's pattern was run"))
        got = read_focusfix_lora(bad).attach(net)
        monkeypatch.undo()
        assert got.module_names == want and got.targets == (shared, "x")  # recorded for the next save
        assert torch.equal(net(x, c), expected)
        got.remove()
    meta = {**read_focusfix_lora(path).metadata, "focusfix_targets": json.dumps(["(a|a)*b"])}
    save_file({"lora_unet_other.lora_down.weight": torch.zeros(2, 4), "lora_unet_other.lora_up.weight":
               torch.zeros(4, 2), "lora_unet_other.alpha": torch.tensor(1.0)}, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="^'shared.safetensors': its keys name no layer of this TinyNet"):
        read_focusfix_lora(bad).attach(net)


def _forward_with(lora, x, c):
    """`_net()`'s output with `lora`'s adapters (their targets resolved as when it was attached)."""
    net = _net()
    again = LoRA.from_kohya(net, lora.state_dict_kohya(), lora.targets, lora.rank, lora.alpha)
    try:
        return net(x, c)
    finally:
        again.remove()


def test_read_focusfix_lora_takes_a_bf16_alpha_and_names_the_file_when_it_does_not_fit(tmp_path):
    from focusfix_core.lora import read_focusfix_lora
    path, _, _ = _saved_lora_file(tmp_path, dtype=torch.bfloat16, alpha=0.3)  # .alpha 0.30078125 in bf16
    saved = read_focusfix_lora(path)
    assert saved.alpha == pytest.approx(0.3) and saved.source == "fix.safetensors"
    with pytest.raises(ValueError, match="^'fix.safetensors': tensors has 14 shape mismatches"):
        saved.attach(TinyNet(d=4))  # another model: the error names the file


# ----------------------------------------------------------------------------- kohya's SD1.5 names (review R5-R7)
def _sd15_unet_hosts() -> list[str]:
    """Every Linear/Conv2d path of ComfyUI's SD1.5 UNet (LDM layout: channel_mult 1,2,4,4, two ResBlocks per level,
    attention in levels 0-2; checked once against comfy's own UNetModel: the same 282 paths)."""
    res = ("in_layers.2", "emb_layers.1", "out_layers.3")
    attn = ("proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
            *(f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
              for p in ("to_q", "to_k", "to_v", "to_out.0")))
    hosts = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"]

    def block(name, skip=False, attention=True, upsampler=False):  # [ResBlock, SpatialTransformer?, Upsample?]
        hosts.extend(f"{name}.0.{p}" for p in res + (("skip_connection",) if skip else ()))
        hosts.extend(f"{name}.1.{p}" for p in attn if attention)
        if upsampler:
            hosts.append(f"{name}.{2 if attention else 1}.conv")

    for i in (1, 2, 4, 5, 7, 8, 10, 11):
        block(f"input_blocks.{i}", skip=i in (4, 7), attention=i < 10)
    hosts.extend(f"input_blocks.{i}.0.op" for i in (3, 6, 9))  # Downsample
    block("middle_block")
    hosts.extend(f"middle_block.2.{p}" for p in res)
    for i in range(12):
        block(f"output_blocks.{i}", skip=True, attention=i >= 3, upsampler=i in (2, 5, 8))
    return hosts


# LDM path -> the name kohya's SD1.5 LoRAs use (diffusers' UNet2DConditionModel; as comfy.utils.unet_to_diffusers)
SD15_KOHYA_NAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "out.2": "conv_out",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.2.1.proj_in": "down_blocks.0.attentions.1.proj_in",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.5.1.transformer_blocks.0.attn2.to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
    "input_blocks.11.0.emb_layers.1": "down_blocks.3.resnets.1.time_emb_proj",
    "middle_block.0.in_layers.2": "mid_block.resnets.0.conv1",
    "middle_block.1.transformer_blocks.0.attn1.to_out.0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
    "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.0.out_layers.3": "up_blocks.1.resnets.0.conv2",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks.9.1.transformer_blocks.0.ff.net.2": "up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2",
    "output_blocks.11.1.transformer_blocks.0.attn2.to_k": "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
}


def test_diffusers_names_of_the_sd15_unet_are_kohyas():
    """Without ComfyUI: the kohya names of an SD1.5 UNet's layers (ResBlock conv1/conv2, the mid block's second
    resnet, down/upsamplers, the last up block's attentions), one distinct diffusers name per layer."""
    from focusfix_core.lora import diffusers_unet_names
    hosts = _sd15_unet_hosts()
    assert len(hosts) == 282
    net = _skeleton(hosts, num_res_blocks=[2, 2, 2, 2])
    name = diffusers_unet_names(net)
    assert {p: name(p) for p in SD15_KOHYA_NAMES} == SD15_KOHYA_NAMES
    names = [name(p) for p in hosts]
    assert len(set(names)) == len(hosts)  # no two layers share a name (conv1 vs conv2, mid resnets 0 vs 1)
    ldm = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")
    assert not [n for n in names if n.startswith(ldm)]  # every layer renamed
    assert diffusers_unet_names(_skeleton(hosts)) is None  # no num_res_blocks: not an SD-style UNet


def test_sd15_lora_saved_with_kohya_names_loads_back():
    """state_dict_kohya(diffusers_names=True) writes kohya's SD1.5 keys, and load_kohya / merge_kohya_into find
    every layer again from them."""
    net = _skeleton(_sd15_unet_hosts(), num_res_blocks=[2, 2, 2, 2])
    lora = LoRA.attach(net, r".", rank=1, alpha=0.5)
    _randomize(lora)
    sd = lora.state_dict_kohya(diffusers_names=True)
    for ldm, kohya in SD15_KOHYA_NAMES.items():
        key = "lora_unet_" + kohya.replace(".", "_")
        assert sd[f"{key}.alpha"].item() == 0.5, ldm
    assert not [k for k in sd if k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks"))]
    again = LoRA.attach(net, r".", rank=1, alpha=1)
    again.load_kohya(sd)  # strict: every key known, every layer found
    assert all(torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
               for a, b in zip(lora.adapters, again.adapters))
    lora.remove()
    again.remove()
    assert len(merge_kohya_into(net, sd)) == 282


def test_save_lora_writes_the_names_asked_for(tmp_path):
    """Review s29 (diffusers): `save_lora` wrote an SD1.5 UNet's LoRA under the LDM names, which diffusers does
    not read for SD1.x, while the nodes save kohya's diffusers names; it now takes the nodes' choice."""
    from safetensors.torch import load_file
    net = _skeleton(_sd15_unet_hosts(), num_res_blocks=[2, 2, 2, 2])
    lora = LoRA.attach(net, "to_k", rank=1)
    keys = {flag: set(load_file(save_lora(tmp_path / f"{flag}.safetensors", lora, diffusers_names=flag)))
            for flag in (True, False)}
    assert keys[True] == set(lora.state_dict_kohya(diffusers_names=True))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in keys[True]
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.alpha" in keys[False]
    assert len(keys[True]) == len(keys[False]) == 3 * 16
    lora.remove()


def test_read_focusfix_lora_keeps_alpha_through_a_continued_run(tmp_path):
    """Review R12: rank 4 alpha 1 (scale 1/4) read back as alpha 1, attached with alpha 1, and a run continuing it
    saves ss_network_alpha "1" again (alpha = rank would scale the delta 4x)."""
    from safetensors import safe_open

    from focusfix_core.lora import continued_metadata, read_focusfix_lora
    net = _net()
    x, c = _inputs()
    lora = LoRA.attach(net, "attn", rank=4, alpha=1)
    _randomize(lora)
    out = net(x, c)
    path = save_lora(tmp_path / "a.safetensors", lora)
    lora.remove()
    saved = read_focusfix_lora(path)
    assert saved.rank == 4 and saved.alpha == 1.0
    again = saved.attach(net)
    assert again.alpha == 1.0 and {a.alpha for a in again.adapters} == {1.0}
    torch.testing.assert_close(net(x, c), out, rtol=0, atol=0)
    path2 = save_lora(tmp_path / "b.safetensors", again, continued_metadata({}, saved.metadata))
    with safe_open(str(path2), "pt") as f:
        assert f.metadata()["ss_network_alpha"] == "1"
    assert read_focusfix_lora(path2).alpha == 1.0


def test_merged_when_no_grad_follows_the_loras_strength():
    """Review R13: at strength 0.5 the merged graph-free call equals the hooked call (which scales by strength),
    not the full-strength delta."""
    from focusfix_core.lora import MergedWhenNoGrad
    torch.manual_seed(0)
    net = Attention(8, 6)
    lora = _trained_lora(net)
    lora.strength = 0.5
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    with torch.no_grad():
        hooked = net(x, ctx)
        lora.strength = 1.0
        full = net(x, ctx)
        lora.strength = 0.5
        merged = MergedWhenNoGrad(lambda x, s, c: net(x, c), lora, offload=False)
        got = merged(x, None, ctx)
        assert merged.merged
    merged.restore()
    assert not torch.allclose(hooked, full, atol=1e-3)  # strength matters here
    torch.testing.assert_close(got, hooked, rtol=1e-5, atol=1e-6)


def test_read_focusfix_lora_says_a_pt_file_has_no_metadata(tmp_path):
    """A kohya LoRA saved as .pt (tensors only, loaded with weights_only) lacks the metadata for another reason
    than a .safetensors from another trainer: the message says which (fuzz review)."""
    from focusfix_core.lora import read_focusfix_lora
    path = tmp_path / "old.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
               path)
    with pytest.raises(ValueError, match=r"'old.pt' is not a LoRA FocusFix saved \(FocusFix saves .safetensors; "
                                         r"this file has no metadata\)"):
        read_focusfix_lora(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps to see mapped files")
def test_a_read_lora_keeps_no_mapping_of_its_file(tmp_path):
    """Tensors safetensors reads keep the file memory-mapped; Windows then refuses to replace it, so a Save LoRA
    over the LoRA a run continued failed after training. The LoRA read holds copies."""
    import gc

    from focusfix_core.lora import read_focusfix_lora
    path = _saved_lora_file(tmp_path)[0]
    saved = read_focusfix_lora(path)
    gc.collect()
    with open("/proc/self/maps") as f:
        assert str(path) not in f.read()
    assert saved.rank == 2


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def _kohya(down, up, alpha):
    return {"lora_unet_0.lora_down.weight": down, "lora_unet_0.lora_up.weight": up,
            "lora_unet_0.alpha": torch.tensor(alpha)}


def test_load_lora_file_refuses_an_alpha_of_zero(tmp_path):
    """`.alpha` must be one number > 0: alpha 0 scales every delta to nothing (mutant: `<= 0` -> `< 0`)."""
    path = tmp_path / "zero.safetensors"
    save_file(_kohya(torch.ones(2, 4), torch.ones(4, 2), 0.0), str(path))
    with pytest.raises(ValueError, match=r"^'zero.safetensors': each .alpha must be one number > 0, got \[0.0\]"):
        load_lora_file(path)


def test_load_lora_file_refuses_a_3d_down_weight(tmp_path):
    """down/up are [r,in]/[out,r] or the 4-D conv layout; a 3-D one fits no layer (mutant: ndim 3 accepted)."""
    path = tmp_path / "three.safetensors"
    save_file(_kohya(torch.ones(2, 4, 1), torch.ones(4, 2), 2.0), str(path))
    with pytest.raises(ValueError, match=r"^'three.safetensors': a LoRA's down/up weights are"):
        load_lora_file(path)


def test_save_lora_without_overwrite_keeps_a_file_that_appears_while_it_saves(tmp_path, monkeypatch):
    """`overwrite=False`: a file that takes the name after save_lora's first look (another ComfyUI on the same
    folder) is kept, and the save fails (mutant: the atomic save is called with overwrite=True)."""
    lora = LoRA.attach(nn.Sequential(nn.Linear(4, 4)), "all_linear", rank=2, alpha=1.0)
    path = tmp_path / "fix.safetensors"
    real = LoRA.state_dict_kohya

    def other_save_meanwhile(self, *args, **kwargs):  # runs after the first look, before the write
        path.write_bytes(b"another run's LoRA")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRA, "state_dict_kohya", other_save_meanwhile)
    with pytest.raises(FileExistsError):
        save_lora(path, lora, overwrite=False)
    assert path.read_bytes() == b"another run's LoRA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix.safetensors"]  # no temp file left


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_k = nn.Linear(4, 4)
        self.to_k_ip = nn.Linear(4, 4)  # an IP-Adapter-style extra projection: not one of the attention's own


def test_attn_preset_takes_only_the_attention_projections_themselves():
    """The "attn" preset is attn1/attn2 to_q, to_k, to_v, to_out.0: not a layer whose name only starts so
    (mutant: the pattern without its `$` anchor)."""
    net = nn.Module()
    net.attn2 = _Attn()
    assert resolve_targets(net, "attn") == ["attn2.to_k"]


def test_rank_zero_is_refused_also_with_an_explicit_alpha():
    """rank must be > 0 (mutant: `rank <= 0` -> `rank < 0`; with alpha given, rank 0 then built an adapter whose
    scale alpha / rank divides by zero at its first forward)."""
    with pytest.raises(ValueError, match="rank must be > 0, got 0"):
        LoRAAdapter(4, 4, rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="rank must be > 0, got 0"):
        LoRA.attach(nn.Sequential(nn.Linear(4, 4)), "all_linear", rank=0, alpha=1.0)


def test_two_layers_with_the_same_kohya_name_are_refused():
    """`a_b.c` and `a.b_c` are both saved as `lora_unet_a_b_c`: one would overwrite the other in the file, so the
    stock LoRA loader would apply one layer's weights to both (mutant: the collision check removed)."""
    net = nn.ModuleDict({"a_b": nn.ModuleDict({"c": nn.Linear(4, 4)}), "a": nn.ModuleDict({"b_c": nn.Linear(4, 4)})})
    with pytest.raises(ValueError, match="kohya names collide"):
        LoRA.attach(net, "all_linear", rank=2)


def test_unreadable_steps_trained_count_as_zero():
    """steps_trained: 0 when absent or unreadable, so a continued run counts only its own steps (mutant: -1)."""
    assert steps_trained({}) == 0
    assert steps_trained({"focusfix_steps_trained": "many"}) == 0
    out = continued_metadata({"focusfix_steps_trained": "3"}, {"focusfix_steps_trained": "many"})
    assert out["focusfix_steps_trained"] == "3"
