"""Cross-attention maps of chosen prompt words, with or without gradients (Separate-and-Enhance's A_i).

A map A_i: [h,w] is the softmax(q k^T / sqrt(d)) probability that each latent pixel attends to word i's
tokens (summed over a multi-token word's pieces), averaged over the cross-attention layers of one resolution
(16x16 for SD, as in Separate-and-Enhance and Attend-and-Excite). Heads are averaged on purpose, as
Attend-and-Excite does; Separate-and-Enhance's reference code keeps the head axis and takes its losses' max
over heads and pixels, so its loss values are on another scale (head-averaged peaks are lower).

`attention_capture` records these maps from any net whose cross-attention modules look like SD's
(`...attn2` with `to_q`, `to_k` and `heads`: ComfyUI's CrossAttention and diffusers' Attention both do)
through forward hooks on `to_q` and `to_k`, so it composes with LoRA hooks, never replaces an attention
implementation, and also sees layers whose attention another node replaced (ComfyUI's attn2 replace patches
call `to_q` and `to_k` but never the module's own forward).

References:
    Bao et al., Separate-and-Enhance (SIGGRAPH 2024); Chefer et al., Attend-and-Excite (SIGGRAPH 2023);
    Hertz et al., Prompt-to-Prompt (ICLR 2023) for the attention store.
"""
from __future__ import annotations

import math
import re
import unicodedata
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

__all__ = ["AttentionStore", "LiveHW", "attention_capture", "not_recorded", "level_sizes", "map_size",
           "word_token_indices", "overlay_maps", "maps_scale", "maps_tiles"]

Resolution = int | tuple[int, int] | str


def _check_token_indices(token_indices: object) -> list[list[list[int]]]:
    """Normalise [[word, ...], ...] (one entry per batch item; a word is a list of token positions)."""
    if not isinstance(token_indices, (list, tuple)) or len(token_indices) == 0:
        raise TypeError(f"token_indices must be a non-empty list (one entry per batch item), got {token_indices!r}")
    out = []
    for b, words in enumerate(token_indices):
        if not isinstance(words, (list, tuple)) or len(words) == 0:
            raise ValueError(f"token_indices[{b}] must be a non-empty list of words, got {words!r}")
        entry = []
        for word in words:
            word = [word] if isinstance(word, int) else word
            if (
                not isinstance(word, (list, tuple))
                or len(word) == 0
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in word)  # True is 1
            ):
                raise ValueError(f"token_indices[{b}]: each word must be a non-empty list of token positions >= 0, got {word!r}")
            entry.append(list(word))
        out.append(entry)
    n_words = {len(e) for e in out}
    if len(n_words) != 1:
        raise ValueError(f"token_indices must give every batch item the same number of words, got {[len(e) for e in out]}")
    return out


def level_sizes(latent_hw: tuple[int, int], levels: int = 8) -> list[tuple[int, int]]:
    """(h, w) of each UNet level for latents of size latent_hw, level 0 first: an SD-style UNet halves its
    feature maps at each level (stride-2 convs: ceil(n / 2)), down to 1 pixel at most."""
    h, w = latent_hw
    sizes = [(h, w)]
    while len(sizes) < levels and min(h, w) > 1:
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def map_size(resolution: int, latent_hw: tuple[int, int], levels: int = 8,
             attention_levels: Sequence[int] | None = None, latent_scale: int | None = None) -> tuple[int, int]:
    """(h, w) of the UNet level whose shorter side is `resolution`, for latents of size latent_hw: at 512x768 px
    (latents 64x96) resolution 16 is the 16x24 level. Square images give (r, r).

    Args:
        attention_levels: the levels (0 = the latents' size) where the model has cross-attention, when known
            (a model's `attention_levels()`); then only those are accepted, and the error lists their sizes.
        latent_scale: pixels per latent, when known: the error then gives the image's size in pixels, as the
            artist set it.

    Raises:
        ValueError: no (attention) level has that shorter side; the message lists the ones that exist.

    Examples:
        >>> map_size(16, (64, 96))
        (16, 24)
        >>> map_size(32, (128, 128), attention_levels=[1, 2])
        (32, 32)
    """
    sizes = level_sizes(latent_hw, levels)
    usable = sizes if attention_levels is None else [sizes[i] for i in sorted(set(attention_levels)) if i < len(sizes)]
    usable = [hw for hw in usable if min(hw) >= 2]  # a 1-pixel map has no layout to separate (and no 3x3 blur)
    for hw in usable:
        if min(hw) == resolution:
            return hw
    H, W = latent_hw
    size = f"latents {H}x{W}" if latent_scale is None else f"width {W * latent_scale}, height {H * latent_scale} px"
    if attention_levels is None:
        raise ValueError(f"resolution {resolution}: at this size ({size}) the UNet's feature maps have "
                         f"shorter sides {[min(s) for s in sizes]}; choose one where the model has cross-attention "
                         f"(SD1.5 at 512 px: 64, 32, 16, 8; SDXL at 1024 px: 64, 32)")
    if not usable:
        raise ValueError(f"resolution {resolution}: at this size ({size}) this model has no attention maps of at "
                         f"least 2x2 (too small an image, or no cross-attention layer): use a larger width and height")
    maps = ", ".join(f"{h}x{w}" for h, w in usable)
    sides = " or ".join(str(min(s)) for s in usable)
    raise ValueError(f"resolution {resolution}: at this size ({size}) this model has cross-attention only "
                     f"in maps of {maps}: set resolution to {sides}")


def _check_resolution(resolution: Resolution) -> tuple[int, int] | str:
    if resolution == "any":
        return "any"
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0:
        return (resolution, resolution)
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2 and all(isinstance(r, int) and r > 0 for r in resolution):
        return (resolution[0], resolution[1])
    raise ValueError(f"resolution must be an int r (r x r), a tuple (h, w) or 'any', got {resolution!r}")


def _check_context_lengths(context_lengths: object, token_indices: list[list[list[int]]]) -> list[int] | None:
    if context_lengths is None:
        return None
    if not isinstance(context_lengths, (list, tuple)) or len(context_lengths) != len(token_indices) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in context_lengths):
        raise ValueError(f"context_lengths must give one positive int per batch item ({len(token_indices)}), "
                         f"got {context_lengths!r}")
    for b, (words, n) in enumerate(zip(token_indices, context_lengths)):
        for i, word in enumerate(words):
            if max(word) >= n:
                raise ValueError(f"token_indices[{b}][{i}] = {word} points past that prompt's {n} tokens")
    return list(context_lengths)


_NOT_RECORDED = [0]  # depth of `not_recorded` blocks


@contextmanager
def not_recorded() -> Iterator[None]:
    """Layers run in this block add nothing to any `AttentionStore`: `CFGDenoiser`'s call of the negative prompt
    alone, when it runs the two halves apart (the stores keep the prompt's maps, the rows a batched call has
    first)."""
    _NOT_RECORDED[0] += 1
    try:
        yield
    finally:
        _NOT_RECORDED[0] -= 1


class AttentionStore:
    """Accumulates cross-attention maps A: [B, n_words, h, w] over the layers of one resolution.

    Args:
        token_indices: one entry per batch item; an entry is a list of words; a word is a list of
            token positions (a multi-token word's map is the sum of its tokens' probabilities).
        resolution: keep only layers whose map is r x r (int), h x w (tuple), or "any": keep every
            layer and resize it by area interpolation to `out_size`.
        keep_grad: keep the autograd graph to q and k (training); False detaches and runs under no_grad.
        out_size: the size maps are resized to when resolution == "any"; None = the first layer's.
        context_lengths: each batch item's own context length T_b, when the batch's contexts were joined by
            `cat_cond` (prompts of different lengths; CFG with a longer negative prompt): a row shorter than the
            keys' T is repeated T / T_b times, each copy of a token gets 1/n of its probability, so a word's map
            sums every copy (positions t + m * T_b). None: every row is the keys' own length.

    Example:
        >>> store = AttentionStore([[[1], [2, 3]]], resolution=4)
        >>> store.add(torch.randn(2, 16, 8), torch.randn(2, 5, 8), heads=2, hw=(4, 4))  # CFG batch 2
        >>> store.maps().shape
        torch.Size([1, 2, 4, 4])
    """

    def __init__(
        self,
        token_indices: Sequence[Sequence[Sequence[int]]],
        resolution: Resolution = 16,
        keep_grad: bool = True,
        out_size: int | tuple[int, int] | None = None,
        context_lengths: Sequence[int] | None = None,
    ):
        self.token_indices = _check_token_indices(token_indices)
        self.context_lengths = _check_context_lengths(context_lengths, self.token_indices)
        self._S: dict[tuple, torch.Tensor] = {}  # selection matrices by (T, device, dtype): built once per store
        self.resolution = _check_resolution(resolution)
        self.keep_grad = bool(keep_grad)
        self.out_size = None if out_size is None else _check_resolution(out_size)
        if self.out_size == "any":
            raise ValueError("out_size must be an int or (h, w), got 'any'")
        self.reset()

    @property
    def batch_size(self) -> int:
        return len(self.token_indices)

    @property
    def n_words(self) -> int:
        return len(self.token_indices[0])

    def reset(self) -> None:
        """Forget every layer added so far (call before each forward pass you want maps of)."""
        self._sum: torch.Tensor | None = None  # (B, n_words, h, w), summed over kept layers
        self.n_layers = 0
        self._seen: set[tuple[int, int]] = set()

    @property
    def resolutions_seen(self) -> list[tuple[int, int]]:
        """Every (h, w) passed to `add`, kept or not, largest first."""
        return sorted(self._seen, reverse=True)

    def _selection(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """S: [B, T, n_words], S[b, t, i] = 1 if key position t is a copy of a token of word i of batch item b."""
        key = (T, device, dtype)
        if key in self._S:
            return self._S[key]
        S = torch.zeros(self.batch_size, T, self.n_words, dtype=dtype)
        for b, words in enumerate(self.token_indices):
            Tb = T if self.context_lengths is None else self.context_lengths[b]
            if T % Tb:
                raise ValueError(f"the keys have T = {T} tokens, not a whole number of copies of batch item {b}'s "
                                 f"{Tb} (cat_cond repeats each context up to the least common multiple)")
            for i, word in enumerate(words):
                if max(word) >= Tb:
                    raise ValueError(f"token_indices[{b}][{i}] = {word} points past the context's T = {Tb} tokens")
                S[b, [t + m * Tb for m in range(T // Tb) for t in word], i] = 1
        self._S[key] = S = S.to(device)
        return S

    def add(self, q: torch.Tensor, k: torch.Tensor, heads: int, hw: tuple[int, int]) -> None:
        """Add one cross-attention layer.

        Args:
            q: [B',N,heads*d] queries (N = h*w latent pixels); B' = k*B (CFG batches: cond first).
            k: [B',T,heads*d] keys of the T text tokens (batch 1 broadcasts).
            heads: number of attention heads.
            hw: (h, w) with h*w == N.
        """
        if _NOT_RECORDED[0]:
            return
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            raise TypeError(f"q and k must be tensors, got {type(q).__name__} and {type(k).__name__}")
        if q.ndim != 3 or k.ndim != 3 or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q must be [B',N,heads*d] and k [B',T,heads*d], got {tuple(q.shape)} and {tuple(k.shape)}")
        Bq, N, inner = q.shape
        h, w = hw
        if h * w != N:
            raise ValueError(f"hw = {tuple(hw)} must multiply to q's N = {N}")
        if heads < 1 or inner % heads:
            raise ValueError(f"heads = {heads} must divide q's channel count {inner}")
        self._seen.add((h, w))
        if self.resolution != "any" and (h, w) != self.resolution:
            return
        B = self.batch_size
        if Bq % B:
            raise ValueError(f"q's batch {Bq} must be a multiple of the store's batch {B} (len(token_indices))")
        if k.shape[0] not in (1, Bq):
            raise ValueError(f"k's batch must be 1 or q's batch {Bq}, got {k.shape[0]}")
        q, k = q[:B], k[:B].expand(B, -1, -1)  # CFG: the cond half comes first
        with torch.set_grad_enabled(self.keep_grad and torch.is_grad_enabled()):
            if not self.keep_grad:
                q, k = q.detach(), k.detach()
            d, dtype = inner // heads, torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32
            qh = rearrange(q.to(dtype), "b n (nh d) -> b nh n d", nh=heads)
            kh = rearrange(k.to(dtype), "b t (nh d) -> b nh t d", nh=heads)
            P = (einsum(qh, kh, "b nh n d, b nh t d -> b nh n t") / math.sqrt(d)).softmax(-1)  # over all T
            S = self._selection(k.shape[1], P.device, P.dtype)  # (B, T, n_words)
            A = einsum(P.mean(1), S, "b n t, b t i -> b i n")  # (B, n_words, N); heads averaged
            A = rearrange(A, "b i (h w) -> b i h w", h=h, w=w)
            if self.resolution == "any":
                if self.out_size is None:
                    self.out_size = (h, w)
                if (h, w) != self.out_size:
                    A = F.interpolate(A, size=self.out_size, mode="area")
            self._sum = A if self._sum is None else self._sum + A
        self.n_layers += 1

    def maps(self) -> torch.Tensor:
        """A: [B, n_words, h, w], the average over the layers added since the last reset."""
        if self._sum is None:
            seen = ", ".join(f"{h}x{w}" for h, w in self.resolutions_seen)
            want = "x".join(map(str, self.resolution)) if self.resolution != "any" else "any"
            raise ValueError(f"no cross-attention layer ran at the map size {want}; " + (
                f"this model's cross-attention ran at {seen}: choose one of those" if seen else
                "no cross-attention layer ran at all"))
        return self._sum / self.n_layers

    def __repr__(self) -> str:
        return (f"AttentionStore(batch={self.batch_size}, n_words={self.n_words}, resolution={self.resolution}, "
                f"keep_grad={self.keep_grad}, n_layers={self.n_layers})")


class LiveHW:
    """(h, w) of the latent a net is running on now, for `attention_capture`: the model's denoise sets `hw` per
    call, so one capture serves every image size (square, portrait, landscape)."""

    def __init__(self, hw: tuple[int, int] = (0, 0)):
        self.hw = tuple(hw)

    def __iter__(self):
        return iter(self.hw)

    def __len__(self):
        return 2


def _infer_hw(N: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with N tokens, from the sampler state's (H, W) halved by stride-2 convs."""
    H, W = latent_hw
    for rounding in (math.ceil, math.floor):
        h, w = H, W
        for _ in range(8):
            if h * w == N:
                return h, w
            h, w = max(rounding(h / 2), 1), max(rounding(w / 2), 1)
    h = max(round(math.sqrt(N * H / W)), 1)  # fall back on the aspect ratio
    if N % h == 0:
        return h, N // h
    raise ValueError(f"cannot infer the (h, w) of an attention layer with N = {N} tokens from latent_hw = {tuple(latent_hw)}")


def _cross_attention_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in net.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and all(hasattr(m, a) for a in ("to_q", "to_k", "heads"))
    ]


@contextmanager
def attention_capture(net: nn.Module, store: AttentionStore, latent_hw: tuple[int, int]) -> Iterator[AttentionStore]:
    """While active, every `...attn2` of `net` adds its q, k to `store` (hooks removed on exit, always).

    Hooks on `to_q`/`to_k` see their outputs after any earlier-registered hook (e.g. a LoRA delta). The layer is
    added when `to_k` has run after `to_q`: SD-style attention computes q first, in its own forward and in
    ComfyUI's attn2 replace patches (IPAdapter-style), which call `to_q`, `to_k` and `to_v` without the
    module's forward. A hook on `to_k` registered after this capture runs once the layer is in the store.

    Args:
        net: the denoiser network (SD-style UNet or any module tree with `attn2` blocks).
        store: where maps go.
        latent_hw: (H, W) of the sampler state x: [B,C,H,W], to infer each layer's (h, w).

    Raises:
        ValueError: if `net` has no `attn2` module with `to_q`, `to_k` and `heads`.
    """
    blocks = _cross_attention_modules(net)
    if not blocks:
        raise ValueError(
            f"net {type(net).__name__} has no cross-attention module named '...attn2' with to_q, to_k and heads"
        )
    handles = []

    def keep_q(cache: dict):
        def hook(module, args, output):
            cache["q"] = output

        return hook

    def add_with_k(cache: dict, heads: int):
        def hook(module, args, output):
            q = cache.pop("q", None)
            if q is not None:
                store.add(q, output, heads, _infer_hw(q.shape[1], latent_hw))

        return hook

    try:
        for _, m in blocks:
            cache: dict = {}
            handles.append(m.to_q.register_forward_hook(keep_q(cache)))
            handles.append(m.to_k.register_forward_hook(add_with_k(cache, int(m.heads))))
        yield store
    finally:
        for handle in handles:
            handle.remove()


_MARKERS = ("</w>", "Ġ", "▁")
_SPECIAL = re.compile(r"<\|?/?[A-Za-z_]+\|?>")  # <|startoftext|>, <s>, </s>, <pad>, <embedding>: no word's pieces


def _clean_token(token: str) -> str:
    for marker in _MARKERS:
        token = token.replace(marker, "")
    return token.strip().lower()


def _utf8(text: str) -> bytes:
    """A token's bytes: a byte-level BPE piece may hold part of a character (猫 is 3 tokens), which a tokenizer's
    text gives as surrogate escapes (`bytes.decode("utf-8", "surrogateescape")`); they come back as those bytes."""
    return text.encode("utf-8", "surrogateescape")


def _nfc(text: str) -> str:
    """Composed form: an "é" typed as e + a combining accent is the same word as the one-character "é" (CLIP's
    tokenizer composes the prompt too)."""
    return unicodedata.normalize("NFC", text)


def _readable(token: str) -> str:
    """A token as an artist reads it: no BPE markers, a partial character shown as U+FFFD."""
    clean = _clean_token(token) or token
    return _utf8(clean).decode("utf-8", "replace")


def word_token_indices(tokens: Sequence[str], words: Sequence[str]) -> list[list[int]]:
    """Each word's token positions in a tokenised prompt (first occurrence; multi-token words joined).

    BPE markers ("</w>", "Ġ", "▁") are stripped and matching is case-insensitive, so "hummingbird"
    matches ["humming", "bird</w>"]. The markers still say where the prompt's words start and end, and a word
    matches whole words only: "horse" is not the end of "seahorse" ["sea", "horse</w>"] (tokens with no marker
    at all, a word-level tokenizer, are each a word). Spaces inside a word are ignored ("hot dog" matches
    "hotdog"). Matching is on UTF-8 bytes, so a word with accents or non-Latin letters ("café", "猫") is found
    also where a token holds part of a character (give such tokens as `bytes.decode("utf-8", "surrogateescape")`
    of their bytes); words and tokens are compared in Unicode's composed form (NFC), so the way an accent was
    typed does not matter.

    Args:
        tokens: the prompt's tokens as strings, special tokens included at their positions.
        words: the object words.

    Returns:
        one list of token positions per word.

    Raises:
        ValueError: naming the word and showing the tokens when a word is not found (or naming the longer
            word it is only a part of), or naming both words when two of them land on the same token (the same
            word twice: give distinct words).

    Example:
        >>> word_token_indices(["<|startoftext|>", "a</w>", "humming", "bird</w>"], ["hummingbird"])
        [[2, 3]]
    """
    if isinstance(words, str):
        raise TypeError(f"words must be a list of strings, got the string {words!r}")
    clean = [_utf8(_nfc(_clean_token(t))) for t in tokens]
    starts, ends = _word_bounds(tokens, clean)
    out = []
    for word in words:
        target = _utf8(_nfc("".join(str(word).lower().split())))
        if not target:
            raise ValueError(f"words must be non-empty strings, got {word!r}")
        found = _find_word(clean, target, starts, ends)
        if found is None:
            raise _not_found(word, tokens, _find_word(clean, target), starts, ends)
        out.append(found)
    _check_distinct(out, words, tokens)
    return out


def _word_bounds(tokens: Sequence[str], clean: list[bytes]) -> tuple[list[bool], list[bool]]:
    """(starts, ends): whether a prompt word may start / end at each token. CLIP marks a word's last piece
    ("</w>"); GPT-2 and SentencePiece its first ("Ġ", "▁", or a space once the bytes are decoded). Special
    tokens bound words on both sides; with no marker anywhere every token is a word."""
    n = len(tokens)
    special = [bool(_SPECIAL.fullmatch(t)) and t != "</w>" for t in tokens]
    last = [t.endswith("</w>") for t in tokens]
    first = [t.startswith(("Ġ", "▁")) or t[:1].isspace() for t in tokens]
    if not any(last) and not any(first):
        return [True] * n, [True] * n
    # a lone marker token ("▁" on its own) carries no letters: the word starts at the next token
    first = [f or (i > 0 and first[i - 1] and not clean[i - 1]) for i, f in enumerate(first)]
    starts = [i == 0 or special[i - 1] or last[i - 1] or first[i] for i in range(n)]
    ends = [i == n - 1 or special[i + 1] or last[i] or first[i + 1] for i in range(n)]
    return starts, ends


def _find_word(clean: list[bytes], target: bytes, starts: Sequence[bool] | None = None,
               ends: Sequence[bool] | None = None) -> list[int] | None:
    """The token positions of the first match of `target` that starts and ends where words do (anywhere when
    `starts`/`ends` are None); None when there is none."""
    for i, piece in enumerate(clean):
        if not piece or not target.startswith(piece) or (starts is not None and not starts[i]):
            continue
        acc, positions = b"", []
        for j in range(i, len(clean)):
            if not clean[j]:  # a lone marker token carries no letters
                continue
            acc += clean[j]
            positions.append(j)
            if acc == target:
                if ends is None or ends[j]:
                    return positions
                break
            if not target.startswith(acc):
                break
    return None


def _not_found(word: str, tokens: Sequence[str], inside: list[int] | None, starts: Sequence[bool],
               ends: Sequence[bool]) -> ValueError:
    if inside is not None:  # only as part of a longer word: name that word
        i, j = inside[0], inside[-1]
        while not starts[i]:
            i -= 1
        while not ends[j]:
            j += 1
        longer = "".join(_readable(t) for t in tokens[i:j + 1])
        return ValueError(f"word {word!r} is only part of the longer word {longer!r} in the prompt: give whole words "
                          f"as they are written in the prompt")
    # show the prompt's own tokens: the padding after the end token (up to 70 of them) says nothing
    shown = list(tokens)
    while len(shown) > 1 and shown[-1] == shown[-2]:
        shown.pop()
    return ValueError(f"word {word!r} not found in the prompt's tokens {[_readable(t) for t in shown]} (a word must "
                      f"be written as in the prompt: singular/plural and spelling matter)")


def _check_distinct(positions: list[list[int]], words: Sequence[str], tokens: Sequence[str]) -> None:
    """Two words on a shared token would give one map twice (Separate then pulls a map apart from itself)."""
    for i in range(len(positions)):
        for j in range(i):
            shared = sorted(set(positions[i]) & set(positions[j]))
            if shared:
                raise ValueError(
                    f"words {words[j]!r} and {words[i]!r} both land on the prompt's token(s) "
                    f"{[_readable(tokens[t]) for t in shared]} (each word's first occurrence is used): give distinct "
                    f"words, e.g. 'black cat, white cat' for 'a black cat and a white cat'")


def _heat(a: torch.Tensor) -> torch.Tensor:
    """Jet-like colormap. a: [...] in [0,1] -> [..., 3]."""
    centres = torch.tensor([0.75, 0.5, 0.25], device=a.device, dtype=a.dtype)  # red, green, blue
    return (1.5 - (4 * (a.unsqueeze(-1) - centres)).abs()).clamp(0, 1)


@torch.no_grad()
def overlay_maps(I: torch.Tensor, A: torch.Tensor, alpha: float = 0.5,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """Blend each word's attention map, as a heat colormap, over its image (for previews).

    Args:
        I: [B,3,H,W] images in [0,1].
        A: [B,n_words,h,w] maps (>= 0); each is scaled to [0,1] by its max, then upsampled bilinearly.
        alpha: weight of the heatmap.
        scale: [B] each image's maps divided by this instead (values above it draw as 1): one scale for all of
            a prompt's words (and its before and after), so a weak word's map looks weak.

    Returns:
        [B,n_words,3,H,W] in [0,1].

    Example:
        >>> overlay_maps(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 4, 4)).shape
        torch.Size([2, 3, 3, 32, 32])
    """
    if I.ndim != 4 or I.shape[1] != 3:
        raise ValueError(f"images I must be [B,3,H,W], got shape {tuple(I.shape)}")
    if A.ndim != 4 or A.shape[0] not in (1, I.shape[0]):
        raise ValueError(f"attention maps A must be [B,n_words,h,w] with B = {I.shape[0]}, got shape {tuple(A.shape)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0,1], got {alpha}")
    if A.shape[-2] < 1 or A.shape[-1] < 1:
        raise ValueError(f"attention maps A need at least one pixel, got shape {tuple(A.shape)}")
    # NaN/inf (the maps of a run that diverged, drawn in its report) as 0, not NaN pixels
    A = torch.nan_to_num(A.to(I.dtype), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    top = A.flatten(2).amax(2) if scale is None else scale.to(A)[:, None].expand(A.shape[:2])  # (B, n)
    A = (A / top[..., None, None].clamp_min(torch.finfo(A.dtype).tiny)).clamp(max=1)  # (B, n, h, w) in [0,1]
    A = F.interpolate(A, size=I.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)  # (B, n, H, W)
    heat = rearrange(_heat(A), "b n H W c -> b n c H W")
    return ((1 - alpha) * I[:, None] + alpha * heat).clamp(0, 1)  # (B, n, 3, H, W)


def maps_scale(*maps: torch.Tensor) -> torch.Tensor:
    """Each prompt's largest map value over every set given (before and after training). maps: [P,n,h,w] each ->
    [P] fp32 on the CPU: the `scale` of `overlay_maps`/`maps_tiles`, so a weak word looks weak and Enhance shows.

    Example:
        >>> maps_scale(torch.ones(2, 3, 4, 4), 2 * torch.ones(2, 3, 4, 4))
        tensor([2., 2.])
    """
    return torch.stack([A.detach().float().cpu().flatten(1).amax(1) for A in maps]).amax(0)


@torch.no_grad()
def maps_tiles(A: torch.Tensor, size: int = 128, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention maps as heat tiles on grey, as the Separate-and-Enhance node and the command line show them.

    Args:
        A: [P,n,h,w] maps (>= 0), a row of words per prompt.
        size: the tiles' longer side; they keep the maps' aspect ratio.
        scale: [P] each prompt's scale (`maps_scale`); None scales every map by its own max.

    Returns:
        [P,n,3,th,tw] in [0,1]; an all-zero map (a prompt with fewer objects than another) is a blank grey tile.

    Example:
        >>> maps_tiles(torch.rand(2, 3, 4, 8), size=16).shape
        torch.Size([2, 3, 3, 8, 16])
    """
    P, n, h, w = A.shape
    th, tw = max(round(size * h / max(h, w)), 1), max(round(size * w / max(h, w)), 1)
    A = A.float().cpu()
    grey = torch.full((P, 3, th, tw), 0.5)
    tiles = overlay_maps(grey, A, alpha=0.85, scale=scale)                       # (P, n, 3, th, tw)
    blank = (A.flatten(2).amax(2) == 0)[..., None, None, None]                   # (P, n, 1, 1, 1)
    return torch.where(blank, grey[:, None], tiles)
