"""Property tests (hypothesis) for focusfix_core.lora on random Linear / Conv2d hosts, ranks, alphas and strengths:
kohya export/import, merge vs hooks, MergedWhenNoGrad's exact restore, and the adapters-off output."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from focusfix_core.lora import LoRA, MergedWhenNoGrad, merge_kohya_into

FAST = settings(max_examples=60, deadline=None)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


@dataclass
class Case:
    net: nn.Sequential  # one host, path "0"
    x: torch.Tensor
    seed: int
    rank: int  # at most the host's smaller size: LoRA.attach refuses more

    @property
    def host(self):
        return self.net[0]


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64)):
    """A random nn.Linear or nn.Conv2d host (stride, padding incl. "same", dilation, bias), random weights, a
    fitting input, in one of `dtypes`, and a rank from 1 to 8 the host can take (full rank included)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(dtypes))
    bias = draw(st.booleans())
    if draw(st.booleans()):
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        host = nn.Linear(fin, fout, bias=bias)
        lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))  # [B, in] or [B, T, in]
        x = torch.randn(*lead, fin, generator=g)
        size = min(fin, fout)
    else:
        cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        padding = "same" if stride == 1 and draw(st.booleans()) else draw(st.integers(0, 2))
        host = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
        x = torch.randn(draw(st.integers(1, 2)), cin, draw(st.integers(7, 10)), draw(st.integers(7, 10)), generator=g)
        size = min(cin * k[0] * k[1], cout)  # down: [r, cin, kh, kw]
    with torch.no_grad():
        for p in host.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return Case(nn.Sequential(host).to(dtype), x.to(dtype), seed, draw(st.integers(1, min(8, size))))


ALPHAS = st.floats(1e-3, 64.0)
STRENGTHS = st.floats(-2.0, 2.0)


def _randomize(lora: LoRA, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _bound(case: Case, lora: LoRA, strength: float) -> torch.Tensor:
    """|W| |x| + |strength * alpha/r| |up| |down| |x| (+ |b|), elementwise: the scale of the rounding error of
    either way of computing the output."""
    host, a = case.host, lora.adapters[0]
    W = host.weight.detach().double().abs() + a.weight_delta(strength).detach().double().abs()
    x = case.x.double().abs()
    b = None if host.bias is None else host.bias.detach().double().abs()
    if isinstance(host, nn.Linear):
        return F.linear(x, W, b)
    return F.conv2d(x, W, b, stride=host.stride, padding=host.padding, dilation=host.dilation)


def _close(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor, rel: float) -> None:
    """|a - b| <= rel * (bound + 1) elementwise. The adapters are fp32 whatever the host's dtype, so merged and
    hooked outputs differ at fp32 rounding also for a float64 host."""
    bound = bound.detach()
    err = (a.double() - b.double()).abs()
    assert bool((err <= rel * (bound + 1)).all()), float((err / (bound + 1)).max())


@FAST
@given(case=cases(), alpha=ALPHAS)
def test_a_fresh_lora_gives_the_base_output_exactly(case, alpha):
    """up = 0 at attach: I == I0 bit for bit (the README: an untrained LoRA must give I == I0 exactly)."""
    base = case.net(case.x)
    LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
    assert torch.equal(case.net(case.x), base)


@FAST
@given(case=cases(), alpha=ALPHAS, strength=STRENGTHS)
def test_disabled_and_removed_give_the_base_output_exactly(case, alpha, strength):
    base = case.net(case.x)
    lora = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
    _randomize(lora, case.seed)
    lora.strength = strength
    hooked = case.net(case.x)
    with lora.disabled():
        assert torch.equal(case.net(case.x), base)
        with lora.disabled():
            pass
        assert torch.equal(case.net(case.x), base)  # a nested disabled() restores "disabled"
    assert lora.enabled and torch.equal(case.net(case.x), hooked)  # and the outer one "enabled"
    lora.remove()
    assert torch.equal(case.net(case.x), base)


@FAST
@given(case=cases(), alpha=ALPHAS, strength=STRENGTHS)
def test_merged_output_equals_hooked_output(case, alpha, strength):
    lora = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
    _randomize(lora, case.seed)
    lora.strength = strength
    hooked = case.net(case.x)
    bound = _bound(case, lora, strength)
    lora.merge(strength=strength)
    merged = case.net(case.x)
    assert merged.dtype == hooked.dtype and merged.shape == hooked.shape
    _close(merged, hooked, bound, 4e-5)


@FAST
@given(case=cases(), alpha=ALPHAS, strength=STRENGTHS,
       dtype=st.sampled_from([None, torch.float16, torch.bfloat16]))
def test_kohya_export_import_round_trips(case, alpha, strength, dtype):
    """state_dict_kohya -> load_kohya into fresh adapters (another alpha) -> the same tensors, the same alpha
    (as stored: a 0-dim tensor of the file's dtype), the same output; exporting again gives the same file."""
    lora = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
    _randomize(lora, case.seed)
    sd = lora.state_dict_kohya(dtype=dtype)
    assert all(t.dtype == (dtype or torch.float32) for t in sd.values())
    lora.remove()
    other = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha * 2 + 1)
    other.load_kohya(sd)
    a = other.adapters[0]
    assert torch.equal(a.down, sd["lora_unet_0.lora_down.weight"].float())
    assert torch.equal(a.up, sd["lora_unet_0.lora_up.weight"].float())
    assert a.alpha == float(sd["lora_unet_0.alpha"])
    again = other.state_dict_kohya(dtype=dtype)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    if dtype is None:  # the file's fp32 alpha rounds alpha at most to fp32: the outputs agree to fp32 rounding
        assert abs(a.alpha - alpha) <= 1e-7 * alpha
        other.remove()
        ref = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
        ref.load_kohya(sd)
        ref.adapters[0].alpha = alpha
        want = case.net(case.x)
        ref.remove()
        back = LoRA.from_kohya(case.net, sd, targets="0", rank=case.rank)
        _close(case.net(case.x), want, _bound(case, back, 1.0), 4e-5)


@FAST
@given(case=cases(), alpha=ALPHAS, strength=STRENGTHS, with_alpha=st.booleans())
def test_merge_kohya_into_equals_merging_the_hooked_lora(case, alpha, strength, with_alpha):
    """Merging the saved tensors into a copy of the net == LoRA.merge on the net (a file without .alpha means
    alpha = rank)."""
    import copy

    plain = copy.deepcopy(case.net)
    lora = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
    _randomize(lora, case.seed)
    sd = lora.state_dict_kohya()
    if not with_alpha:
        del sd["lora_unet_0.alpha"]
        lora.adapters[0].alpha = float(case.rank)
    lora.merge(strength=strength)
    assert merge_kohya_into(plain, sd, strength=strength) == ["0"]
    w, w_file = case.host.weight.detach().double(), plain[0].weight.detach().double()
    tol = 1e-6  # the adapters, and so the delta, are fp32 also on a float64 host (merge: "fp32 math")
    assert bool(((w - w_file).abs() <= tol * (w.abs() + 1)).all())


@FAST
@given(case=cases(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)),
       alpha=ALPHAS, strength=STRENGTHS)
def test_merged_when_no_grad_restores_the_weights_bit_for_bit(case, alpha, strength):
    """Graph-free calls run merged, differentiated calls run hooked; after either restore the host weights are the
    originals bit for bit, in every host dtype; merged and hooked outputs agree to the dtype's rounding."""
    w0 = case.host.weight.detach().clone()
    lora = LoRA.attach(case.net, "0", rank=case.rank, alpha=alpha)
    _randomize(lora, case.seed)
    lora.strength = strength
    wrapped = MergedWhenNoGrad(lambda x, sigma, cond: case.net(x), lora)
    x = case.x
    if x.dtype in (torch.float16, torch.bfloat16) and x.ndim == 4:
        x = x.float()  # CPU half-precision conv: the host computes in fp32 on an fp32 input, not the point here
        case.net.float()
        w0 = case.host.weight.detach().clone()
        wrapped = MergedWhenNoGrad(lambda x, sigma, cond: case.net(x), lora)
    hooked = case.net(x).detach()
    with torch.no_grad():
        merged = wrapped(x, None, None)
    assert wrapped.merged and not lora.enabled
    with torch.enable_grad():
        again = wrapped(x, None, None)
    assert not wrapped.merged and lora.enabled
    assert torch.equal(case.host.weight, w0) and case.host.weight.dtype == w0.dtype
    assert torch.equal(again.detach(), hooked)
    with torch.no_grad():
        wrapped(x, None, None)
    wrapped.restore()
    assert torch.equal(case.host.weight, w0)
    rel = {torch.float32: 4e-5, torch.float64: 4e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[x.dtype]
    _close(merged, hooked, _bound(Case(case.net, x, case.seed, case.rank), lora, strength), rel)
