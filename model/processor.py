"""PaliGemma processor: images -> pixel_values, prompts -> token ids, ids -> text. No transformers imports.

Matches transformers 5.24 `PaliGemmaProcessor` with the PIL image backend (`SiglipImageProcessorPil`) bit for bit
(the torchvision-backed `SiglipImageProcessor` differs from it by design: see `pgconv.parity.inputs`):

- Image file (a path): as transformers' `image_utils.load_image`, which its processors call on a path: decoded, EXIF
  orientation applied (`ImageOps.exif_transpose`), then a plain `Image.convert("RGB")` (alpha dropped, not composited;
  L, P, CMYK, I;16, F, ... as Pillow converts them). A PIL image (not a path) is used as given (no EXIF rotation, as
  transformers): with an alpha band or a `transparency` entry (RGBA, LA, PA, P/L with a transparent colour) it is
  alpha-composited onto opaque white (`image_transforms.convert_to_rgb`), others go through `convert("RGB")`. Then
  (`PilBackend._preprocess`) PIL resize to (H, W) with the configured filter (bicubic),
  `uint8 -> float64 * rescale_factor -> float32`, `(x - mean) / std` in float32, CHW.
- Text (`pgconv.model.prompts`): `"<image>" * num_image_tokens * n_images + "<bos>" + prompt + "\\n"`; a prompt
  that holds `<image>` markers takes one image per marker, each marker becomes one image's tokens and `<bos>` goes
  after the last one (as transformers does). A suffix is tokenised separately as `suffix + "<eos>"`
  (transformers' `text_pair`); `token_type_ids` are 0 for the prefix and 1 for the suffix, and `labels` are the ids
  with -100 where token_type_ids is 0 (prefix and padding; all -100 without a suffix), as transformers always
  returns them. Batches are padded to the longest row with `<pad>` on the tokenizer's padding side (`left` for
  Gemma tokenizers, transformers' class default) and `attention_mask` 0 there. An empty prompt is allowed, as in
  transformers (the hub golden test uses one: `[<image>]*256 + [<bos>, "\\n"]`).
- Several images in one prompt (transformers' nlvr2 layout): `images=[[a, b], [c]]` (one list per prompt), or
  `<image>` markers in the prompts and a flat list consumed in order; `pixel_values` holds every image of the batch
  in order (total images, 3, H, W), which is how the model scatters them into the image-token blocks.

`do_convert_rgb` as transformers reads it: a missing key means true, `null` (what hub configs say) means false. It
only matters for transparency: with it, an image file whose RGB conversion keeps a `transparency` colour (a GIF, a
PNG with a tRNS chunk) has that colour composited onto white, and PIL images are converted as above; without it, the
RGB pixels are used as they are.

Deliberate differences: a PIL image that is not 3-band (L, RGBA, CMYK, ...) is converted as with
`do_convert_rgb=True` even when it is off (transformers 5.24 then raises, e.g. "mean must have 4 elements"; files
never hit this, `load_image` makes them RGB), a batch mixing prompts with and without `<image>` is handled prompt by prompt
(transformers inserts `<bos>` at character 6 of the prompts that lack it), one image given for several prompts goes
with each of them, and bad image files raise `InputError` instead of PIL exceptions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer
from tokenizers.decoders import DecodeStream

from pgconv.errors import InputError
from pgconv.model.config import PaliGemmaConfig
from pgconv.model.hf_config import from_hf_config
from pgconv.model.images import check_size, load_image, require_regular_file, to_rgb
from pgconv.model.processor_files import image_processor_config, preprocessor_options, read_json, token_content
from pgconv.model.prompts import IMAGE_TOKEN, image_slots, images_per_prompt, labels, prompt_text

__all__ = ["Processor", "ImageInput", "IMAGE_TOKEN", "load_image", "to_rgb", "check_utf8", "require_regular_file"]

EXTRA_TOKENS = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
ImageInput = Image.Image | str | os.PathLike


def check_utf8(text: str, what: str) -> None:
    """Refuse lone surrogates: Python turns undecodable argv bytes into them, and tokenizers raises a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 (undecodable character at position {e.start})") from None


class Processor:
    """Turns images and prompts into model inputs and generated ids into text (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        image_size: tuple[int, int],
        num_image_tokens: int,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        resample: int = Image.Resampling.BICUBIC,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
        padding_side: str = "left",
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        pad_token: str = "<pad>",
    ) -> None:
        # Work on a private copy: adding tokens must never change a tokenizer the caller owns.
        tok = Tokenizer.from_str(tokenizer.to_str())
        tok.no_padding()
        tok.no_truncation()
        # As PaliGemmaProcessor: <image> is a special added token, <loc>/<seg> plain added tokens (existing ids kept).
        if IMAGE_TOKEN not in {t.content for t in tok.get_added_tokens_decoder().values()}:
            tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
        tok.add_tokens(EXTRA_TOKENS)
        self.tokenizer = tok
        ids = {name: tok.token_to_id(name) for name in (bos_token, eos_token, pad_token)}
        if missing := [name for name, i in ids.items() if i is None]:
            raise InputError(f"tokenizer has no {', '.join(missing)} token")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids[bos_token], ids[eos_token], ids[pad_token]
        self.image_token_id: int = tok.token_to_id(IMAGE_TOKEN)
        self.image_size = tuple(image_size)
        self.num_image_tokens = int(num_image_tokens)
        # A scalar mean/std applies to every channel (transformers' normalize); float32 like its numpy arrays.
        self.image_mean = np.broadcast_to(np.array(image_mean, dtype=np.float32).reshape(-1), (3,)).copy()
        self.image_std = np.broadcast_to(np.array(image_std, dtype=np.float32).reshape(-1), (3,)).copy()
        self.rescale_factor = float(rescale_factor)
        self.resample = Image.Resampling(resample)
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
        self.do_convert_rgb = do_convert_rgb
        self.padding_side = padding_side
        # Set by from_pretrained from config.json: ids at or past it would index past the embedding (transformers
        # fails with "IndexError: index out of range in self"); `tokenizer_source` names the file in that error.
        self.vocab_size: int | None = None
        self.tokenizer_source = "tokenizer"

    # -----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: PaliGemmaConfig | None = None) -> "Processor":
        """Read tokenizer.json, tokenizer_config.json, the image processor settings (processor_config.json's nested
        `image_processor`, else preprocessor_config.json, as transformers 5) and config.json from `directory`
        (a checkpoint directory, or a hub id resolved like every other command: from the cache when offline)."""
        from pgconv.converter.hub import resolve_source

        d, _ = resolve_source(directory)
        if not d.is_dir():
            raise InputError(f"{d}: not a checkpoint directory")
        tok_path = d / "tokenizer.json"
        if not require_regular_file(tok_path, missing_ok=True):  # a FIFO would block in Tokenizer.from_file
            raise InputError(f"{tok_path}: missing (pgconv needs the checkpoint's own tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise InputError(f"{tok_path}: cannot load tokenizer ({e})") from None
        if config is None and require_regular_file(d / "config.json", missing_ok=True):
            config = from_hf_config(read_json(d / "config.json"))
        pre_path, pre = image_processor_config(d)
        opts = preprocessor_options(pre, pre_path)
        tc_path, map_path = d / "tokenizer_config.json", d / "special_tokens_map.json"
        tc = read_json(tc_path)
        tcfg = {**read_json(map_path), **tc}
        if "image_size" in opts:
            image_size = opts.pop("image_size")
        elif config is not None:
            image_size = (config.vision.image_size,) * 2
        else:
            raise InputError(f"{pre_path}: no size, and there is no config.json to take it from")
        if config is not None and image_size != (config.vision.image_size,) * 2:
            raise InputError(f"{pre_path}: size {image_size} does not match the model's image_size {config.vision.image_size}")
        n_tokens = opts.pop("image_seq_length")
        if n_tokens is None and config is not None:
            n_tokens = config.num_image_tokens
        if n_tokens is None:
            raise InputError(f"{pre_path}: no image_seq_length, and there is no config.json")
        if config is not None and n_tokens != config.num_image_tokens:
            raise InputError(f"{pre_path}: image_seq_length={n_tokens} but the model expects {config.num_image_tokens} image tokens")
        # transformers: tokenizer_config padding_side wins, then tokenizer.json padding, then the class default
        # (GemmaTokenizer: left; PreTrainedTokenizerBase: right).
        default_side = "left" if str(tcfg.get("tokenizer_class", "GemmaTokenizer")).startswith("Gemma") else "right"
        side = tcfg.get("padding_side") or str((tokenizer.padding or {}).get("direction", default_side)).lower()
        if tcfg.get("padding_side") not in (None, "left", "right"):
            where = tc_path if "padding_side" in tc else map_path
            got = json.dumps(tcfg["padding_side"])[:60]
            raise InputError(f"{where}: padding_side must be \"left\" or \"right\", got {got}")
        proc = cls(
            tokenizer,
            image_size=image_size,
            num_image_tokens=n_tokens,
            **opts,
            padding_side=side,
            bos_token=token_content(tcfg.get("bos_token"), "<bos>"),
            eos_token=token_content(tcfg.get("eos_token"), "<eos>"),
            pad_token=token_content(tcfg.get("pad_token"), "<pad>"),
        )
        if config is not None and proc.image_token_id != config.image_token_index:
            raise InputError(f"{tok_path}: <image> is token {proc.image_token_id} but config.json says image_token_index={config.image_token_index}")
        proc.tokenizer_source = str(tok_path)
        if config is not None:
            proc.vocab_size = config.text.vocab_size
        return proc

    # -----------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]],
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs: input_ids, attention_mask, token_type_ids, labels (B, T) int64 and pixel_values
        (total images, 3, H, W) float32, every prompt's images in order. `images`: one image (shared by all prompts),
        one per prompt, a list of image lists (one list per prompt), or one per `<image>` marker in the prompts
        (`pgconv.model.prompts.images_per_prompt`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompts given")
        groups = images_per_prompt(images, prompts)
        text = self.encode(prompts, suffixes, num_images=[len(g) for g in groups])
        return {**text, "pixel_values": self.preprocess([im for g in groups for im in g])}

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, H, W) float32 pixel values, bit-identical to transformers' PIL backend."""
        return torch.from_numpy(np.stack([self._pixels(im) for im in images]))

    def _pixels(self, image: ImageInput) -> np.ndarray:
        where: object = image
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        elif isinstance(image, Image.Image):
            where = f"image {image.mode} {image.size[0]}x{image.size[1]}"
            check_size(image, where)
        else:
            raise InputError(f"expected a PIL image or an image file path, got {type(image).__name__}")
        try:
            # Without do_convert_rgb transformers uses the pixels as they are: fine for 3 bands (load_image's RGB
            # keeps an RGB `transparency` colour, composited only when converting); other modes make it raise, and
            # we convert them instead (module docstring).
            rgb = image if not self.do_convert_rgb and len(image.getbands()) == 3 else to_rgb(image)
            if self.do_resize:
                h, w = self.image_size
                rgb = rgb.resize((w, h), resample=self.resample)  # PIL sizes are (width, height)
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{where}: cannot decode image ({e})") from None
        x = np.asarray(rgb).transpose(2, 0, 1)  # (H, W, 3) uint8 -> (3, H, W)
        if self.do_rescale:
            # transformers upcasts to float64 before multiplying, then rounds once to float32.
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            # float32 subtract and divide, per channel, as numpy does in transformers' normalize().
            x = (x - self.image_mean[:, None, None]) / self.image_std[:, None, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def prefix_text(self, prompt: str, num_images: int | None = None) -> str:
        """The prompt string transformers tokenises: image tokens, <bos>, prompt, newline. `num_images` defaults to
        the prompt's `<image>` markers, or one image up front when it has none."""
        n = num_images if num_images is not None else max(image_slots(prompt), 1)
        return prompt_text(prompt, n, IMAGE_TOKEN * self.num_image_tokens, self.bos_token)

    def encode(self, prompts: Sequence[str], suffixes: str | Sequence[str] | None = None,
               num_images: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids and labels (B, T) for prompts (and optional training
        suffixes); `num_images[i]`: prompt i's image count (default: see `prefix_text`)."""
        if suffixes is not None:
            suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
            if len(suffixes) != len(prompts):
                raise InputError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts")
        rows: list[tuple[list[int], list[int]]] = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {i} is {type(prompt).__name__}, not a string")
            check_utf8(prompt, f"prompt {i}")
            prefix = self.prefix_text(prompt, None if num_images is None else num_images[i])
            ids = self.tokenizer.encode(prefix, add_special_tokens=False).ids
            types = [0] * len(ids)
            if suffixes is not None:
                if not isinstance(suffixes[i], str):
                    raise InputError(f"suffix {i} is {type(suffixes[i]).__name__}, not a string")
                check_utf8(suffixes[i], f"suffix {i}")
                if IMAGE_TOKEN in suffixes[i]:  # transformers rejects it too (image token count mismatch)
                    raise InputError(f"suffix {suffixes[i][:60]!r} contains {IMAGE_TOKEN}; image tokens belong in the prompt")
                tail = self.tokenizer.encode(suffixes[i] + self.eos_token, add_special_tokens=False).ids
                ids, types = ids + tail, types + [1] * len(tail)
            rows.append((ids, types))
        self._check_vocabulary(rows)
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, types) in enumerate(rows):
            span = slice(length - len(ids), length) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[b, span] = torch.tensor(ids)
            token_type_ids[b, span] = torch.tensor(types)
            attention_mask[b, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "labels": labels(input_ids, token_type_ids)}

    def _check_vocabulary(self, rows: list[tuple[list[int], list[int]]]) -> None:
        if self.vocab_size is None:
            return
        ids = [i for row, _ in rows for i in row]
        if len({len(row) for row, _ in rows}) > 1:  # shorter rows are padded with <pad>
            ids.append(self.pad_token_id)
        bad = max(ids)
        if bad < self.vocab_size:
            return
        raise InputError(f"{self.tokenizer_source}: token {self.tokenizer.id_to_token(bad)!r} has id {bad}, past the "
                         f"model's vocabulary (vocab_size {self.vocab_size} in config.json): the tokenizer does not "
                         "belong to this model")

    # -----------------------------------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text for a 1-D sequence of ids (<loc>/<seg> are not special, so detection output survives)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise InputError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """A function id -> new text for streaming; multi-byte characters appear once all their bytes arrived."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)

        def step(token_id: int) -> str:
            return stream.step(self.tokenizer, int(token_id)) or ""

        return step
