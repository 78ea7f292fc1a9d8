"""The PaliGemma processor's files, read strictly: processor_config.json / preprocessor_config.json (the image
options, as transformers 5 finds and defaults them), tokenizer_config.json and special_tokens_map.json (special
token contents). Every value transformers would fail on or silently misuse is a one-line `InputError` naming the
file; `model/processor.py` builds the `Processor` from what these return."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from pgconv.errors import InputError, json_type
from pgconv.model.hf_config import MAX_IMAGE_TOKENS as CONFIG_MAX_IMAGE_TOKENS
from pgconv.model.images import require_regular_file

__all__ = ["read_json", "image_processor_config", "preprocessor_options", "token_content", "MAX_IMAGE_SIDE",
           "MAX_IMAGE_TOKENS"]


def token_content(value: Any, default: str) -> str:
    if isinstance(value, dict):  # tokenizer_config.json may store AddedToken dicts
        return str(value.get("content", default))
    return str(value) if value else default


def read_json(path: Path) -> dict:
    """A JSON object from `path`, {} when the file does not exist; anything else unusable is an `InputError`."""
    if not require_regular_file(path, "JSON file", missing_ok=True):  # a FIFO would block in read_text
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # json's C decoder recurses once per nesting level
        raise InputError(f"{path}: cannot read JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise InputError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {json_type(data)}")
    return data


def image_processor_config(d: Path) -> tuple[Path, dict]:
    """(file, image processor settings) as transformers 5 finds them: the `image_processor` object nested in
    processor_config.json (what its PaliGemmaProcessor.save_pretrained writes, with no preprocessor_config.json),
    else preprocessor_config.json (the hub's and transformers 4.x's file)."""
    proc_path = d / "processor_config.json"
    proc = read_json(proc_path)
    nested = proc.get("image_processor")
    if nested is not None:
        if not isinstance(nested, dict):
            raise InputError(f"{proc_path}: image_processor must be a JSON object, got {json_type(nested)}")
        return proc_path, nested
    pre_path = d / "preprocessor_config.json"
    return pre_path, read_json(pre_path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `true` for a number is a broken file, not 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Largest image side / image-token count we accept from a preprocessor_config.json without a config.json to check it
# against: PaliGemma uses 224/448/896 (256/1024/4096 tokens); far larger values only allocate gigabytes per image.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_TOKENS = CONFIG_MAX_IMAGE_TOKENS  # the same cap as config.json's image size / patch size


def preprocessor_options(pre: dict, path: Path) -> dict[str, Any]:
    """Checked image options from preprocessor_config.json (`path`), with transformers' defaults for missing keys.

    transformers would fail on (or silently misuse) every bad value refused here: a resample that is no PIL filter,
    a mean/std of the wrong length, a zero std (inf/NaN pixels), a string for a boolean (truthy)."""

    def bad(key: str, what: str) -> InputError:
        return InputError(f"{path}: {key} must be {what}, got {json.dumps(pre[key])[:60]}")

    opts: dict[str, Any] = {}
    def get(key: str, default: Any) -> Any:  # null means transformers' default, like a missing key
        value = pre.get(key)
        return default if value is None else value

    resample = get("resample", Image.Resampling.BICUBIC)
    if not _is_int(resample) or resample not in {int(r) for r in Image.Resampling}:
        filters = ", ".join(f"{int(r)}={r.name}" for r in sorted(Image.Resampling))
        raise bad("resample", f"a PIL resampling filter ({filters})")
    opts["resample"] = int(resample)
    opts["rescale_factor"] = get("rescale_factor", 1 / 255)
    if not _is_number(opts["rescale_factor"]) or opts["rescale_factor"] <= 0:
        raise bad("rescale_factor", "a finite positive number")
    for key in ("image_mean", "image_std"):
        value = get(key, [0.5, 0.5, 0.5])
        # A single number applies to every channel, as in transformers' normalize().
        values = value if isinstance(value, list) else [value]
        if len(values) != (3 if isinstance(value, list) else 1) or not all(map(_is_number, values)):
            raise bad(key, "a list of 3 finite numbers (or one number for every channel)")
        if key == "image_std" and any(v <= 0 for v in values):
            raise bad(key, "positive (pixels are divided by it)")
        opts[key] = value
    for key in ("do_resize", "do_rescale", "do_normalize"):
        value = pre.get(key)
        if value is not None and not isinstance(value, bool):
            raise bad(key, "true or false")
        opts[key] = value is not False  # null (or missing) means transformers' default, true
    # do_convert_rgb differs: transformers keeps a null as None, which its processors read as "do not convert"
    # (hub configs say null); only a missing key gets the class default, true.
    value = pre.get("do_convert_rgb", True)
    if value is not None and not isinstance(value, bool):
        raise bad("do_convert_rgb", "true, false or null")
    opts["do_convert_rgb"] = bool(value)
    size = pre.get("size")
    if size is not None and not isinstance(size, dict):
        raise bad("size", 'an object {"height": H, "width": W}')
    for side in ("height", "width"):
        value = (size or {}).get(side)
        if value is not None and (not _is_int(value) or not 1 <= value <= MAX_IMAGE_SIDE):
            raise InputError(f"{path}: size.{side} must be an integer from 1 to {MAX_IMAGE_SIDE}, "
                             f"got {json.dumps(value)[:60]}")
    if size and "height" in size and "width" in size:
        opts["image_size"] = (int(size["height"]), int(size["width"]))
    n = pre.get("image_seq_length")
    if n is not None and (not _is_int(n) or not 1 <= n <= MAX_IMAGE_TOKENS):
        raise bad("image_seq_length", f"an integer from 1 to {MAX_IMAGE_TOKENS}")
    opts["image_seq_length"] = n
    return opts
