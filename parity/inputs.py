"""Model inputs for verify, made by transformers from the image *files*, and pgconv's processor checked against them.

transformers' processors load a path themselves (`image_utils.load_image`: EXIF orientation, then a plain
`convert("RGB")`), so the reference gets exactly what a transformers user gets from the same file; handing it an
image pgconv opened would hide any difference in loading (alpha, EXIF, modes).

Two image processors exist in transformers 5 for SigLIP: `SiglipImageProcessorPil` (PIL, what pgconv's processor
matches bit for bit) and `SiglipImageProcessor` (torchvision-backed, `AutoProcessor`'s pick when torchvision is
installed). The torchvision one differs by design: its resize is torch's antialiased bicubic (about one uint8 level,
paligemma.md trap 7), and its decoder (`torchvision.io.decode_image`) reads no TIFF or BMP, gives 16-bit PNGs as
uint16 (then scaled by 1/255), ignores WebP EXIF orientation and handles GIF transparency its own way. So:

- the models get the inputs of `AutoProcessor`'s own pick (named in the report as `image_processor`); where that
  processor cannot read a file, the PIL one is used for the case and the reason recorded;
- pgconv's processor is compared with transformers' PIL processor on the same files and prompt: token ids, masks
  and pixel values must be identical (`processor.passed`); its largest pixel difference from what the models got
  is reported too (non-zero with the torchvision processor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgconv.errors import InputError

__all__ = ["reference_processors", "reference_inputs", "check_processor", "fold_processor"]

KEYS = ("input_ids", "pixel_values", "token_type_ids", "attention_mask")


def _backend(processor: Any) -> str:
    return str(getattr(processor.image_processor, "backend", "pil"))


def _name(processor: Any) -> str:
    return type(processor.image_processor).__name__


def reference_processors(path: Path) -> tuple[Any, Any]:
    """(AutoProcessor's default for `path`, the PIL-backend one: the same object when the default is PIL)."""
    from transformers import AutoProcessor

    try:
        default = AutoProcessor.from_pretrained(path)
        pil = default if _backend(default) == "pil" else AutoProcessor.from_pretrained(path, backend="pil")
    except (OSError, ValueError) as e:  # e.g. no preprocessor_config.json (ours defaults it, transformers does not)
        raise InputError(f"{path}: transformers cannot load the processor ({str(e).strip().splitlines()[0]})") from None
    return default, pil


def _encode(processor: Any, images: Sequence[Path], prompt: str) -> dict:
    # One <image> marker per image, up front unless the prompt places them (the processor expands each marker to
    # one image's tokens and inserts <bos> after the last one). Paths as strings: transformers loads them itself.
    text = prompt if "<image>" in prompt else "<image>" * len(images) + prompt
    return processor(images=[str(i) for i in images], text=text, return_tensors="pt")


def reference_inputs(processors: tuple[Any, Any], images: Sequence[Path], prompt: str,
                     device: str) -> tuple[dict, dict[str, Any]]:
    """(the models' inputs, {image_processor, backend, fallback}) for one case."""
    default, pil = processors
    info: dict[str, Any] = {"image_processor": _name(default), "backend": _backend(default), "fallback": None}
    try:
        enc = _encode(default, images, prompt)
    except Exception as e:  # noqa: BLE001 - torchvision's decoder raises RuntimeError on formats it lacks
        if default is pil:
            raise InputError(f"{' + '.join(map(str, images))}: transformers cannot read the image "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})") from None
        enc = _encode(pil, images, prompt)
        info.update(image_processor=_name(pil), backend="pil",
                    fallback=f"{_name(default)} failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
    # The v5 processor always returns labels (all -100 without a suffix: loss NaN); the harness never wants them
    # (paligemma.md trap 15). token_type_ids are kept and always passed (trap 3).
    return {k: enc[k].to(device) for k in KEYS}, info


def check_processor(ours: Any, pil: Any, images: Sequence[Path], prompt: str, used: dict,
                    info: dict[str, Any]) -> dict[str, Any]:
    """pgconv's processor on the case's files against transformers' PIL processor (`passed`: all identical), and
    its largest pixel difference from the inputs the models got (`used`)."""
    import torch

    got = ours([list(images)], [prompt])
    if info["backend"] == "pil":  # the models got the PIL processor's inputs
        want = {k: used[k].cpu() for k in KEYS}
    else:
        enc = _encode(pil, images, prompt)
        want = {k: enc[k] for k in KEYS}
    equal = {k: got[k].shape == want[k].shape and bool(torch.equal(got[k], want[k])) for k in KEYS}
    same_shape = got["pixel_values"].shape == want["pixel_values"].shape
    px = float((got["pixel_values"] - want["pixel_values"]).abs().max()) if same_shape else float("inf")
    ref_px = used["pixel_values"].cpu()
    to_ref = float((got["pixel_values"] - ref_px).abs().max()) if got["pixel_values"].shape == ref_px.shape \
        else float("inf")
    return {**info, "compared_with": _name(pil), "passed": all(equal.values()),
            "tokens_equal": equal["input_ids"] and equal["attention_mask"] and equal["token_type_ids"],
            "pixel_values_equal": equal["pixel_values"], "pixel_values_max_abs": px,
            "reference_pixel_values_max_abs": to_ref}


def fold_processor(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's top-level `processor`: the image processor(s) the reference used, and the worst comparison."""
    rows = [c["processor"] for c in cases if c.get("processor")]
    if not rows:
        return {"checked": False, "passed": True, "image_processor": None}
    checked = [r for r in rows if "passed" in r]
    used = dict.fromkeys((r["image_processor"], r["backend"]) for r in rows)  # in order of first use
    out: dict[str, Any] = {"checked": bool(checked), "image_processor": " + ".join(n for n, _ in used),
                           "backend": " + ".join(b for _, b in used),
                           "fallbacks": [r["fallback"] for r in rows if r.get("fallback")],
                           "passed": all(r["passed"] for r in checked)}
    if checked:
        out.update(compared_with=checked[0]["compared_with"],
                   tokens_equal=all(r["tokens_equal"] for r in checked),
                   pixel_values_max_abs=max(r["pixel_values_max_abs"] for r in checked),
                   reference_pixel_values_max_abs=max(r["reference_pixel_values_max_abs"] for r in checked))
    return out
