"""Heavy benchmark (not part of `make test`): `pgconv golden` on the 3B random fixture, its peak memory and time.

Reports, per dtype: golden's peak RSS against one model's weight bytes in that dtype (target <= 1.2x: activations
are streamed to disk as each module finishes, logits a chunk of positions at a time), its wall time against
transformers `generate` of the same length (both in fresh processes, `benchmarks.common.run_child`), and the size of
what it wrote.

    python -m benchmarks.golden_3b [--preset P] [--dtypes float32,bfloat16] [--max-new-tokens 8] [--probes all]

`--preset tiny` is the quick mode. Results are printed and saved to benchmarks/out/golden_3b.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from benchmarks.common import OUT, ensure_fixture, fixture_path, machine, run_child, warm_files
from benchmarks.verify_3b import GENERATE

QUICK_ARGS = ["--preset", "tiny", "--dtypes", "float32", "--max-new-tokens", "2"]

GOLDEN = """
import json, sys
from pgconv.parity.golden import golden
from pgconv.parity.models import read_config
doc = golden(sys.argv[1], sys.argv[2], dtype=sys.argv[3], max_new_tokens=int(sys.argv[4]), probes=sys.argv[5],
             force=True)
import math, torch
from pgconv.converter.checkpoint import open_checkpoint
ck = open_checkpoint(sys.argv[1])
n = sum(math.prod(t.meta.shape) for t in ck.tensors.values())
print(json.dumps({"weight_bytes": n * torch.finfo(getattr(torch, sys.argv[3])).bits // 8,
                  "probes": len(doc["probes"]), "tokens": len(doc["cases"][0]["generation"]["tokens"])}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.golden_3b", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paligemma-3b-pt-224")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--probes", default="all", choices=["all", "coarse"])
    args = ap.parse_args(argv)
    path = ensure_fixture(fixture_path(args.preset), args.preset)
    out_dir = OUT / f"golden-{args.preset}"
    results = {}
    for dtype in args.dtypes.split(","):
        warm_files(path)
        g = run_child([sys.executable, "-c", GOLDEN, str(path), str(out_dir), dtype, str(args.max_new_tokens),
                       args.probes])
        written = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
        warm_files(path)
        t = run_child([sys.executable, "-c", GENERATE, str(path), dtype, str(args.max_new_tokens)])
        r = results[dtype] = {"golden": g, "generate": t, "rss_over_weights": g["peak_rss"] / g["weight_bytes"],
                              "wall_ratio": g["wall_s"] / t["wall_s"], "written_bytes": written}
        print(f"{args.preset} {dtype}: golden peak RSS {g['peak_rss'] / 2**30:.2f} GiB = {r['rss_over_weights']:.2f}x "
              f"one model's weights ({g['weight_bytes'] / 2**30:.2f} GiB; target <= 1.2x); wall {g['wall_s']:.1f} s vs "
              f"transformers generate {t['wall_s']:.1f} s = {r['wall_ratio']:.2f}x; {g['probes']} probes, "
              f"{written / 2**20:.0f} MiB written", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "golden_3b.json").write_text(json.dumps(
        {"preset": args.preset, "checkpoint": str(path), "max_new_tokens": args.max_new_tokens,
         "probes": args.probes, "machine": machine(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
