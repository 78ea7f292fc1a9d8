"""Which porting mistake turns A's tensor into B's? Hypotheses tested against A, cheapest first (`diagnose`).

Each hypothesis builds a tensor from A (and, for swaps, A's sibling or the same tensor of another layer, read
through `load_a`) and checks it against B at the narrower of the two stored dtypes: exactly for moves (transposes,
permutations, shifts, cuts: no arithmetic, so any converter gives the same bits after rounding to the narrower
dtype), within two units of roundoff of that dtype for arithmetic (a constant offset, a scale). The first that holds
is the finding, one line: "text.blocks.3.attn.k.weight: equals A's text.blocks.3.attn.v.weight (k and v swapped)".

Row hypotheses (shifts, cuts, per-head RoPE permutations, permuted heads) hash every row once (a random linear
hash of the bit patterns at the narrower dtype, a chunk of rows at a time) and then check the row map they imply
on the data, so a 257k-row embedding costs two passes, never a dense match.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable

import torch
from torch import Tensor

from pgconv.model.config import PaliGemmaConfig

__all__ = ["diagnose", "same", "close", "rope_permutation", "heads_of", "SIBLINGS"]

_CHUNK = 1 << 22  # elements per piece when hashing rows

# (suffix, its sibling, what a swap is called) - the pairs a converter mixes up (same shape by construction).
SIBLINGS: list[tuple[str, str, str]] = [
    ("attn.k", "attn.v", "k and v swapped"), ("attn.q", "attn.k", "q and k swapped"),
    ("attn.q", "attn.v", "q and v swapped"), ("mlp.gate", "mlp.up", "gate and up swapped"),
    ("norm1", "norm2", "the two LayerNorms swapped"),
    ("attn_norm", "mlp_norm", "the input and pre-MLP norms swapped"),
    ("post_attn_norm", "mlp_norm", "post-attention and pre-MLP norms swapped (Gemma 2's post_attention_layernorm "
                                   "is not Gemma's pre-MLP norm: paligemma.md trap 12)"),
    ("post_attn_norm", "post_mlp_norm", "the two post-norms swapped"),
    ("attn.q", "attn.o", "q and o swapped"),
]


def _u(dtype: torch.dtype) -> float:
    """Unit roundoff (half the spacing at 1): 2^-p for p mantissa bits + 1."""
    return torch.finfo(dtype).eps / 2


def _narrow(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def same(x: Tensor, b: Tensor, narrow: torch.dtype) -> bool:
    """x equals b bit for bit once both are rounded to `narrow` (NaN equal to NaN)."""
    if x.shape != b.shape:
        return False
    xs, bs = x.to(narrow), b.to(narrow)
    return bool(((xs == bs) | (xs.isnan() & bs.isnan())).all())


def close(x: Tensor, b: Tensor, narrow: torch.dtype) -> bool:
    """|x - b| within two units of roundoff of `narrow` (plus its smallest subnormal) everywhere: what rounding an
    exactly computed value into `narrow`, once on each side, can leave."""
    if x.shape != b.shape:
        return False
    u = max(_u(narrow), _u(torch.float32))
    tiny = torch.finfo(narrow).smallest_normal * torch.finfo(narrow).eps
    fx, fb = x.reshape(-1), b.reshape(-1)
    for s in range(0, fx.numel(), _CHUNK):  # float64 a piece at a time (a 3B embedding is 4 GB in float64)
        x64, b64 = fx[s:s + _CHUNK].double(), fb[s:s + _CHUNK].double()
        if not bool(((x64 - b64).abs() <= 2 * u * torch.maximum(x64.abs(), b64.abs()) + tiny).all()):
            return False
    return True


def _sample(t: Tensor, n: int = 1 << 20) -> Tensor:
    """At most n evenly strided elements, in float64 (enough to estimate a constant; `close` then checks all)."""
    flat = t.reshape(-1)
    return flat[::max(1, flat.numel() // n)].double()


def heads_of(name: str, cfg: PaliGemmaConfig) -> tuple[int, int, int] | None:
    """(axis, heads, head_dim) where a per-head tensor splits into heads (rows of q/k/v, columns of o)."""
    m = re.fullmatch(r"(vision|text)\.blocks\.\d+\.attn\.([qkvo])\.(weight|bias)", name)
    if m is None:
        return None
    stack, which, kind = m.groups()
    if stack == "vision":
        heads, hd = cfg.vision.num_heads, cfg.vision.hidden_size // cfg.vision.num_heads
    else:
        heads = cfg.text.num_kv_heads if which in "kv" else cfg.text.num_heads
        hd = cfg.text.head_dim
    if which == "o":
        return None if kind == "bias" else (1, heads, hd)
    return (0, heads, hd)


def rope_permutation(head_dim: int, to_half_split: bool = True) -> Tensor:
    """Row order within a head: new row k takes old row perm[k]. Interleaved (x0, y0, x1, y1, ...) -> half-split
    (x0, x1, ..., y0, y1, ...) is transformers' convert_llama_weights `permute` (view(h, hd/2, 2, d).transpose(1, 2));
    `to_half_split=False` gives its inverse."""
    half = head_dim // 2
    fwd = torch.tensor([2 * j + i for i in range(2) for j in range(half)])  # new row k takes old row fwd[k]
    return fwd if to_half_split else torch.argsort(fwd)


def _row_hashes(t: Tensor, narrow: torch.dtype) -> Tensor:
    """One int64 per row of t (2-D view: first axis rows), from its bits at `narrow`."""
    rows = t.reshape(t.shape[0], -1)
    width = rows.shape[1]
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(narrow).bits // 8]
    g = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(-(1 << 62), 1 << 62, (width,), generator=g, dtype=torch.int64)
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    step = max(1, _CHUNK // max(width, 1))
    for s in range(0, rows.shape[0], step):
        piece = rows[s:s + step].to(narrow)
        piece = torch.where(piece.isnan(), torch.full_like(piece, float("nan")), piece)  # one NaN pattern
        piece = piece + 0.0  # -0.0 -> +0.0: equal values, equal hashes
        out[s:s + step] = (piece.view(bits).to(torch.int64) * weights).sum(-1)
    return out


def _row_map(a: Tensor, b: Tensor, narrow: torch.dtype) -> tuple[Tensor, Tensor]:
    """For every row of b, the index of the row of a with the same bits (-1: none; the first one when several), and
    whether that row occurs in A more than once (zero padding rows: they cannot tell where a row came from)."""
    ha, hb = _row_hashes(a, narrow), _row_hashes(b, narrow)
    order = torch.argsort(ha, stable=True)
    sorted_a = ha[order]
    pos = torch.searchsorted(sorted_a, hb).clamp_max(len(ha) - 1)
    last = torch.searchsorted(sorted_a, hb, right=True).clamp_max(len(ha)) - 1
    found = sorted_a[pos] == hb
    return torch.where(found, order[pos], torch.full_like(hb, -1)), found & (last > pos)


def _describe_rows(name: str, a: Tensor, b: Tensor, narrow: torch.dtype, cfg: PaliGemmaConfig) -> str | None:
    if a.dim() == 0 or b.dim() == 0 or a.shape[1:] != b.shape[1:]:
        return None
    m, repeated = _row_map(a, b, narrow)
    na, nb = a.shape[0], b.shape[0]
    found = m >= 0
    idx = torch.arange(nb)
    n = min(na, nb)
    if nb != na and same(a[:n], b[:n], narrow):
        if nb < na:
            dropped = a[nb:].reshape(na - nb, -1)
            nonzero = int((dropped != 0).any(-1).sum())
            return (f"A's first {nb} of {na} rows (cut: {na - nb} rows dropped, {nonzero} of them nonzero)")
        extra = b[na:].reshape(nb - na, -1)
        return f"A's {na} rows followed by {nb - na} {'zero' if not bool(extra.any()) else 'new'} rows (padded)"
    if nb == na:  # a cut padded back to the old size: the first rows equal, the rest zero
        kept = int((m == idx).long().cumprod(0).sum())
        if 0 < kept < nb and not bool(b[kept:].any()):
            lost = int((a[kept:].reshape(nb - kept, -1) != 0).any(-1).sum())
            return (f"rows {kept}.. are zero: A's first {kept} rows kept, {lost} nonzero row(s) of A lost (a "
                    "vocabulary cut padded back with zeros)")
    unique = found & ~repeated
    if int(unique.sum()) < max(1, nb // 2):
        return None
    shifts = (m[unique] - idx[unique]).unique()
    if len(shifts) == 1 and int(shifts[0]) != 0:
        s = int(shifts[0])
        lost = nb - int(found.sum())
        cut = f", cut from {na} rows" if nb < na else ""
        return (f"rows shifted by {s:+d}: B row i = A row i{s:+d}{cut}"
                + (f" ({lost} row(s) of B not in A)" if lost else ""))
    if not bool(found.all()) or na != nb:
        return None
    heads = heads_of(name, cfg)
    if heads is not None and heads[0] == 0 and nb == heads[1] * heads[2]:
        _, h, hd = heads
        local = (m % hd).view(h, hd)
        head_of = (m // hd).view(h, hd)
        same_head = bool((head_of == torch.arange(h)[:, None]).all())
        for fwd, what, how in ((True, "interleaved -> half-split", "applied to a checkpoint already half-split"),
                               (False, "half-split -> interleaved", "undone / applied in reverse")):
            if same_head and hd % 2 == 0 and bool((local == rope_permutation(hd, fwd)).all()):
                return (f"rows permuted within each of the {h} heads by the RoPE {what} permutation (the q/k "
                        f"`permute` of convert_llama_weights {how})")
        if bool((local == torch.arange(hd)).all()) and bool((head_of == head_of[:, :1]).all()):
            perm = head_of[:, 0].tolist()
            return f"heads permuted: B heads 0..{h - 1} = A heads {perm}"
    moved = int((m != idx).sum())
    return f"rows permuted ({moved} of {nb} rows moved)"


def _axis_permutations(name: str, a: Tensor, b: Tensor, narrow: torch.dtype,
                       cfg: PaliGemmaConfig) -> str | None:
    """b = A (optionally with its head axis split) with axes permuted, flattened to b's shape: a transpose, or an
    einsum-layout tensor (big_vision (width, heads, head_dim)) reshaped without its transpose."""
    if a.numel() != b.numel() or a.dim() < 2:
        return None
    views: list[tuple[tuple[int, ...], tuple[str, ...]]] = [(tuple(a.shape), tuple(f"d{i}" for i in range(a.dim())))]
    heads = heads_of(name, cfg)
    if heads is not None and a.dim() == 2:
        axis, h, hd = heads
        if a.shape[axis] == h * hd:
            split = (h, hd, a.shape[1]) if axis == 0 else (a.shape[0], h, hd)
            labels = ("heads", "head_dim", "width") if axis == 0 else ("width", "heads", "head_dim")
            views.append((split, labels))
    if a.dim() == 2:
        views[0] = (views[0][0], ("rows", "cols"))
    for shape, labels in views:
        x = a.reshape(shape)
        for perm in itertools.permutations(range(len(shape))):
            if perm == tuple(range(len(shape))):
                continue
            y = x.permute(perm)
            if y.numel() != b.numel():
                continue
            if same(y.reshape(b.shape), b, narrow):
                if len(shape) == 2 and tuple(y.shape) == tuple(b.shape):
                    return "equals A transposed" + (" (a square matrix: the shape cannot show it)"
                                                   if a.shape[0] == a.shape[1] else "")
                if len(shape) == 2:
                    return (f"equals A transposed to {list(y.shape)} and reshaped to {list(b.shape)} (a transpose "
                            "missed: an einsum-layout tensor reshaped straight into the target shape)")
                order = ", ".join(labels[p] for p in perm)
                view = ", ".join(f"{lab}={n}" for lab, n in zip(labels, shape))
                flat = "" if tuple(y.shape) == tuple(b.shape) else f" and flattened to {list(b.shape)}"
                return (f"equals A viewed as ({view}) with axes permuted to ({order}){flat} (an einsum-layout "
                        "tensor reshaped without its transpose)")
    return None


def _offset_or_scale(name: str, a: Tensor, b: Tensor, narrow: torch.dtype, cfg: PaliGemmaConfig) -> str | None:
    if a.shape != b.shape or a.numel() == 0:
        return None
    a64, b64 = _sample(a), _sample(b)
    c = float((b64 - a64).median())
    if c != 0 and close(a.double() + c if a.numel() <= _CHUNK else a + c, b, narrow):
        is_norm = re.search(r"norm\d?\.weight$", name) is not None
        if is_norm and abs(c - 1) < 1e-6:
            return "B = A + 1 (the RMSNorm (1 + w) offset applied again: Gemma stores w, the model adds 1)"
        if is_norm and abs(c + 1) < 1e-6:
            return "B = A - 1 (a (1 + w) offset removed from a norm that stores w)"
        return f"B = A {'+' if c > 0 else '-'} {abs(c):.6g} (a constant offset)"
    nz = a64 != 0
    if bool(nz.any()):
        k = float((b64[nz] / a64[nz]).median())
        if k != 1 and math.isfinite(k) and close(a.double() * k if a.numel() <= _CHUNK else a * k, b, narrow):
            known = {math.sqrt(cfg.text.hidden_size): "sqrt(text width): the embedding normaliser baked in",
                     1 / math.sqrt(cfg.text.hidden_size): "1/sqrt(text width)",
                     1 / math.sqrt(cfg.text.head_dim): "1/sqrt(head_dim): the query scaling baked in",
                     math.sqrt(cfg.text.head_dim): "sqrt(head_dim)", -1.0: "negated"}
            why = next((w for v, w in known.items() if abs(k - v) <= 1e-4 * abs(v)), None)
            return f"B = A x {k:.6g}" + (f" ({why})" if why else " (scaled)")
    return None


def diagnose(name: str, a: Tensor, b: Tensor, cfg: PaliGemmaConfig,
             load_a: Callable[[str], Tensor | None]) -> str | None:
    """The transform that explains B's `name` from A's (None: no known one). `load_a(other)` reads another of A's
    tensors (None when A has no such tensor)."""
    narrow = _narrow(a.dtype, b.dtype)
    if a.shape == b.shape and same(a, b, narrow):
        return None  # nothing to explain (equal at the narrower dtype)
    if a.shape == b.shape:
        for x, y, why in SIBLINGS:
            for mine, theirs in ((x, y), (y, x)):
                other = name.replace(f".{mine}.", f".{theirs}.", 1)
                if f".{mine}." not in name or other == name:
                    continue
                t = load_a(other)
                if t is not None and same(t, b, narrow):
                    return f"equals A's {other} ({why})"
        m = re.fullmatch(r"((?:vision|text)\.blocks\.)(\d+)(\..*)", name)
        if m is not None:
            n_layers = cfg.vision.num_layers if name.startswith("vision") else cfg.text.num_layers
            for j in range(n_layers):
                other = f"{m.group(1)}{j}{m.group(3)}"
                if j == int(m.group(2)):
                    continue
                t = load_a(other)
                if t is not None and same(t, b, narrow):
                    return f"equals A's {other} (layer {m.group(2)} holds layer {j}'s weights)"
    for test in (_axis_permutations, _describe_rows, _offset_or_scale):
        found = test(name, a, b, narrow, cfg)
        if found is not None:
            return found
    return None
