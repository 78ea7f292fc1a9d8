"""Image files as transformers 5.24 loads them, and the regular-file check every opened file goes through.

`load_image` is transformers' `image_utils.load_image` (what its processors do with a path): decode, apply the EXIF
orientation (`ImageOps.exif_transpose`), then a plain `convert("RGB")` (alpha dropped, not composited). `to_rgb` is
its `image_transforms.convert_to_rgb`, applied to PIL images handed to the processor (transparency composited onto
white). Every failure is an `InputError` naming the file.
"""

from __future__ import annotations

import os
import stat
import struct

from PIL import Image, ImageOps, UnidentifiedImageError

from pgconv.errors import InputError

__all__ = ["MAX_PIXELS", "require_regular_file", "load_image", "check_size", "to_rgb"]

# Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS; we keep that limit even if a caller disabled it.
MAX_PIXELS = 2 * 89_478_485


def require_regular_file(path: str | os.PathLike, what: str = "file", missing_ok: bool = False) -> bool:
    """True when `path` is a regular file (symlinks followed); False when nothing is there and `missing_ok`.

    Anything else is an `InputError` naming `path`: a missing `what`, and a FIFO, socket or device (opening or
    reading one blocks, or never ends) or a directory. Check before every open of a user-given file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if missing_ok:
            return False
        raise InputError(f"{path}: {what} not found") from None
    except OSError as e:  # a symlink loop (ELOOP), a path through a file (ENOTDIR), permissions
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file")
    return True


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as transformers' `image_utils.load_image` (what its processors do with a path) returns it:
    decoded, EXIF orientation applied (`ImageOps.exif_transpose`), then a plain `convert("RGB")`: an alpha band is
    dropped, not composited (unlike a PIL image handed to the processor, see `to_rgb`). Every failure is an
    `InputError` naming the file."""
    require_regular_file(path, "image")  # a FIFO would block in Image.open
    try:
        with Image.open(path) as image:
            check_size(image, path)
            image.load()  # decode now, so a truncated file fails here and not halfway through a batch
            upright = ImageOps.exif_transpose(image)
            check_size(upright, path)
            return upright.convert("RGB")
    except FileNotFoundError:  # removed between the check and the open
        raise InputError(f"{path}: image not found") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, struct.error) as e:
        # Pillow reports truncated/corrupt data as OSError/SyntaxError, and a malformed EXIF block or palette as
        # whatever its parser hits (struct.error, IndexError, KeyError, TypeError).
        raise InputError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def check_size(image: Image.Image, where: object) -> None:
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise InputError(f"{where}: image of {w}x{h} pixels exceeds the {MAX_PIXELS}-pixel limit (decompression bomb?)")
    if w == 0 or h == 0:
        raise InputError(f"{where}: image has zero size ({w}x{h})")


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for a PIL image given to the processor: composite transparency onto white,
    otherwise a plain `convert("RGB")` (a no-op on what `load_image` returns)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
