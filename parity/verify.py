"""`pgconv.verify`: layer-by-layer parity of pgconv's PaliGemma against transformers' on one checkpoint.

    report = pgconv.verify()                                   # built-in tiny checkpoint + image
    report = pgconv.verify("ckpt/", images=["cat.png"], prompts=["caption en"], dtype="bfloat16", report_dir="out")
    report["passed"], report["first_divergence"]

The returned dict is exactly what `report.json` holds (schema `SCHEMA_VERSION`, see `parity.report`). Steps: load the
reference (eager) and build ours on the same weight storage; weight parity; then per (image, prompt) case the probes,
logits and generation checks of `parity.case`; finally the cases are folded into one verdict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgconv.errors import InputError

__all__ = ["verify", "SCHEMA_VERSION", "DTYPES"]

SCHEMA_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_PROMPT = "caption en"
_SEVERITY = {"ours worse": 3, "reference worse": 1, "rounding noise": 1, "match": 0}


def dtype_list(dtype: str | Sequence[str]) -> list[str]:
    """`"float32,bfloat16"` (or a list) -> the dtypes to verify in, in order, each once."""
    names = dtype.split(",") if isinstance(dtype, str) else list(dtype)
    names = [n.strip() for n in names]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise InputError(f"dtype {','.join(bad) or dtype!r} is not supported; use one or more of {', '.join(DTYPES)} "
                         "(comma-separated)")
    if len(set(names)) != len(names):
        raise InputError(f"dtype {','.join(names)!r}: a dtype is listed twice")
    return names


def _check_args(dtype: str | Sequence[str], device: str, max_new_tokens: int, probes: str) -> list[str]:
    dtypes = dtype_list(dtype)
    if probes not in ("all", "coarse"):
        raise InputError(f"probes must be 'all' or 'coarse', got {probes!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device {device!r} is not supported; use cpu or cuda")
    return dtypes


def _check_report_dir(directory: Path) -> None:
    """--report DIR must be usable before the run starts: failing after the whole run would lose it (issue 8)."""
    probe = directory.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{probe}: not a directory (--report {directory})")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{probe}: not writable (--report {directory})")


def _cases(images: Sequence[str | Path], prompts: Sequence[str]) -> list[tuple[list[Path], str]]:
    """(images, prompt) per case. A prompt takes one image, or one per `<image>` marker it holds (several images in
    one prompt, in order). The images are shared out in order when their number is what the prompts take; one
    prompt goes with each consecutive group of its images, one image fills every slot of every prompt."""
    from pgconv.converter.fixture import default_image
    from pgconv.model.processor import check_utf8
    from pgconv.model.prompts import image_slots

    texts = list(prompts) or [DEFAULT_PROMPT]
    for text in texts:
        check_utf8(text, f"prompt {text[:60]!r} (--prompt)")
    slots = [max(image_slots(t), 1) for t in texts]
    imgs = [Path(i) for i in images] or [default_image()]
    if len(imgs) == sum(slots):
        it = iter(imgs)
        return [([next(it) for _ in range(k)], t) for k, t in zip(slots, texts)]
    if len(texts) == 1 and len(imgs) % slots[0] == 0:
        k = slots[0]
        return [(imgs[i:i + k], texts[0]) for i in range(0, len(imgs), k)]
    if len(imgs) == 1:
        return [(imgs * k, t) for k, t in zip(slots, texts)]
    raise InputError(f"got {len(imgs)} images and {len(texts)} prompts taking {sum(slots)}: give one image per "
                     "prompt (or per <image> marker in it), one prompt for all images, or one image for all prompts")


def _check_lengths(cases: list[tuple[list[Path], str]], processor: Any, cfg: Any, max_new_tokens: int) -> None:
    """`check_length` for every case, before any model loads. `processor` is ours, or None when the checkpoint has
    no tokenizer.json (then the image tokens, <bos> and the newline are a lower bound on the prompt)."""
    from pgconv.model.generate import check_length

    for imgs, prompt in cases:
        if processor is not None:
            n = processor.encode([prompt], num_images=[len(imgs)])["input_ids"].shape[1]
        else:
            n = cfg.num_image_tokens * len(imgs) + 2
        check_length(n, max_new_tokens, cfg.text.max_position_embeddings, prompt=f"prompt {prompt[:60]!r} (--prompt)",
                     new="max_new_tokens (--max-new-tokens)")


def _inputs(processors: tuple[Any, Any], ours: Any, images: Sequence[Path], prompt: str, device: str,
            vocab_size: int) -> tuple[dict, dict]:
    """(the models' inputs, the processor record): transformers' processor is given the image *files* and loads them
    itself, and pgconv's processor (`ours`, None without tokenizer.json) is compared with it (`parity.inputs`)."""
    from pgconv.parity.inputs import check_processor, reference_inputs

    inputs, info = reference_inputs(processors, images, prompt, device)
    if ours is None:  # ours checks token ids against the vocabulary; transformers' model would raise an IndexError
        if (top := int(inputs["input_ids"].max())) >= vocab_size:
            raise InputError(f"prompt {prompt[:60]!r}: transformers' tokenizer gives id {top}, past the model's "
                             f"vocabulary (vocab_size {vocab_size} in config.json)")
        return inputs, info
    return inputs, check_processor(ours, processors[1], images, prompt, inputs, info)


def _resolve(checkpoint: str | Path | None) -> tuple[Path, str, Any]:
    """(checkpoint directory, the layout its tensor names use, its generation settings)."""
    from pgconv.converter.fixture import default_checkpoint
    from pgconv.converter.hub import resolve_source
    from pgconv.converter.load import check_checkpoint, generation_settings

    if checkpoint is None:
        path, trusted = default_checkpoint(), None
    else:
        path, trusted = resolve_source(checkpoint)
    if not path.is_dir():
        raise InputError(f"{checkpoint}: not a checkpoint directory (expected config.json + weights)")
    # Our reader's checks first (headers, index paths, names, shapes, tied lm_head): transformers would follow
    # paths out of the checkpoint, ignore a differing tied lm_head, and raise its own errors (issue 8).
    ckpt, cfg, plan = check_checkpoint(path, trusted)
    # verify decodes greedily with one beam on both sides (passed to transformers' generate): search and sampling
    # options are overridden there, but a processor pgconv cannot apply would make the tokens differ.
    settings = generation_settings(ckpt, cfg).for_greedy_search()
    settings.check_supported(greedy=True)
    return path, plan.src_layout, settings


def verify(
    checkpoint: str | Path | None = None,
    *,
    images: Sequence[str | Path] = (),
    prompts: Sequence[str] = (),
    dtype: str | Sequence[str] = "float32",
    device: str = "cpu",
    max_new_tokens: int = 10,
    tolerances: str | Path | None = None,
    report_dir: str | Path | None = None,
    probes: str = "all",
    max_memory: str | int | None = None,
) -> dict[str, Any]:
    """Verify pgconv's model against transformers on `checkpoint`; returns the report (see module docstring).

    `dtype` may list several dtypes (`"float32,bfloat16"`): each is a full run (both models loaded in it, every
    case), one after the other with only one pair of models in memory, folded into one report whose `cases[]`
    carry their `dtype` (bugs below bf16 rounding, e.g. an exact GELU, show only in float32; bugs of reduced
    precision, e.g. an unrounded normaliser, only in bf16/fp16).

    `max_memory` (a size such as "8GB", or bytes; default: what the machine can spare, `model.budget`): when the
    weights in a run's dtype do not fit it, that run is layer by layer (`parity.offload.load_pair`: transformers
    offloaded by accelerate, pgconv's model streamed block by block), with the same probes and checks.

    Raises `InputError` for unusable input (missing files, bad options); parity failures are in the report.
    """
    t0 = time.perf_counter()
    dtypes = _check_args(dtype, device, max_new_tokens, probes)
    from pgconv.model.budget import resolve_budget

    budget = resolve_budget(max_memory)
    if report_dir is not None:
        _check_report_dir(Path(report_dir))
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda requested but torch.cuda.is_available() is False")
    from pgconv.parity.case import run_case
    from pgconv.parity.models import build_candidate, load_reference, read_config, weight_parity
    from pgconv.parity.probes import probes_for
    from pgconv.parity.tolerances import load_tolerances

    tol = load_tolerances(tolerances)
    path, layout, settings = _resolve(checkpoint)
    cfg = read_config(path)
    from pgconv.model.processor import Processor, load_image

    # Tokenizer and preprocessor files against config.json before any weight is loaded (a directory with only a
    # sentencepiece tokenizer.model is left to transformers' processor).
    ours_processor = None
    if (path / "tokenizer.json").is_file() or not (path / "tokenizer.model").is_file():
        ours_processor = Processor.from_pretrained(path, config=cfg)
    cases = _cases(images, prompts)
    for image in dict.fromkeys(i for imgs, _ in cases for i in imgs):  # before the (maybe minutes-long) load
        load_image(image)  # missing, not a regular file (a FIFO would block), not an image, truncated, a bomb
    _check_lengths(cases, ours_processor, cfg, max_new_tokens)
    timing: dict[str, float] = {}
    from pgconv.parity.inputs import reference_processors

    processors = reference_processors(path)  # (AutoProcessor's pick, its PIL-backend twin)
    processor = processors[0]
    table = probes_for(cfg, probes)  # type: ignore[arg-type]
    results, per_dtype, streamed = [], {}, {}
    for dt in dtypes:
        t_load = time.perf_counter()
        from pgconv.model.streaming import needs_streaming, weight_bytes

        streamed[dt] = needs_streaming(weight_bytes(cfg, getattr(torch, dt)), budget)
        if streamed[dt]:  # layer by layer: accelerate's offload for the reference, ours streamed
            from pgconv.parity.offload import load_pair

            ref, ours, weights = load_pair(path, getattr(torch, dt), device, budget)
        else:
            ref = load_reference(path, getattr(torch, dt), device)
            ours = build_candidate(ref, cfg)
            weights = weight_parity(ours, ref, cfg)
        per_dtype[dt] = {**weights, "checkpoint_layout": layout}
        timing["load" if len(dtypes) == 1 else f"load_{dt}"] = round(time.perf_counter() - t_load, 4)
        for imgs, prompt in cases:
            inputs, proc_check = _inputs(processors, ours_processor, imgs, prompt, device, cfg.text.vocab_size)
            result = run_case(
                ours, ref, inputs, table, tol, dt, max_new_tokens, settings, cfg.image_token_index,
                lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=False),
            )
            results.append({"image": " + ".join(map(str, imgs)), "images": [str(i) for i in imgs],
                            "prompt": prompt, "dtype": dt, **result, "processor": proc_check})
        del ours, ref  # one pair of models at a time
    timing["total"] = round(time.perf_counter() - t0, 4)
    report = _fold(results, _weights(per_dtype), tol)
    report.update(
        checkpoint=str(checkpoint) if checkpoint is not None else f"built-in tiny fixture ({path})",
        checkpoint_path=str(path), family=cfg.family, dtype=",".join(dtypes), dtypes=dtypes, device=device,
        probes_mode=probes,
        max_new_tokens=max_new_tokens, tolerances={"source": tol.source, "version": tol.version},
        versions=_versions(), timing=timing,
        memory={"budget_bytes": budget, "layer_by_layer": streamed},
    )
    from pgconv.parity.report import finalise, write_reports

    report = finalise(report)
    if report_dir is not None:
        write_reports(report, Path(report_dir))
    return report


def _weights(per_dtype: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One dtype's weight parity as it is; several: the first's map, passed only if every dtype's did, and each
    dtype's summary under `per_dtype`."""
    first = next(iter(per_dtype.values()))
    if len(per_dtype) == 1:
        return first
    keys = ("passed", "mapped", "bit_identical", "shared", "mismatched", "nonfinite", "bytes")
    return {**first, "passed": all(w["passed"] for w in per_dtype.values()),
            "mismatched": sorted({m for w in per_dtype.values() for m in w["mismatched"]}),
            # NaN/Inf per run dtype: an fp16 cast can overflow where the stored weights are finite.
            "nonfinite": {k: v for w in per_dtype.values() for k, v in w["nonfinite"].items()},
            "per_dtype": {dt: {k: w[k] for k in keys} for dt, w in per_dtype.items()}}


def _fold(cases: list[dict[str, Any]], weights: dict[str, Any], tol: Any) -> dict[str, Any]:
    """One verdict over all cases: each probe's worst row, the first case's divergence that fails, and so on."""
    from pgconv.parity.inputs import fold_processor

    probes: list[dict[str, Any]] = []
    for rows in zip(*(c["probes"] for c in cases)):
        worst = max(rows, key=lambda r: (_SEVERITY[r["verdict"]], r["nrmse"]))
        probes.append({**worst, "case": rows.index(worst)})
    first = next(((i, c["first_divergence"]) for i, c in enumerate(cases) if c["first_divergence"]), None)
    failing = next((c for c in cases if not c["generation"]["passed"]), cases[0])
    logits = {
        "kl_mean": sum(c["logits"]["kl_mean"] for c in cases) / len(cases),
        "kl_max": max(c["logits"]["kl_max"] for c in cases),
        "top1_agreement": min(c["logits"]["top1_agreement"] for c in cases),
        "top5_overlap": min(c["logits"]["top5_overlap"] for c in cases),
        "decisive_top1_agreement": min(c["logits"]["decisive_top1_agreement"] for c in cases),
        "passed": all(c["logits"]["passed"] for c in cases),
    }
    gen = {k: failing["generation"][k] for k in ("reference_text", "candidate_text", "reference_tokens",
                                                  "candidate_tokens", "tokens_equal", "first_divergence",
                                                  "teacher_forced", "cache", "passed",
                                                  "reference_tokens_from", "config")}
    gen["tokens_equal"] = all(c["generation"]["tokens_equal"] for c in cases)
    gen["passed"] = all(c["generation"]["passed"] for c in cases)
    failures = []
    if bad := weights.get("nonfinite"):
        name, counts = next(iter(bad.items()))
        failures.append(f"weights: NaN/Inf in {len(bad)} checkpoint tensor(s), e.g. {name} ({counts['nan']} NaN, "
                        f"{counts['inf']} Inf); the metrics below are not meaningful")
    if not weights["passed"]:
        failures.append(f"weights: {len(weights['mismatched'])} mapped tensor(s) differ")
    several = len({c.get("dtype") for c in cases}) > 1

    def where(i: int) -> str:  # which dtype's run, when the report folds several
        return f" ({cases[i]['dtype']})" if several else ""

    failures += [f"probe {p['name']}: {p['verdict']}{where(p['case'])}" for p in probes if not p["passed"]]
    if not logits["passed"]:
        bad_logits = next(i for i, c in enumerate(cases) if not c["logits"]["passed"])
        failures.append("logits: KL or decisive top-1 agreement over budget" + where(bad_logits))
    if not gen["passed"]:
        bad_gen = next(i for i, c in enumerate(cases) if not c["generation"]["passed"])
        failures.append("generation: " + _gen_reason(gen) + where(bad_gen))
    processor = fold_processor(cases)
    if not processor["passed"]:
        failures.append(f"processor: pgconv's inputs differ from transformers' {processor['compared_with']} on the "
                        f"same files (token ids {'equal' if processor['tokens_equal'] else 'differ'}, pixel values "
                        f"max |diff| {processor['pixel_values_max_abs']:.3g})")
    return {
        "schema_version": SCHEMA_VERSION,
        "passed": not failures,
        "failures": failures,
        "first_divergence": None if first is None else {**first[1], "case": first[0],
                                                         **({"dtype": cases[first[0]]["dtype"]} if several else {})},
        "weights": weights,
        "probes": probes,
        "logits": logits,
        "generation": gen,
        "cases": cases,
        "processor": processor,
    }


def _gen_reason(gen: dict[str, Any]) -> str:
    fd = gen.get("first_divergence")
    reasons = []
    if fd and not fd.get("near_tie"):
        why = "lengths differ: one side stopped" if fd.get("reason") == "lengths differ" else "not a near tie"
        reasons.append(f"greedy tokens diverge at step {fd['step']} ({why})")
    if not gen["config"]["passed"]:
        reasons.append("pgconv's generation settings differ from transformers' ("
                       + "; ".join(gen["config"]["differences"]) + ")")
    if not gen["teacher_forced"]["passed"]:
        reasons.append("teacher-forced per-step KL or top-1 over budget")
    if not gen["cache"]["passed"]:
        reasons.append("cached decode disagrees with the uncached forward")
    return "; ".join(reasons) or "failed"


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import pgconv

    return {"pgconv": pgconv.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
