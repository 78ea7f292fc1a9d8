"""Heavy benchmark (not part of `make test`): `pgconv verify` on the 3B random fixture, fp32 and bf16.

Reports, per dtype:
- verify's peak RSS against one model's weight bytes (target <= 1.2x: ours shares the reference's storage);
- verify's wall time against transformers `generate` of the same length on the same checkpoint (target <= 2.5x),
  both for the whole process (imports + load + work) and for the work after loading.
Each measurement runs in its own fresh process (peak RSS = that process's `ru_maxrss`), one at a time.

    python benchmarks/verify_3b.py [--dtypes float32,bfloat16] [--max-new-tokens 8] [--probes all] [--fixture DIR]

The fixture (`paligemma-3b-pt-224`, bf16 safetensors, ~5.9 GB) is written once under benchmarks/out/ (or --fixture).
Results are printed and saved to benchmarks/out/verify_3b.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PRESET = "paligemma-3b-pt-224"

# Child programs: each prints one JSON line with its own timings and peak RSS.
_PRELUDE = """
import json, resource, sys, time
t0 = time.perf_counter()
path, dtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
"""

VERIFY = _PRELUDE + """
probes = sys.argv[4]
from pgconv.parity.verify import verify
r = verify(path, dtype=dtype, max_new_tokens=n, probes=probes)
print(json.dumps({"wall_s": time.perf_counter() - t0, "load_s": r["timing"]["load"],
                  "work_s": r["timing"]["total"] - r["timing"]["load"], "peak_rss": peak_bytes(),
                  "weight_bytes": r["weights"]["bytes"], "passed": r["passed"], "failures": r["failures"],
                  "tokens": len(r["generation"]["reference_tokens"]), "case_timing": r["cases"][0]["timing"]}))
"""

GENERATE = _PRELUDE + """
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
from pgconv.converter.fixture import default_image
t_load = time.perf_counter()
model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
proc = AutoProcessor.from_pretrained(path)
inputs = proc(images=Image.open(default_image()).convert("RGB"), text="<image>caption en", return_tensors="pt")
inputs.pop("labels", None)
t_work = time.perf_counter()
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
end = time.perf_counter()
print(json.dumps({"wall_s": end - t0, "load_s": t_work - t_load, "work_s": end - t_work, "peak_rss": peak_bytes(),
                  "tokens": out.shape[1] - inputs["input_ids"].shape[1]}))
"""


def _child(program: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fixture(path: Path | None) -> Path:
    from pgconv.converter.fixture import make_fixture

    path = path or OUT / "fixtures" / PRESET
    if not (path / "config.json").is_file():
        print(f"writing the {PRESET} random fixture to {path} (once) ...", flush=True)
        t = time.perf_counter()
        make_fixture(path, PRESET, force=True)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--probes", default="all", choices=["all", "coarse"])
    ap.add_argument("--fixture", type=Path)
    args = ap.parse_args(argv)
    path = _fixture(args.fixture)
    results = {}
    for dtype in args.dtypes.split(","):
        n = str(args.max_new_tokens)
        v = _child(VERIFY, str(path), dtype, n, args.probes)
        g = _child(GENERATE, str(path), dtype, n)
        results[dtype] = {
            "verify": v, "generate": g,
            "rss_over_weights": v["peak_rss"] / v["weight_bytes"],
            "wall_ratio": v["wall_s"] / g["wall_s"],
            "work_ratio": v["work_s"] / g["work_s"],
        }
        r = results[dtype]
        print(f"{dtype}: verify peak RSS {v['peak_rss'] / 2**30:.2f} GiB = {r['rss_over_weights']:.2f}x weights "
              f"({v['weight_bytes'] / 2**30:.2f} GiB; target <= 1.2x); wall {v['wall_s']:.0f} s vs generate "
              f"{g['wall_s']:.0f} s = {r['wall_ratio']:.2f}x (work after load {v['work_s']:.0f} s vs "
              f"{g['work_s']:.0f} s = {r['work_ratio']:.2f}x; target <= 2.5x); verify passed: {v['passed']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "verify_3b.json").write_text(json.dumps({"preset": PRESET, "max_new_tokens": args.max_new_tokens,
                                                    "probes": args.probes, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
