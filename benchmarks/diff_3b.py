"""Heavy benchmark (not part of `make test`): `pgconv diff` of the 3B bf16 fixture against its fp32 conversion.

B is `pgconv convert A --to hf-5.6 --dtype float32` (another layout and dtype, the same values), so the verdict must
be `identical` and every probe bit-identical. Reports diff's peak RSS (a fresh child process, `ru_maxrss`) against one
model's weights in float32 (target <= 1.2x: the weights are compared one tensor pair at a time and the two models run
one after the other, each one's activations streamed to disk), and the time of the weight and behaviour halves.

    python -m benchmarks.diff_3b [--preset paligemma-3b-pt-224] [--dtype float32] [--max-new-tokens 4]

The fixture (~5.9 GB bf16) and its fp32 conversion (~11.7 GB) are written once under benchmarks/out/fixtures/.
Results are printed and saved to benchmarks/out/diff_3b.json. `--preset tiny` is the quick mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import OUT, available_memory_bytes, ensure_fixture, fixture_path, machine, run_child, warm_files

QUICK_ARGS = ["--preset", "tiny", "--max-new-tokens", "2"]

DIFF = """
import json, sys
from pgconv.converter.diff_weights import open_native
from pgconv.parity.diff import diff
fp32_bytes = 4 * sum(t.meta.numel for t in open_native(sys.argv[1]).tensors.values())
r = diff(sys.argv[1], sys.argv[2], dtype=sys.argv[3], max_new_tokens=int(sys.argv[4]))
c = r["behaviour"]["cases"][0]
print(json.dumps({"verdict": r["verdict"], "failures": r["failures"], "timing": r["timing"],
                  "fp32_weight_bytes": fp32_bytes, "bit_identical": c["bit_identical"], "kl_max": c["logits"]["kl_max"],
                  "tensors": r["weights"]["compared"]}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.diff_3b", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paligemma-3b-pt-224")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype both models run in")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    args = ap.parse_args(argv)
    a = ensure_fixture(fixture_path(args.preset), args.preset)
    b = a.with_name(f"{a.name}-fp32-hf-5.6")
    if not (b / "config.json").is_file():
        print(f"converting {a} to float32 ({b}, once) ...", file=sys.stderr, flush=True)
        code = ("import sys, pgconv; pgconv.convert(sys.argv[1], sys.argv[2], 'hf-5.6', dtype='float32', force=True, "
                "quiet=True)")
        subprocess.run([sys.executable, "-c", code, str(a), str(b)], check=True)
    warm_files(a)
    warm_files(b)
    r = run_child([sys.executable, "-c", DIFF, str(a), str(b), args.dtype, str(args.max_new_tokens)])
    ratio = r["peak_rss"] / r["fp32_weight_bytes"]
    print(f"{args.preset}: diff bf16 fixture vs its fp32 conversion ({r['tensors']} tensors, run in {args.dtype}): "
          f"verdict {r['verdict']}{'' if r['bit_identical'] else ' (probes NOT bit-identical)'}; peak RSS "
          f"{r['peak_rss'] / 2**30:.2f} GiB = {ratio:.2f}x one model in fp32 "
          f"({r['fp32_weight_bytes'] / 2**30:.2f} GiB; "
          f"target <= 1.2x); wall {r['wall_s']:.1f} s (weights {r['timing']['weights']:.1f} s, behaviour "
          f"{r['timing'].get('behaviour', 0):.1f} s)", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "diff_3b.json").write_text(json.dumps(
        {"preset": args.preset, "a": str(a), "b": str(b), "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
         "machine": machine(), "available_memory_bytes_at_end": available_memory_bytes(),
         "result": {**r, "rss_over_fp32_weights": ratio}}, indent=1) + "\n")
    if r["verdict"] != "identical":
        sys.exit(f"diff_3b: expected identical, got {r['verdict']}: {'; '.join(r['failures'])}")


if __name__ == "__main__":
    main()
