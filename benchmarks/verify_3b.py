"""Heavy benchmark (not part of `make test`): `pgconv verify` on the 3B random fixture, fp32 and bf16.

Reports, per dtype:
- verify's peak RSS against one model's weight bytes (target <= 1.2x: ours shares the reference's storage);
- verify's wall time against transformers `generate` of the same length on the same checkpoint (target <= 2.5x),
  for the whole process (imports + load + work) and for the work after loading.
Each measurement runs in its own fresh process (`benchmarks.common.run_child`: peak RSS = that child's
`ru_maxrss`), one at a time, after the fixture's files were read once (same warm page cache for both).

    python -m benchmarks.verify_3b [--preset P] [--dtypes float32,bfloat16] [--max-new-tokens 8] [--probes all]
                                   [--checkpoint-dtype bfloat16|float32] [--runs N]

With `--runs N` verify and transformers alternate N times per dtype and the medians are reported (every pair is kept
under `runs` in the JSON); the RSS ratio is the worst run's.

The fixture (bf16 safetensors, ~5.9 GB for 3B) is written once under benchmarks/out/fixtures/. Results are printed
and saved to benchmarks/out/verify_3b[-CHECKPOINT_DTYPE-PROBES].json. `--preset tiny` is the quick mode (CI: the code
path runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import (OUT, available_memory_bytes, ensure_fixture, fixture_path, machine, median_run,
                               run_child, warm_files)

QUICK_ARGS = ["--preset", "tiny", "--dtypes", "float32", "--max-new-tokens", "2", "--runs", "2"]

# Each child prints one JSON line with its own timings (run_child adds wall_s and peak_rss).
VERIFY = """
import json, sys, time
t0 = time.perf_counter()
from pgconv.parity.verify import verify
r = verify(sys.argv[1], dtype=sys.argv[2], max_new_tokens=int(sys.argv[3]), probes=sys.argv[4])
print(json.dumps({"load_s": r["timing"]["load"], "work_s": r["timing"]["total"] - r["timing"]["load"],
                  "weight_bytes": r["weights"]["bytes"], "passed": r["passed"], "failures": r["failures"],
                  "tokens": len(r["generation"]["reference_tokens"]), "case_timing": r["cases"][0]["timing"],
                  "reference_tokens_from": r["cases"][0]["generation"].get("reference_tokens_from"),
                  "speculation": r["cases"][0]["generation"].get("speculation")}))
"""

GENERATE = """
import json, sys, time
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
from pgconv.converter.fixture import default_image
path, dtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t_load = time.perf_counter()
model = PaliGemmaForConditionalGeneration.from_pretrained(
    path, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
# Fault the (memory-mapped) weights in once, sequentially, as verify's NaN/Inf scan does: otherwise the first
# forward pages them in at random and the "work" below measures page faults (bf16: ~25 s instead of ~7 s).
for p in model.parameters():
    torch.aminmax(p.detach().reshape(-1))
proc = AutoProcessor.from_pretrained(path)
inputs = proc(images=Image.open(default_image()).convert("RGB"), text="<image>caption en", return_tensors="pt")
inputs.pop("labels", None)
t_work = time.perf_counter()
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
end = time.perf_counter()
print(json.dumps({"load_s": t_work - t_load, "work_s": end - t_work,
                  "tokens": out.shape[1] - inputs["input_ids"].shape[1]}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.verify_3b", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paligemma-3b-pt-224")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--probes", default="all", choices=["all", "coarse"])
    ap.add_argument("--checkpoint-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of the fixture on disk (bf16 like the hub; float32 shows verify's own overhead when "
                         "transformers loads fp32 without converting)")
    ap.add_argument("--runs", type=int, default=1, help="interleaved verify/transformers pairs; medians reported")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.checkpoint_dtype == "bfloat16" or args.preset == "tiny":
        path = ensure_fixture(fixture_path(args.preset), args.preset)
    else:
        path = fixture_path(args.preset).with_name(f"{args.preset}-{args.checkpoint_dtype}")
        if not (path / "config.json").is_file():
            code = ("import sys; from pgconv.converter.fixture import make_fixture; "
                    "make_fixture(sys.argv[1], sys.argv[2], dtype=sys.argv[3], force=True)")
            subprocess.run([sys.executable, "-c", code, str(path), args.preset, args.checkpoint_dtype], check=True)
    info = machine()
    results = {}
    for dtype in args.dtypes.split(","):
        n = str(args.max_new_tokens)
        pairs = []
        for i in range(args.runs):  # verify, transformers, verify, ...: slow drift of the VM hits both alike
            warm_files(path)
            v = run_child([sys.executable, "-c", VERIFY, str(path), dtype, n, args.probes])
            warm_files(path)
            g = run_child([sys.executable, "-c", GENERATE, str(path), dtype, n])
            pairs.append((v, g))
            if args.runs > 1:
                print(f"run {i + 1}/{args.runs} {dtype}: verify {v['wall_s']:.1f} s, transformers {g['wall_s']:.1f} s "
                      f"= {v['wall_s'] / g['wall_s']:.2f}x; peak RSS {v['peak_rss'] / v['weight_bytes']:.2f}x",
                      flush=True)
        v = median_run([p[0] for p in pairs])
        g = median_run([p[1] for p in pairs])
        r = results[dtype] = {
            "verify": v, "generate": g,
            "rss_over_weights": max(p[0]["peak_rss"] for p in pairs) / v["weight_bytes"],  # the worst run's
            "wall_ratio": v["wall_s"] / g["wall_s"],  # medians
            "work_ratio": v["work_s"] / g["work_s"],
            "runs": [{"verify_wall_s": a["wall_s"], "generate_wall_s": b["wall_s"],
                      "wall_ratio": a["wall_s"] / b["wall_s"], "rss_over_weights": a["peak_rss"] / a["weight_bytes"]}
                     for a, b in pairs],
        }
        print(f"{args.preset} {dtype}{' (medians of %d runs)' % args.runs if args.runs > 1 else ''}: verify peak RSS "
              f"{max(p[0]['peak_rss'] for p in pairs) / 2**30:.2f} GiB = {r['rss_over_weights']:.2f}x "
              f"one model's weights ({v['weight_bytes'] / 2**30:.2f} GiB; target <= 1.2x); wall {v['wall_s']:.1f} s vs "
              f"transformers generate {g['wall_s']:.1f} s = {r['wall_ratio']:.2f}x (after loading: {v['work_s']:.1f} s "
              f"vs {g['work_s']:.1f} s = {r['work_ratio']:.2f}x; target <= 2.5x); {v['tokens']} tokens; verify "
              f"{'passed' if all(p[0]['passed'] for p in pairs) else 'FAILED: ' + '; '.join(v['failures'])}",
              flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = "" if (args.checkpoint_dtype, args.probes) == ("bfloat16", "all") else f"-{args.checkpoint_dtype}-{args.probes}"
    (OUT / f"verify_3b{tag}.json").write_text(json.dumps(
        {"preset": args.preset, "checkpoint": str(path), "max_new_tokens": args.max_new_tokens, "probes": args.probes,
         "machine": info,
         "available_memory_bytes_at_end": available_memory_bytes(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
