"""Where inference time goes: torch.profiler over one generation, split into first token and decode steps.

    python -m benchmarks.profile_inference [--impl ours|eager|sdpa] [--dtype bfloat16] [--threads 2]
                                           [--fixture DIR] [--steps 8] [--rows 20]

Profiles one `generate` of 1 + steps tokens; a profiler marker emitted when the first token arrives splits the
operators into the first token (vision + prefill + head) and the decode steps (divided by the steps). Operators are
grouped into weight products (mm/addmm/linear: GEMM at prefill, GEMV at decode), attention (bmm, softmax),
element-wise / norms and the rest. A tool, not a benchmark: `python -m benchmarks` does not run it. Writes
benchmarks/out/profile-<impl>-<dtype>.md. The profiler adds a few microseconds per operator, which inflates the
small-operator share a little.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import OUT, fixture_path

__all__ = ["main", "category"]

GROUPS = {
    "weight products": ("aten::mm", "aten::addmm", "aten::addmv", "aten::mv", "mkldnn::_linear_pointwise"),
    "attention": ("aten::bmm", "aten::_softmax", "aten::_safe_softmax",
                  "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution"),
}


def category(op: str) -> str:
    for name, ops in GROUPS.items():
        if op in ops:
            return name
    return "element-wise, norms, copies, other"


MARKER = "pgconv::first_token"


def _profile(fn):
    """(first-token wall s, decode wall s, {phase: {(operator, shapes): self seconds}}) of `fn(on_first)`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    stamps: list[float] = []

    def on_first() -> None:
        stamps.append(time.perf_counter())
        with torch.profiler.record_function(MARKER):
            pass

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        fn(on_first)
        end = time.perf_counter()
    events = list(prof.events())
    boundary = next(e.time_range.start for e in events if e.name == MARKER)
    times: dict[str, dict] = {"first": defaultdict(float), "decode": defaultdict(float)}
    for evt in events:
        if evt.name != MARKER:
            phase = "first" if evt.time_range.start < boundary else "decode"
            times[phase][(evt.name, str(evt.input_shapes))] += evt.self_cpu_time_total / 1e6
    return stamps[0] - start, end - stamps[0], times


def _table(title: str, wall: float, times: dict, rows: int, threads: int) -> list[str]:
    total = sum(max(v, 0.0) for v in times.values())
    lines = [f"#### {title}: {wall:.3f} s wall (profiled), {total:.3f} s operator self time over {threads} thread(s)",
             "", "| group | share |", "|---|---:|"]
    groups: dict[str, float] = defaultdict(float)
    for (op, _), t in times.items():
        groups[category(op)] += max(t, 0.0)
    lines += [f"| {g} | {t / total:.1%} |" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["", "| operator | input shapes | self s | share |", "|---|---|---:|---:|"]
    for (op, shapes), t in sorted(times.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"| {op} | {shapes[:90]} | {t:.4f} | {t / total:.1%} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="ours", choices=("ours", "eager", "sdpa"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixture", type=Path, default=fixture_path("paligemma-3b-pt-224"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args(argv)
    import torch

    from benchmarks.inference import _inputs

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = _inputs(args.fixture)
    if args.impl == "ours":
        from pgconv.converter.load import load
        from pgconv.model.generate import generate

        model = load(args.fixture, dtype=dtype)

        def run(n: int, on_first=lambda: None) -> None:
            seen: list[int] = []

            def on_token(_) -> None:
                if not seen:
                    on_first()
                seen.append(1)
            generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["token_type_ids"],
                     inputs["attention_mask"], max_new_tokens=n, eos_token_ids=[], on_token=on_token)
    else:
        from transformers import PaliGemmaForConditionalGeneration

        model = PaliGemmaForConditionalGeneration.from_pretrained(args.fixture, dtype=dtype,
                                                                  attn_implementation=args.impl)
        model.eval().generation_config.eos_token_id = None

        class Streamer:  # put() gets the prompt, then each new token
            def __init__(self, on_first) -> None:
                self.calls, self.on_first = 0, on_first

            def put(self, _) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.on_first()

            def end(self) -> None:
                pass

        def run(n: int, on_first=lambda: None) -> None:
            model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, streamer=Streamer(on_first))
    run(2)  # warm-up
    first_wall, decode_wall, times = _profile(lambda on_first: run(1 + args.steps, on_first))
    decode = {k: v / args.steps for k, v in times["decode"].items()}
    label = "ours" if args.impl == "ours" else f"transformers {args.impl}"
    prompt = inputs["input_ids"].shape[1]
    md = [f"### Profile: {label}, {args.dtype}, {args.threads} threads, prompt {prompt} tokens", ""]
    md += _table("First token (vision + prefill + head)", first_wall, times["first"], args.rows, args.threads)
    md += _table(f"One decode step (mean of {args.steps})", decode_wall / args.steps, decode, args.rows, args.threads)
    text = "\n".join(md)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"profile-{args.impl}-{args.dtype}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
