"""Heavy benchmark (not part of `make test`): `pgconv verify --max-memory` on a checkpoint larger than the budget.

Default: the `paligemma2-10b-pt-224` random fixture (bf16 on disk, ~20 GB) verified in float32 (~40 GB of fp32
weights) within a 16 GiB weight budget on a 24 GB machine, layer by layer (the reference through accelerate's
CPU/disk offload, pgconv's model block by block). Reports:
- verify's peak RSS (`ru_maxrss`, which also counts the checkpoint pages safetensors maps while transformers loads:
  clean page cache, reclaimed under pressure) and its peak anonymous RSS (sampled every 10 ms: the memory that is
  really the process's), against the budget and against the fp32 weights;
- verify's wall time against transformers' own big-model inference running `generate` of the same length
  (`from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)`, eager attention).
Each measurement runs in its own fresh process (`benchmarks.common.run_child`), one after the other, after the
fixture's files were read once.

    python -m benchmarks.big_verify [--preset paligemma2-10b-pt-224] [--dtype float32] [--max-memory 16GiB]
                                    [--max-new-tokens 4] [--probes coarse]
    python -m benchmarks.big_verify --quick     # a 210 MB wide tiny model under a quarter of its weights (~30 s)

The fixture is written once under benchmarks/out/fixtures/ (streaming: RSS stays small). Results are printed and
saved to benchmarks/out/big_verify[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import OUT, available_memory_bytes, ensure_fixture, fixture_path, machine, run_child, warm_files

QUICK_ARGS = ["--quick"]

# The quick mode's model: tiny-pg2 with wide decoder blocks (8 x 26 MB in fp32), registered as a preset in the child
# that writes it (tests/test_big_models.py uses the same shapes).
WIDE = """
import dataclasses, sys
from pgconv.model import config as C
from pgconv.converter.fixture import make_fixture
text = dataclasses.replace(C.TINY_PG2.text, hidden_size=256, intermediate_size=8192, num_layers=8, num_heads=4,
                           num_kv_heads=2, head_dim=64, layer_types=C.gemma2_layer_types(8))
C.PRESETS["bench-wide"] = C.TINY_PG2.replace(text=text)
make_fixture(sys.argv[1], "bench-wide", dtype="bfloat16", force=True)
"""

_SAMPLER = """
import threading, time
peak_anon = [0]
def _sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.01)
threading.Thread(target=_sample, daemon=True).start()
"""

VERIFY = _SAMPLER + """
import json, sys
from pgconv.parity.verify import verify
r = verify(sys.argv[1], dtype=sys.argv[2], max_new_tokens=int(sys.argv[3]), probes=sys.argv[4], max_memory=sys.argv[5])
print(json.dumps({"passed": r["passed"], "failures": r["failures"], "memory": r["memory"],
                  "weight_bytes": r["weights"]["bytes"], "shared": r["weights"]["shared"],
                  "mapped": r["weights"]["mapped"], "timing": r["timing"], "case_timing": r["cases"][0]["timing"],
                  "tokens": len(r["generation"]["reference_tokens"]), "peak_anon": peak_anon[0]}))
"""

GENERATE = _SAMPLER + """
import json, sys, tempfile, time
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
from pgconv.converter.fixture import default_image
from pgconv.model.budget import parse_size
path, dtype, n, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), parse_size(sys.argv[4])
t_load = time.perf_counter()
with tempfile.TemporaryDirectory() as folder:
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", device_map="auto",
        max_memory={"cpu": budget}, offload_folder=folder).eval()
    proc = AutoProcessor.from_pretrained(path)
    inputs = proc(images=Image.open(default_image()).convert("RGB"), text="<image>caption en", return_tensors="pt")
    inputs.pop("labels", None)
    t_work = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    end = time.perf_counter()
print(json.dumps({"load_s": t_work - t_load, "work_s": end - t_work, "peak_anon": peak_anon[0],
                  "tokens": out.shape[1] - inputs["input_ids"].shape[1],
                  "devices": sorted(set(map(str, model.hf_device_map.values())))}))
"""


def _quick_fixture():
    path = fixture_path("bench-wide")
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, "-c", WIDE, str(path)], check=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.big_verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paligemma2-10b-pt-224")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-memory", default="16GiB", help="verify's --max-memory (and transformers' max_memory cpu)")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--probes", default="coarse", choices=["all", "coarse"])
    ap.add_argument("--quick", action="store_true", help="a 210 MB wide tiny model under 1/4 of its weights")
    args = ap.parse_args(argv)
    if args.quick:
        path = _quick_fixture()
        budget = str(52_000_000)  # a quarter of its 210 MB of fp32 weights
        args.preset, args.max_new_tokens = "bench-wide (quick)", 2
    else:
        path = ensure_fixture(fixture_path(args.preset), args.preset)
        budget = args.max_memory
    from pgconv.model.budget import parse_size

    budget_bytes = parse_size(budget)
    info = machine()
    n = str(args.max_new_tokens)
    warm_files(path)
    v = run_child([sys.executable, "-c", VERIFY, str(path), args.dtype, n, args.probes, budget])
    warm_files(path)
    g = run_child([sys.executable, "-c", GENERATE, str(path), args.dtype, n, budget])
    result = {
        "preset": args.preset, "checkpoint": str(path), "dtype": args.dtype, "budget_bytes": budget_bytes,
        "max_new_tokens": args.max_new_tokens, "probes": args.probes, "machine": info, "verify": v, "generate": g,
        "wall_ratio": v["wall_s"] / g["wall_s"], "rss_over_budget": v["peak_rss"] / budget_bytes,
        "anon_over_budget": v["peak_anon"] / budget_bytes, "rss_over_weights": v["peak_rss"] / v["weight_bytes"],
        "available_memory_bytes_at_end": available_memory_bytes(),
    }
    print(f"{args.preset} {args.dtype} under --max-memory {budget}: verify "
          f"{'passed' if v['passed'] else 'FAILED: ' + '; '.join(v['failures'])} (layer by layer: "
          f"{v['memory']['layer_by_layer']}); peak RSS {v['peak_rss'] / 2**30:.2f} GiB (anonymous "
          f"{v['peak_anon'] / 2**30:.2f} GiB) for {v['weight_bytes'] / 2**30:.2f} GiB of weights; wall "
          f"{v['wall_s']:.1f} s vs transformers+accelerate generate {g['wall_s']:.1f} s = {result['wall_ratio']:.2f}x; "
          f"{v['tokens']} tokens", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"big_verify{'-quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not v["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
