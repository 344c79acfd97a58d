"""Tests for focusfix_core.attention: the store, the hook-based capture, word positions, overlays."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from focusfix_core.attention import AttentionStore, attention_capture, map_size, overlay_maps, word_token_indices
from focusfix_core.denoisers import CFGDenoiser, cat_cond


def _qk(B=1, N=16, T=5, heads=2, d=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, heads * d, generator=g, dtype=dtype)
    k = torch.randn(B, T, heads * d, generator=g, dtype=dtype)
    return q, k


def _reference_maps(q, k, heads, token_words):
    """softmax(q k^T / sqrt d) per head, heads averaged, words summed: [B, n_words, N]."""
    B, N, inner = q.shape
    d = inner // heads
    qh = q.view(B, N, heads, d).transpose(1, 2)
    kh = k.view(B, -1, heads, d).transpose(1, 2)
    P = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1).mean(1)  # (B, N, T)
    return torch.stack([torch.stack([P[b, :, w].sum(-1) for w in words]) for b, words in enumerate(token_words)])


# ---------------------------------------------------------------- AttentionStore
def test_store_matches_reference_and_sums_to_one():
    q, k = _qk(B=2, T=5)
    words = [[[t] for t in range(5)]] * 2  # every token its own word
    store = AttentionStore(words, resolution=4)
    store.add(q, k, heads=2, hw=(4, 4))
    A = store.maps()
    assert A.shape == (2, 5, 4, 4)
    torch.testing.assert_close(A.sum(1), torch.ones(2, 4, 4))
    torch.testing.assert_close(A.flatten(2), _reference_maps(q, k, 2, words))


def test_store_multi_token_word_is_sum():
    q, k = _qk(T=6)
    store = AttentionStore([[[1, 2], [4]]], resolution=4)
    store.add(q, k, heads=2, hw=(4, 4))
    ref = _reference_maps(q, k, 2, [[[1], [2], [4]]])
    torch.testing.assert_close(store.maps().flatten(2)[0, 0], ref[0, 0] + ref[0, 1])
    all_tokens = AttentionStore([[list(range(6))]], resolution=4)
    all_tokens.add(q, k, heads=2, hw=(4, 4))
    torch.testing.assert_close(all_tokens.maps(), torch.ones(1, 1, 4, 4))


def test_store_resolution_filter_and_average():
    store = AttentionStore([[[1]]], resolution=4)
    q8, k = _qk(N=64, seed=1)
    store.add(q8, k, heads=2, hw=(8, 8))  # ignored
    assert store.n_layers == 0
    with pytest.raises(ValueError, match="map size 4x4; this model's cross-attention ran at 8x8: choose one"):
        store.maps()
    qa, _ = _qk(N=16, seed=2)
    qb, _ = _qk(N=16, seed=3)
    store.add(qa, k, 2, (4, 4))
    store.add(qb, k, 2, (4, 4))
    assert store.n_layers == 2 and store.resolutions_seen == [(8, 8), (4, 4)]
    ref = (_reference_maps(qa, k, 2, [[[1]]]) + _reference_maps(qb, k, 2, [[[1]]])) / 2
    torch.testing.assert_close(store.maps().flatten(2), ref)
    store.reset()
    assert store.n_layers == 0 and store.resolutions_seen == []


def test_store_tuple_and_any_resolution():
    q, k = _qk(N=8 * 4)
    store = AttentionStore([[[0]]], resolution=(8, 4))
    store.add(q, k, 2, (8, 4))
    assert store.maps().shape == (1, 1, 8, 4)
    anyres = AttentionStore([[[0], [1]]], resolution="any", out_size=4)
    anyres.add(*_qk(N=64), heads=2, hw=(8, 8))
    anyres.add(*_qk(N=16), heads=2, hw=(4, 4))
    A = anyres.maps()
    assert A.shape == (1, 2, 4, 4) and anyres.n_layers == 2
    assert A.min() >= 0 and A.max() <= 1
    first = AttentionStore([[[0]]], resolution="any")  # out_size from the first layer
    first.add(*_qk(N=64), heads=2, hw=(8, 8))
    first.add(*_qk(N=16), heads=2, hw=(4, 4))
    assert first.maps().shape == (1, 1, 8, 8)


def test_store_cfg_batch_keeps_cond_rows():
    q, k = _qk(B=4, seed=4)  # store batch 2, CFG batch 2 * 2: cond first
    store = AttentionStore([[[1]], [[2]]], resolution=4)
    store.add(q, k, 2, (4, 4))
    ref = _reference_maps(q[:2], k[:2], 2, [[[1]], [[2]]])
    torch.testing.assert_close(store.maps().flatten(2), ref)
    with pytest.raises(ValueError, match="multiple"):
        store.add(*_qk(B=3), heads=2, hw=(4, 4))


def test_store_gradient_with_and_without_keep_grad():
    q, k = _qk(dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    store = AttentionStore([[[1]]], resolution=4)
    store.add(q, k, 2, (4, 4))
    (store.maps() ** 2).sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    frozen = AttentionStore([[[1]]], resolution=4, keep_grad=False)
    frozen.add(q, k, 2, (4, 4))
    assert not frozen.maps().requires_grad


def test_store_gradcheck():
    q, k = _qk(N=4, T=3, d=2, dtype=torch.float64)

    def f(q, k):
        store = AttentionStore([[[0], [1, 2]]], resolution=2)
        store.add(q, k, 2, (2, 2))
        return store.maps()

    assert torch.autograd.gradcheck(f, (q.requires_grad_(), k.requires_grad_()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(token_indices=[]), "token_indices"),
        (dict(token_indices=[[[1]], [[1], [2]]]), "same number of words"),
        (dict(token_indices=[[[-1]]]), "token positions"),
        (dict(token_indices=[[[1]]], resolution="big"), "resolution"),
    ],
)
def test_store_init_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AttentionStore(**kwargs)


def test_store_add_errors():
    store = AttentionStore([[[9]]], resolution=4)
    q, k = _qk(T=5)
    with pytest.raises(ValueError, match="hw"):
        store.add(q, k, 2, (4, 5))
    with pytest.raises(ValueError, match="heads"):
        store.add(q, k, 3, (4, 4))
    with pytest.raises(ValueError, match="T = 5"):
        store.add(q, k, 2, (4, 4))


# ---------------------------------------------------------------- attention_capture
class CrossAttention(nn.Module):
    """SD-style attention: to_q/to_k/to_v/to_out and `heads` (ComfyUI and diffusers look alike)."""

    def __init__(self, dim, context_dim=None, heads=2, dim_head=4):
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1, self.attn2 = CrossAttention(dim), CrossAttention(dim, context_dim)

    def forward(self, x, context):  # x: (B, C, h, w)
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        t = t + self.attn1(t)
        t = t + self.attn2(t, context)
        return t.transpose(1, 2).reshape(B, C, h, w)


class TinyNet(nn.Module):
    def __init__(self, dim=8, context_dim=6):
        super().__init__()
        self.inp = nn.Conv2d(4, dim, 3, padding=1)
        self.down = nn.ModuleList([Block(dim, context_dim), Block(dim, context_dim)])
        self.pool = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x, context):
        x = self.down[0](self.inp(x), context)
        return self.down[1](self.pool(x), context)


def test_capture_records_matching_layers_with_grad():
    torch.manual_seed(0)
    net, x, ctx = TinyNet(), torch.randn(2, 4, 8, 6), torch.randn(2, 5, 6)
    store = AttentionStore([[[1], [2, 3]]] * 2, resolution=(4, 3))
    with attention_capture(net, store, latent_hw=(8, 6)):
        net(x, ctx)
    assert store.resolutions_seen == [(8, 6), (4, 3)] and store.n_layers == 1
    A = store.maps()
    assert A.shape == (2, 2, 4, 3)
    A[:, 0].sum().backward()
    assert net.down[1].attn2.to_k.weight.grad.abs().sum() > 0


def test_capture_sees_lora_hook_and_reference_values():
    torch.manual_seed(1)
    net, x, ctx = TinyNet(), torch.randn(1, 4, 4, 4), torch.randn(1, 5, 6)
    attn2 = net.down[1].attn2
    lora = attn2.to_k.register_forward_hook(lambda m, a, out: out * 3)  # an earlier-registered "LoRA"
    got = {}
    attn2.to_q.register_forward_hook(lambda m, a, out: got.setdefault("q", out))
    store = AttentionStore([[[0], [4]]], resolution=2)
    with attention_capture(net, store, latent_hw=(4, 4)):
        net(x, ctx)
    lora.remove()
    ref = _reference_maps(got["q"], attn2.to_k(ctx) * 3, attn2.heads, [[[0], [4]]])
    torch.testing.assert_close(store.maps().flatten(2), ref)


def test_capture_removes_hooks_on_exception():
    net = TinyNet()
    counts = lambda: sum(len(m._forward_hooks) for m in net.modules())  # noqa: E731
    before = counts()
    with pytest.raises(RuntimeError, match="boom"):
        with attention_capture(net, AttentionStore([[[1]]]), latent_hw=(8, 8)):
            assert counts() == before + 4  # to_q and to_k of each attn2
            raise RuntimeError("boom")
    assert counts() == before


def test_capture_no_attn2():
    with pytest.raises(ValueError, match="attn2"):
        with attention_capture(nn.Sequential(nn.Linear(2, 2)), AttentionStore([[[1]]]), latent_hw=(8, 8)):
            pass


# ---------------------------------------------------------------- word_token_indices
CLIP_TOKENS = ["<|startoftext|>", "a</w>", "Humming", "bird</w>", "and</w>", "a</w>", "cat</w>", "<|endoftext|>"]


def test_word_indices_bpe_multi_token_and_case():
    assert word_token_indices(CLIP_TOKENS, ["hummingbird", "cat", "a"]) == [[2, 3], [6], [1]]


@pytest.mark.parametrize(
    "tokens, word, expected",
    [
        (["<s>", "▁a", "▁humming", "bird", "</s>"], "hummingbird", [2, 3]),  # sentencepiece
        (["<s>", "a", "Ġhot", "Ġdog"], "hot dog", [2, 3]),  # GPT-2 BPE, two words
        (["a", "▁", "cat"], "cat", [2]),  # lone marker token
        (["cat", "dog", "cat"], "cat", [0]),  # first occurrence
    ],
)
def test_word_indices_other_tokenizers(tokens, word, expected):
    assert word_token_indices(tokens, [word]) == [expected]


def test_word_indices_missing_word():
    with pytest.raises(ValueError, match=r"'dog' not found.*'humming', 'bird', 'and'"):  # readable, no '</w>'
        word_token_indices(CLIP_TOKENS, ["cat", "dog"])
    with pytest.raises(ValueError, match="'catfish' not found"):
        word_token_indices(CLIP_TOKENS, ["catfish"])
    with pytest.raises(TypeError, match="list of strings"):
        word_token_indices(CLIP_TOKENS, "cat")


# ---------------------------------------------------------------- overlay_maps
def test_overlay_shape_range_and_colours():
    I = torch.zeros(2, 3, 16, 16)
    A = torch.zeros(2, 1, 4, 4)
    A[:, :, 0, 0] = 1.0
    out = overlay_maps(I, A, alpha=1.0)
    assert out.shape == (2, 1, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    hot, cold = out[0, 0, :, 0, 0], out[0, 0, :, -1, -1]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where attention is high, blue where low
    assert torch.isfinite(overlay_maps(I, torch.zeros(2, 2, 4, 4))).all()
    with pytest.raises(ValueError, match="attention maps A"):
        overlay_maps(I, torch.zeros(3, 1, 4, 4))


# ---------------------------------------------------------------- contexts of different lengths (core review, 2)
def _sdpa(q, ctx, Wk, Wv):
    return F.scaled_dot_product_attention(q, ctx @ Wk, ctx @ Wv)


def test_cat_cond_rows_attend_as_the_unpadded_contexts():
    """cat_cond repeats a shorter context up to the lcm of the lengths, as ComfyUI's CONDCrossAttn.concat: every
    row's cross-attention output is its unpadded one (padding with the last token gave that token extra weight:
    1.86 off at an output scale of 0.23)."""
    g = torch.Generator().manual_seed(0)
    D = 16
    long, short, other = (torch.randn(1, T, D, generator=g) for T in (154, 77, 231))
    Wk, Wv = (torch.randn(D, D, generator=g) / D**0.5 for _ in range(2))
    q = torch.randn(1, 64, D, generator=g)
    ctx = cat_cond({"context": long}, {"context": short}, {"context": other})["context"]
    for row, alone in enumerate((long, short, other)):
        torch.testing.assert_close(_sdpa(q, ctx[row:row + 1], Wk, Wv), _sdpa(q, alone, Wk, Wv), rtol=1e-5, atol=1e-6)
    assert ctx.shape == (3, 462, D)  # lcm(154, 77, 231)
    assert cat_cond({"context": short}, {"context": short})["context"].shape == (2, 77, D)  # equal: untouched


def test_store_sums_the_copies_of_a_repeated_context():
    """A row repeated n times gives each copy of a token 1/n of its probability: with the row's own length the
    store sums every copy (t + m * T_b), so the maps are the unrepeated row's."""
    q, k = _qk(B=2, T=5, seed=7)
    words = [[[1], [2, 3]], [[0], [4]]]
    plain = AttentionStore(words, resolution=4)
    plain.add(q, k, heads=2, hw=(4, 4))
    repeated = AttentionStore(words, resolution=4, context_lengths=[5, 5])
    repeated.add(q, k.repeat(1, 3, 1), heads=2, hw=(4, 4))
    torch.testing.assert_close(repeated.maps(), plain.maps())
    with pytest.raises(ValueError, match="not a whole number of copies"):
        AttentionStore(words, resolution=4, context_lengths=[4, 5]).add(q, k.repeat(1, 3, 1), 2, (4, 4))
    with pytest.raises(ValueError, match="points past that prompt's 3 tokens"):
        AttentionStore(words, resolution=4, context_lengths=[3, 5])
    with pytest.raises(ValueError, match="context_lengths must give one positive int per batch item"):
        AttentionStore(words, resolution=4, context_lengths=[5])


@pytest.fixture
def tiny_cfg_model():
    from focusfix_core.tiny.model import TinyConfig, TinyModel
    return TinyModel.random(seed=0, config=TinyConfig(image_size=16, channels=(16, 16, 32), heads=2, context_dim=16,
                                                      text_layers=1))


def test_maps_with_a_longer_negative_prompt_equal_those_with_a_same_length_one(tiny_cfg_model):
    """CFG with a negative prompt twice as long (a CLIP prompt over 75 tokens: 154 against 77) repeats the
    prompt's row; given the prompt's own length, its maps are those beside a negative prompt of its length."""
    m = tiny_cfg_model
    cond = m.encode_prompts(["a red circle and a blue square"])
    T = cond["context"].shape[1]
    words = m.token_indices("a red circle and a blue square", ["circle", "square"])
    short = m.encode_prompts(["a green triangle"])
    long = {"context": torch.cat([short["context"], m.encode_prompts(["a blue circle"])["context"]], 1)}  # 2T
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 5
    sigma = m.sigmas[[700]].float()
    maps = {}
    for name, uncond in (("short", short), ("long", long)):
        store = AttentionStore([words], resolution=8, keep_grad=False, context_lengths=[T])
        with torch.no_grad(), m.attention_capture(store):
            CFGDenoiser(m.denoise, uncond, 3.0)(x, sigma, cond)
        maps[name] = store.maps()
    torch.testing.assert_close(maps["long"], maps["short"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- attention another node replaced (S&E review, 2)
class ReplacedBlock(Block):
    """ComfyUI's BasicTransformerBlock under an attn2 replace patch: to_q, to_k, to_v and to_out are called, the
    attention itself is the patch's, and attn2's own forward never runs."""

    def forward(self, x, context):
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn1(t)
        a = self.attn2
        q, k, v = a.to_q(t), a.to_k(context), a.to_v(context)
        q, k, v = (z.unflatten(-1, (a.heads, -1)).transpose(1, 2) for z in (q, k, v))
        t = t + a.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return t.transpose(1, 2).reshape(B, C, h, w)


@pytest.mark.parametrize("replaced", [(0, 1), (1,)], ids=["all blocks", "some blocks"])
def test_capture_sees_layers_whose_attention_a_patch_replaced(replaced):
    """Maps come from every layer also where an attn2 replace patch bypasses the module's forward (before: no
    layer with every block patched, and silently only the unpatched layers with some)."""
    torch.manual_seed(2)
    net, x, ctx = TinyNet(), torch.randn(1, 4, 8, 8), torch.randn(1, 5, 6)
    patched = TinyNet()
    patched.load_state_dict(net.state_dict())
    for i in replaced:
        block = ReplacedBlock(8, 6)
        block.load_state_dict(patched.down[i].state_dict())
        patched.down[i] = block
    maps = []
    for model in (net, patched):
        store = AttentionStore([[[1], [3]]], resolution="any", out_size=4)
        with attention_capture(model, store, latent_hw=(8, 8)):
            out = model(x, ctx)
        assert store.n_layers == 2
        maps.append((store.maps(), out))
    torch.testing.assert_close(maps[1][0], maps[0][0])
    torch.testing.assert_close(maps[1][1], maps[0][1])  # the patch is faithful: the same net


# ---------------------------------------------------------------- map sizes the model has (S&E review, 3)
def test_map_size_accepts_only_levels_with_cross_attention():
    assert map_size(32, (128, 128), attention_levels=[1, 2]) == (32, 32)
    assert map_size(16, (64, 96), attention_levels=[0, 1, 2, 3]) == (16, 24)
    with pytest.raises(ValueError, match=r"resolution 16: .*latents 128x128.* only in maps of 64x64, 32x32: set "
                                         r"resolution to 64 or 32"):
        map_size(16, (128, 128), attention_levels=[1, 2])  # SDXL at 1024 px
    with pytest.raises(ValueError, match="no attention maps of at least 2x2"):
        map_size(1, (2, 2), attention_levels=[5])
    # SDXL at 16 px (latents 2x2): its cross-attention maps would be 1x1; not offered as "set resolution to 1"
    with pytest.raises(ValueError, match=r"no attention maps of at least 2x2 .*use a larger width and height"):
        map_size(2, (2, 2), attention_levels=[1, 2], latent_scale=8)
    with pytest.raises(ValueError, match="set resolution to 2$"):
        map_size(4, (4, 4), attention_levels=[1, 2], latent_scale=8)  # 2x2 and 1x1: only 2 is offered
    assert map_size(16, (128, 128)) == (16, 16)  # the layout unknown: any level
    with pytest.raises(ValueError, match=r"resolution 16: at this size \(width 768, height 512 px\) this model has "
                                         r"cross-attention only in maps of 64x96, 32x48"):
        map_size(16, (64, 96), attention_levels=[0, 1], latent_scale=8)  # errors speak the artist's pixels


def test_tiny_model_names_its_attention_levels(tiny_cfg_model):
    assert tiny_cfg_model.attention_levels() == [1, 2]  # 16 px: 8x8 and 4x4
    seen = AttentionStore([[[1]]], resolution="any")
    with torch.no_grad(), tiny_cfg_model.attention_capture(seen):
        tiny_cfg_model.denoise(torch.zeros(1, 3, 16, 16), tiny_cfg_model.sigmas[[5]].float(),
                               tiny_cfg_model.encode_prompts(["a red circle"]))
    assert seen.resolutions_seen == [(8, 8), (4, 4)]


# ---------------------------------------------------------------- words with accents, words twice (S&E review, 4, 5)
def _byte_level(text_tokens: list[bytes]) -> list[str]:
    """Tokens as a byte-level tokenizer's text gives them: partial characters as surrogate escapes."""
    return [t.decode("utf-8", "surrogateescape") for t in text_tokens]


def test_word_indices_match_accents_and_characters_split_over_tokens():
    cat = "猫".encode()  # 3 bytes: byte-level BPE gives it 3 tokens
    tokens = _byte_level([b"<|startoftext|>", b"a</w>", "café</w>".encode(), b"and</w>", b"a</w>", cat[:1], cat[1:2],
                          cat[2:] + b"</w>", "crème</w>".encode(), "br".encode(), "ûl".encode(), "ée</w>".encode(),
                          b"<|endoftext|>"])
    assert word_token_indices(tokens, ["Café", "猫", "crème brûlée"]) == [[2], [5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match=r"'dog' not found in the prompt's tokens \['<\|startoftext\|>', 'a', "
                                         r"'café', 'and', 'a', '\ufffd'"):
        word_token_indices(tokens, ["dog"])


def test_word_indices_match_an_accent_however_it_was_typed():
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # é as one character, and as e + a combining accent
    for token, word in ((composed, decomposed), (decomposed, composed)):
        tokens = _byte_level([b"<|startoftext|>", b"a</w>", (token + "</w>").encode(), b"<|endoftext|>"])
        assert word_token_indices(tokens, [word]) == [[2]]


def test_word_indices_refuse_two_words_on_the_same_token():
    with pytest.raises(ValueError, match=r"words 'cat' and 'cat' both land on the prompt's token\(s\) \['cat'\].*"
                                         r"distinct words, e.g. 'black cat, white cat'"):
        word_token_indices(CLIP_TOKENS, ["cat", "cat"])
    # "bird" is only the end of "hummingbird": no whole word of the prompt (before: both landed on one token)
    with pytest.raises(ValueError, match="'bird' is only part of the longer word 'hummingbird'"):
        word_token_indices(CLIP_TOKENS, ["hummingbird", "bird"])


# Found by mutation testing (session 24): behaviour no earlier test pinned down.
def test_any_resolution_resizes_a_larger_layer_by_area():
    """resolution="any": an 8x8 layer stored at out_size 4 is the 2x2 average of its own 8x8 maps."""
    q, k = _qk(N=64, seed=5)
    words = [[[0], [3]]]
    fine = AttentionStore(words, resolution=8)
    fine.add(q, k, heads=2, hw=(8, 8))
    anyres = AttentionStore(words, resolution="any", out_size=4)
    anyres.add(q, k, heads=2, hw=(8, 8))
    torch.testing.assert_close(anyres.maps(), F.avg_pool2d(fine.maps(), 2))


class _Attn2(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = 2
        self.to_q, self.to_k = nn.Linear(8, 8, bias=False), nn.Linear(6, 8, bias=False)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = _Attn2()


def test_capture_adds_a_layer_once_per_query():
    """A layer is added when to_k runs after to_q; a second to_k call with no new to_q (the text keys read alone,
    as for key_change_loss) adds nothing, rather than pairing the old queries again."""
    torch.manual_seed(0)
    net, x, ctx = _Net(), torch.randn(1, 16, 8), torch.randn(1, 5, 6)
    store = AttentionStore([[[1]]], resolution=4)
    with attention_capture(net, store, latent_hw=(4, 4)):
        net.attn2.to_q(x)
        net.attn2.to_k(ctx)
        net.attn2.to_k(ctx)
    assert store.n_layers == 1
