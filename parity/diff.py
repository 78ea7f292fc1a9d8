"""`pgconv diff A B`: is checkpoint B the same model as A? (conversion bugs that `verify` cannot see)

`verify` loads one checkpoint into two implementations; a conversion bug (a transposed projection, k and v swapped,
a norm offset applied twice, an fp16 overflow) is loaded identically by both and passes. `diff` compares two
checkpoints, in any layouts and dtypes pgconv reads:

- weights (`converter.diff_weights`): both mapped to native names and compared one tensor pair at a time; every
  differing tensor gets a diagnosis (`converter.diagnose`);
- behaviour: both run through the same implementation (transformers eager, or `impl="pgconv"`) on the same inputs,
  one model after the other (each one's activations streamed to a temporary file, the model freed before the next
  loads): per-probe divergence of B from A (`parity.dump.compare_tensors`, A as the golden, verify's budgets for
  the run dtype: the first probe over budget is the first divergence), KL(A || B) of the logits at every position
  (mean, p99, max), top-1 agreement and greedy-token agreement: llama.cpp's KL-divergence numbers, per case.

Verdicts (`report["verdict"]`): `identical` (every tensor holds A's values, whatever the stored dtypes; the behaviour
is then bit-identical too), `equivalent within <dtype> rounding` (every differing tensor is A rounded to <dtype>, see
`converter.diff_weights` for the derived bound; the behaviour budget is what a pure cast of A produces: when B holds
exactly A rounded to nearest, B *is* that cast and its KL is reported as the cast's cost; when some ties were
broken the other way, A rounded to nearest (ties to even) is run too and B's per-probe nrmse and logits KL must stay
within k x the cast's + floor, with verify's arbitration k and floor for the run dtype), or `differs` (exit 1): a
finding per differing tensor, missing or extra tensors, config differences, or behaviour over the cast's budget.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgconv.errors import InputError

__all__ = ["diff", "DIFF_SCHEMA", "IMPLS"]

DIFF_SCHEMA = 1
IMPLS = ("transformers", "pgconv")


class _Lazy(Mapping):
    """A safetensors file as a read-only mapping that loads a tensor when asked (compare_tensors' golden/dump)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._f = safe_open(str(path), "pt")
        self._keys = list(self._f.keys())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _native_state(src: Any, dtype: torch.dtype, cast: dict[str, torch.dtype] | None = None) -> dict[str, Tensor]:
    """Every tensor of `src` in `dtype`, read one at a time; `cast` rounds named ones through a dtype first."""
    out = {}
    for name, t in src.tensors.items():
        if name == "lm_head.weight" and src.cfg.tie_word_embeddings:
            continue  # a tied head stored anyway (read leniently, equal to the embedding): the model ties it
        x = t.load()
        if cast and name in cast:
            x = x.to(cast[name])
        out[name] = x.to(dtype) if x.is_floating_point() else x
        del x
    return out


def _load(src: Any, impl: str, dtype: torch.dtype, device: str, cast: dict[str, torch.dtype] | None = None) -> Any:
    """The model of `src` in `impl`, built from its native tensors (any layout: transformers is handed its own
    in-memory names, so a big_vision or native checkpoint runs in transformers as a converted one would)."""
    state = _native_state(src, dtype, cast)
    if impl == "pgconv":
        from pgconv.converter.load import build_model

        return build_model(src.cfg, state, device)
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from pgconv.converter.layouts import from_native
    from pgconv.model.hf_config import to_hf_config
    from pgconv.parity.models import REF_LAYOUT

    raw = json.loads(json.dumps(src.config if src.config is not None else to_hf_config(src.cfg)))
    # No SigLIP head: native tensors never hold one and PaliGemma never uses its output (transformers would build
    # it with random values and print a report of missing weights).
    raw.setdefault("vision_config", {})["vision_use_head"] = False
    config = PaliGemmaConfig.from_dict(raw)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=from_native(state, src.cfg, REF_LAYOUT), dtype=dtype,
            attn_implementation="eager")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


@torch.no_grad()
def _run(model: Any, impl: str, cfg: Any, inputs: dict[str, Tensor], table: list, out: Path,
         max_new_tokens: int) -> list[int]:
    """Every probe of one forward written to `out` (streamed for transformers); the greedy tokens returned."""
    from pgconv.parity.golden import _activations, _save

    if impl == "transformers":
        from pgconv.parity.generation import reference_greedy

        _activations(model, inputs, table, out)
        return reference_greedy(model, inputs, max_new_tokens)[0]
    from pgconv.model.generate import generate
    from pgconv.parity.candidates import PgconvCandidate

    cand = PgconvCandidate.__new__(PgconvCandidate)  # the adapter's run() on a model built here, not loaded by path
    cand.name, cand.dtype, cand.model = "pgconv", model.text.embed.weight.dtype, model
    cand.table = {p.name: p for p in table}
    _save(out, cand.run(inputs, [p.name for p in table]))
    cand.rec = None
    return generate(model, inputs["input_ids"], inputs["pixel_values"].to(cand.dtype), inputs["token_type_ids"],
                    inputs["attention_mask"], max_new_tokens=max_new_tokens)[0].tolist()


def _logits(b: Tensor, a: Tensor) -> dict[str, Any]:
    """KL(A || B) per position (nats), its mean / p99 / max, top-1 agreement: llama.cpp's --kl-divergence numbers."""
    from pgconv.parity.metrics import logit_positions

    per = logit_positions(b.reshape(-1, b.shape[-1]), a.reshape(-1, a.shape[-1]))
    kl = torch.tensor(per["kl"], dtype=torch.float64)
    return {"positions": len(per["kl"]), "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
            "kl_max": float(kl.max()), "top1_agreement": sum(per["top1"]) / len(per["top1"]),
            "max_prob_diff": max(per["dp"])}


def _greedy(a: list[int], b: list[int]) -> dict[str, Any]:
    from pgconv.parity.generation import first_divergence

    step = first_divergence(a, b)
    n = max(len(a), len(b), 1)
    return {"a_tokens": a, "b_tokens": b, "first_divergence": step,
            "agreement": (n if step is None else step) / n}


def _check(dtype: str, impl: str, device: str, max_new_tokens: int, report_dir: Any) -> None:
    from pgconv.parity.verify import _check_args, _check_report_dir

    if len(_check_args(dtype, device, max_new_tokens, "all")) != 1:
        raise InputError(f"dtype {dtype!r}: diff runs in one dtype")
    if impl not in IMPLS:
        raise InputError(f"impl {impl!r}: use one of {', '.join(IMPLS)}")
    if report_dir is not None:
        _check_report_dir(Path(report_dir))


def _inputs(a: Any, b: Any, images: Sequence[str | Path], prompts: Sequence[str], device: str) -> list[dict]:
    """Each case's model inputs, from transformers' processor of A (B's when A has no tokenizer files)."""
    from pgconv.model.processor import load_image
    from pgconv.parity.inputs import reference_inputs, reference_processors
    from pgconv.parity.verify import _cases

    cases = _cases(images, prompts)
    for image in dict.fromkeys(i for imgs, _ in cases for i in imgs):
        load_image(image)  # missing, not a regular file, not an image: one line, before any model loads
    root = next((s.root for s in (a, b) if any((s.root / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))),
                None)
    if root is None:
        raise InputError(f"{a.path}, {b.path}: neither has a tokenizer (tokenizer.json or tokenizer.model) to make "
                         "the models' inputs; copy one next to A or use --weights-only")
    processors = reference_processors(root)
    out = []
    for imgs, prompt in cases:
        inputs, _ = reference_inputs(processors, imgs, prompt, device)
        if (top := int(inputs["input_ids"].max())) >= min(a.cfg.text.vocab_size, b.cfg.text.vocab_size):
            raise InputError(f"prompt {prompt[:60]!r}: token id {top} is past the vocabulary of A or B")
        out.append({"images": [str(i) for i in imgs], "prompt": prompt, "inputs": inputs, "processor": str(root)})
    return out


def _behaviour(a: Any, b: Any, cases: list[dict], impl: str, dtype: str, device: str, max_new_tokens: int,
               cast: dict[str, torch.dtype] | None, tol: Any) -> dict[str, Any]:
    from pgconv.parity.dump import compare_tensors
    from pgconv.parity.golden import probe_schema
    from pgconv.parity.probes import probes_for

    table = probes_for(a.cfg, "all")
    schema = probe_schema(table)
    runs = [("a", a, None), ("b", b, None)] + ([("cast", a, cast)] if cast else [])
    tokens: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="pgconv-diff-") as tmp:
        for label, src, rounding in runs:  # one model resident at a time
            model = _load(src, impl, getattr(torch, dtype), device, rounding)
            tokens[label] = [_run(model, impl, src.cfg, c["inputs"], table, Path(tmp) / f"{label}{k}.safetensors",
                                  max_new_tokens) for k, c in enumerate(cases)]
            del model
            gc.collect()
        out = []
        for k, c in enumerate(cases):
            acts = {label: _Lazy(Path(tmp) / f"{label}{k}.safetensors") for label, _, _ in runs}
            inputs = {n: t.cpu() for n, t in c["inputs"].items()}  # the activations come back on the CPU
            res = compare_tensors(schema, acts["a"], acts["b"], inputs, a.cfg.image_token_index, dtype, tol, "B")
            case = {"case": k, "prompt": c["prompt"], "images": c["images"], **res,
                    "bit_identical": all(r["max_abs"] == 0 for r in res["probes"]),
                    "logits": _logits(acts["b"]["logits"], acts["a"]["logits"]),
                    "greedy": _greedy(tokens["a"][k], tokens["b"][k])}
            if cast:
                ref = compare_tensors(schema, acts["a"], acts["cast"], inputs, a.cfg.image_token_index, dtype, tol,
                                      "A cast")
                case["cast"] = {"probes": {r["name"]: r["nrmse"] for r in ref["probes"]},
                                "logits": _logits(acts["cast"]["logits"], acts["a"]["logits"])}
            del acts
            out.append(case)
    return {"impl": impl, "dtype": dtype, "cases": out, "cast_run": bool(cast)}


def _judge(weights: dict[str, Any], behaviour: dict[str, Any] | None, tol: Any, dtype: str) -> tuple[str, list[str]]:
    """(verdict, failures): see the module docstring."""
    failures = list(weights["findings"])
    if failures:
        return "differs", failures
    if weights["status"] == "identical":
        for c in (behaviour or {}).get("cases", []):
            if not c["bit_identical"] or c["greedy"]["first_divergence"] is not None:
                where = next((r["name"] for r in c["probes"] if r["max_abs"] != 0), "the greedy tokens")
                failures.append(f"case {c['case']}: identical weights gave different results (first at {where}): "
                                "the implementation is not deterministic here")
        return ("differs" if failures else "identical"), failures
    verdict = f"equivalent within {weights['rounding_dtype']} rounding"
    for c in (behaviour or {}).get("cases", []):
        if "cast" not in c:
            continue  # B holds exactly A rounded to nearest: its behaviour is the cast's own
        k = float(tol.table["arbitration"][dtype]["k"])
        for r in c["probes"]:
            budget = tol.probe(r["kind"], dtype)
            limit = k * c["cast"]["probes"].get(r["name"], 0.0) + budget["floor"]
            r["cast_budget"] = limit
            if r["kind"] != "mask" and r["nrmse"] > limit:
                failures.append(f"case {c['case']}: probe {r['name']}: nrmse {r['nrmse']:.3g} over what rounding A "
                                f"to nearest gives ({c['cast']['probes'].get(r['name'], 0.0):.3g}; budget {limit:.3g})")
        floor = float(tol.table["arbitration"][dtype]["floor_fraction"]) * tol.section("logits", dtype)["kl_mean"]
        kl_limit = k * c["cast"]["logits"]["kl_mean"] + floor
        c["logits"]["cast_budget_kl_mean"] = kl_limit
        if c["logits"]["kl_mean"] > kl_limit:
            failures.append(f"case {c['case']}: logits KL mean {c['logits']['kl_mean']:.3g} over what rounding A to "
                            f"nearest gives ({c['cast']['logits']['kl_mean']:.3g}; budget {kl_limit:.3g})")
    return ("differs" if failures else verdict), failures


def diff(
    a: str | Path,
    b: str | Path,
    *,
    images: Sequence[str | Path] = (),
    prompts: Sequence[str] = (),
    dtype: str = "float32",
    impl: str = "transformers",
    weights_only: bool = False,
    report_dir: str | Path | None = None,
    device: str = "cpu",
    max_new_tokens: int = 10,
    tolerances: str | Path | None = None,
    from_a: str | Path | None = None,
    from_b: str | Path | None = None,
) -> dict[str, Any]:
    """Is B the same model as A? Returns the report (what report.json holds; module docstring for the verdicts).
    `from_a` / `from_b` read A / B through a spec (as `pgconv convert --from`: a file a spec with offsets wrote).
    Raises `InputError` for unusable input, before any model loads; a difference is in the report."""
    from pgconv.converter.diff_weights import diff_weights, open_native
    from pgconv.parity.tolerances import load_tolerances
    from pgconv.parity.verify import _versions

    t0 = time.perf_counter()
    _check(dtype, impl, device, max_new_tokens, report_dir)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda requested but torch.cuda.is_available() is False")
    tol = load_tolerances(tolerances)
    src_a, src_b = open_native(a, from_a), open_native(b, from_b)
    cases = None if weights_only else _inputs(src_a, src_b, images, prompts, device)
    timing = {}
    weights = diff_weights(src_a, src_b)
    timing["weights"] = round(time.perf_counter() - t0, 4)
    behaviour, skipped = None, None
    shapes_differ = [r["name"] for r in weights["tensors"] if r["shape_a"] != r["shape_b"]]
    if weights_only:
        skipped = "--weights-only"
    elif weights["missing"] or weights["extra"] or shapes_differ:
        skipped = "B's tensors do not fit A's model (" + ", ".join((weights["missing"] + weights["extra"] +
                                                                    shapes_differ)[:3]) + "): no common forward"
    else:
        rounded = [r for r in weights["tensors"] if r["status"] == "rounding"]
        # A rounded to nearest is run only when B broke some ties the other way (else B *is* that cast).
        ties = any(r.get("cast", {}).get("ties_other_way") for r in rounded)
        cast = {r["name"]: getattr(torch, r["ulp_dtype"]) for r in rounded} \
            if ties and weights["status"] == "rounding" else None
        t1 = time.perf_counter()
        behaviour = _behaviour(src_a, src_b, cases, impl, dtype, device, max_new_tokens, cast, tol)
        timing["behaviour"] = round(time.perf_counter() - t1, 4)
    verdict, failures = _judge(weights, behaviour, tol, dtype)
    timing["total"] = round(time.perf_counter() - t0, 4)
    first = next(({**c["first_divergence"], "case": c["case"]} for c in (behaviour or {}).get("cases", [])
                  if c["first_divergence"]), None)
    report = {
        "tool": "pgconv diff", "schema_version": DIFF_SCHEMA, "verdict": verdict, "passed": verdict != "differs",
        "failures": failures, "a": str(a), "b": str(b), "layouts": weights["layouts"], "family": src_a.cfg.family,
        "dtype": dtype, "impl": impl, "device": device, "weights": weights, "behaviour": behaviour,
        "behaviour_skipped": skipped, "first_divergence": first,
        "tolerances": {"source": tol.source, "version": tol.version}, "versions": _versions(), "timing": timing,
    }
    from pgconv.parity.report import finalise
    from pgconv.parity.report_diff import write_diff_reports

    report = finalise(report)
    if report_dir is not None:
        write_diff_reports(report, Path(report_dir))
    return report
