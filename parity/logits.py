"""Logits from both models' final hidden states, a few positions at a time: full-vocabulary logits never exist.

At 3B a (T, 257216) logit tensor is 270 MB in fp32 (140 MB bf16) per side, plus its softmax temporaries; every
logit check needs only per-position numbers. So both forwards stop at their final norm (ours: `return_hidden`;
the reference: `logits_to_keep=1`), and one pass over position chunks computes each side's logits with its own head
(ours: `PaliGemma.logits`; the reference: its `lm_head` and final soft-cap exactly as its forward applies them) and
keeps, per position: the logit metrics (KL, top-1, top-5, margin, Δp), the tensor row stats of the `logits` probe
end to end and teacher forced (our head on the reference's hidden states, skipped when those are bitwise ours), and
the rows the generation checks read (positions T-1 .. T+n-2, which predict the reference's n tokens).
Per-position results do not depend on the chunking (tests/test_parity_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pgconv.parity.metrics import join_stats, logit_positions, position_stats

__all__ = ["reference_head", "LogitsPass", "logits_pass", "ROWS"]

# Most positions per chunk: 144 x 257216 x 4 B = 148 MB per logit tensor in fp32, two alive at a time (plus, for
# Gemma 2, the temporaries of our head's final soft-cap, `model.ops`, which keeps autograd usable). Fewer rows
# run the head products slower (3B fp32 on 2 cores: transformers' MKL head 11.6 ms/row at 64 rows, 8.6 at 137,
# 7.8 at 273; our oneDNN head 6.3 / 5.4 / 5.5), more rows cost memory next to the model.
ROWS = 144


def reference_head(ref: nn.Module, hidden: Tensor) -> Tensor:
    """transformers' PaliGemmaForConditionalGeneration head on final hidden states, as its forward applies it."""
    logits = ref.lm_head(hidden)
    cap = getattr(ref.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:  # in place (no gradient here): the same element-wise ops, no chunk-sized temporaries
        logits.div_(cap).tanh_().mul_(cap)
    return logits


@dataclass
class LogitsPass:
    per: dict[str, list]  # per-position logit metrics (`metrics.logit_positions`), ours vs the reference
    e2e: dict[str, Tensor]  # per-position row stats, our logits vs the reference's
    contrib: dict[str, Tensor] | None  # our head on the reference's hidden states vs the reference; None = same input
    width: int  # vocabulary size (row width of the stats)
    ours_rows: Tensor  # our logits at the kept positions (n, V), in the model dtype
    ref_rows: Tensor
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def logits_pass(ours: nn.Module, ref: nn.Module, ours_hidden: Tensor, ref_hidden: Tensor, keep: slice,
                rows: int = ROWS) -> LogitsPass:
    """One pass over position chunks of (1, T, d) final hidden states (see the module docstring); `keep` selects
    the positions whose logits are returned."""
    same = (ours_hidden.shape == ref_hidden.shape and ours_hidden.dtype == ref_hidden.dtype
            and bool(torch.equal(ours_hidden, ref_hidden)))
    per: dict[str, list] = {}
    e2e, contrib = [], []
    kept_o, kept_r = [], []
    t = ours_hidden.shape[1]
    lo, hi = keep.start, keep.stop
    width = 0
    step = -(-t // -(-t // rows)) if t else rows  # equal chunks of at most `rows` (273 -> 137 + 136, not 144 + 129)
    for start in range(0, t, step):
        stop = min(start + step, t)
        o = ours.logits(ours_hidden[:, start:stop])
        r = reference_head(ref, ref_hidden[:, start:stop])
        width = r.shape[-1]
        for k, v in logit_positions(o, r).items():
            per.setdefault(k, []).extend(v)
        e2e.append(position_stats(o, r))
        if start < hi and stop > lo:
            a, b = max(lo, start) - start, min(hi, stop) - start
            kept_o.append(o[0, a:b].clone())
            kept_r.append(r[0, a:b].clone())
        del o  # before the teacher-forced head: two chunk-sized logit tensors at a time, not three
        if not same:
            contrib.append(position_stats(ours.logits(ref_hidden[:, start:stop]), r))
        del r
    return LogitsPass(per=per, e2e=join_stats(e2e), contrib=None if same else join_stats(contrib), width=width,
                      ours_rows=torch.cat(kept_o), ref_rows=torch.cat(kept_r))
