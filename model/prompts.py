"""The text side of transformers 5.24's `PaliGemmaProcessor`: which images go with which prompt, the prompt string it
tokenises, and the training `labels`. No transformers imports; `pgconv.model.processor` tokenises and pads.

Images per prompt (transformers' `prepare_inputs_layout` and its placeholder count check):
- a prompt without `<image>` gets its images up front: `"<image>" * n + "<bos>" + prompt + "\\n"` (n = 1, or the
  length of its list in a nested `[[a, b], [c]]`, the nlvr2 layout);
- a prompt with k `<image>` markers takes k images, in order; `<bos>` goes right after the *last* marker;
- every `<image>` then becomes `image_seq_length` image tokens, so image i of a prompt owns the i-th block and its
  features (`pixel_values` row i over the whole batch, in order) are scattered there.

Labels (transformers' `__call__`): `input_ids` with -100 wherever `token_type_ids` is 0 (prefix and padding), so the
suffix ids (its `<eos>` included) remain; all -100 without a suffix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pgconv.errors import InputError

__all__ = ["IMAGE_TOKEN", "IGNORE_INDEX", "images_per_prompt", "image_slots", "prompt_text", "labels"]

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # torch's cross_entropy ignore_index, what transformers puts on the prefix


def image_slots(prompt: Any) -> int:
    """How many `<image>` markers `prompt` holds (0 for a non-string, which the encoder refuses by itself)."""
    return prompt.count(IMAGE_TOKEN) if isinstance(prompt, str) else 0


def images_per_prompt(images: Any, prompts: Sequence[Any]) -> list[list[Any]]:
    """The image list of every prompt, from the layouts transformers takes:

    - one image: every prompt gets it (transformers: `[[image]] * len(text)`);
    - a list of image lists, one list per prompt: as given (several images in one prompt);
    - a flat list: one image per prompt, or, when the prompts hold `<image>` markers, consumed in order, one per
      marker over the whole batch (a prompt without markers takes one).
    A prompt with k markers must end up with exactly k images; every prompt needs at least one.
    """
    slots = [image_slots(p) for p in prompts]
    if not isinstance(images, (list, tuple)):
        groups = [[images] for _ in prompts]
    elif images and all(isinstance(g, (list, tuple)) for g in images):
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} image lists for {len(prompts)} prompts (one list per prompt)")
        groups = [list(g) for g in images]
    elif any(isinstance(g, (list, tuple)) for g in images):
        raise InputError("images must be one image, a list of images or a list of image lists, not a mix")
    else:
        wanted = [max(n, 1) for n in slots]
        if len(images) != sum(wanted):
            per = "one per prompt" if max(slots) <= 1 else "one per <image> marker, or one per prompt without any"
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts ({sum(wanted)} wanted: {per})")
        it = iter(images)
        groups = [[next(it) for _ in range(n)] for n in wanted]
    for i, (group, n) in enumerate(zip(groups, slots)):
        if not group:
            raise InputError(f"prompt {i} has no image (PaliGemma needs at least one per prompt)")
        if n and len(group) != n:
            raise InputError(f"prompt {i} holds {n} {IMAGE_TOKEN} markers but has {len(group)} image(s)")
    return groups


def prompt_text(prompt: str, n_images: int, image_block: str, bos: str) -> str:
    """The string transformers tokenises for a prompt with `n_images` images (`image_block`: one image's tokens)."""
    n = prompt.count(IMAGE_TOKEN)
    if n == 0:
        return f"{image_block * n_images}{bos}{prompt}\n"
    if n != n_images:
        raise InputError(f"prompt {prompt[:60]!r} holds {n} {IMAGE_TOKEN} markers but has {n_images} image(s)")
    cut = prompt.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)
    return f"{prompt[:cut].replace(IMAGE_TOKEN, image_block)}{bos}{prompt[cut:]}\n"


def labels(input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
    """transformers' training labels: the ids, -100 where token_type_ids is 0 (prefix, padding)."""
    return input_ids.masked_fill(token_type_ids == 0, IGNORE_INDEX)
