"""Processor vs transformers 5.24 PaliGemmaProcessor (PIL image backend) on the tiny fixture: bit-identical
pixel_values for every PIL mode we accept, identical input_ids / attention_mask / token_type_ids / labels (left and
right padding, several images per prompt); input errors."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from pgconv.converter.fixture import default_image, make_fixture
from pgconv.errors import InputError
from pgconv.model.processor import Processor, load_image

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("processor") / "tiny", "tiny")


@pytest.fixture(scope="session")
def ours(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def converting(tiny_dir, tmp_path_factory):
    """(ours, transformers') from a copy of the fixture whose preprocessor_config.json has no do_convert_rgb key
    (transformers' class default: convert; the fixture, like the hub, says null: do not)."""
    import shutil

    d = tmp_path_factory.mktemp("converting") / "tiny"
    shutil.copytree(tiny_dir, d)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert "do_convert_rgb" in pre and pre.pop("do_convert_rgb") is None
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    hf_c = transformers.PaliGemmaProcessor.from_pretrained(d, backend="pil")
    assert hf_c.image_processor.do_convert_rgb is True
    return Processor.from_pretrained(d), hf_c


@pytest.fixture(scope="session")
def hf(tiny_dir):
    proc = transformers.PaliGemmaProcessor.from_pretrained(tiny_dir, backend="pil")
    # The oracle must be the PIL backend (the torchvision one differs by up to one uint8 level, trap 7).
    assert type(proc.image_processor).__name__ == "SiglipImageProcessorPil"
    return proc


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "RGBA":
        return rgba
    if mode == "P":
        return rgba.convert("RGB").quantize(17)
    if mode == "P-transparent":
        p = rgba.convert("RGB").quantize(17)
        p.info["transparency"] = 3
        return p
    if mode == "PA":
        return rgba.convert("RGB").quantize(17).convert("PA")
    if mode == "L-transparent":
        grey = rgba.convert("L")
        grey.info["transparency"] = int(np.asarray(grey)[0, 0])
        return grey
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return rgba.convert(mode)


MODES = ["RGB", "RGBA", "L", "LA", "P", "P-transparent", "PA", "L-transparent", "CMYK", "1", "I", "F", "I;16", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(37, 23), (5, 91), (28, 28)])
def test_pixel_values_bit_identical_to_transformers_pil_backend(ours, converting, hf, mode, size):
    image = _random_image(mode, size, seed=len(mode) * 7 + size[0])
    # The fixture says "do_convert_rgb": null, as hub configs do: transformers 5.24 then uses a PIL image's pixels as
    # they are, which works for 3-band images and raises for the rest ("mean must have 4 elements"); there we match
    # what it computes when asked to convert (the documented difference).
    try:
        expected = hf.image_processor(image, return_tensors="pt")["pixel_values"]
    except ValueError:
        assert len(image.getbands()) != 3, mode
        expected = hf.image_processor(image, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    got = ours.preprocess([image])
    assert got.dtype == torch.float32 and got.shape == (1, 3, 28, 28)
    assert torch.equal(got, expected), (mode, size, (got - expected).abs().max())
    ours_c, hf_c = converting  # the key absent: transformers' class default, convert
    expected = hf_c.image_processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours_c.preprocess([image]), expected), mode


@pytest.mark.parametrize("size", [224, 448])
def test_pixel_values_at_real_resolutions(ours, size):
    # Down- and up-sampling to the hub sizes against the PIL backend with the hub preprocessor settings.
    hf_ip = transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3,
                                                 rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                 do_convert_rgb=True)
    proc = Processor(ours.tokenizer, image_size=(size, size), num_image_tokens=(size // 14) ** 2)
    for mode, wh in [("RGB", (401, 299)), ("RGBA", (300, 501)), ("L", (97, 61))]:
        image = _random_image(mode, wh, seed=size)
        assert torch.equal(proc.preprocess([image]), hf_ip(image, return_tensors="pt")["pixel_values"]), mode


def test_image_paths_and_builtin_image(ours, hf, tmp_path):
    path = default_image()
    image = Image.open(path)
    assert image.width != image.height
    jpeg = tmp_path / "x.jpg"
    image.save(jpeg, quality=80)
    for p in (path, jpeg):
        expected = hf.image_processor(Image.open(p), return_tensors="pt")["pixel_values"]
        assert torch.equal(ours.preprocess([p]), expected)
        assert torch.equal(ours.preprocess([str(p)]), expected)


# Image files as people have them, per PIL mode: every format Pillow writes that mode to (some store it converted:
# a WebP of an L image reads back RGB), plus transparency colours (PNG tRNS, GIF) that only do_convert_rgb composites.
FILE_MODES = {"1": ["png", "tiff", "bmp"], "L": ["png", "jpg", "tiff"], "LA": ["png", "tiff", "webp"],
              "P": ["png", "gif", "tiff", "bmp"], "PA": ["tiff", "webp"], "RGB": ["png", "jpg", "webp", "tiff"],
              "RGBA": ["png", "webp", "tiff", "gif"], "CMYK": ["jpg", "tiff"], "I;16": ["png", "tiff"], "F": ["tiff"],
              "P-transparent": ["png", "gif"], "L-transparent": ["png"], "RGB-transparent": ["png"]}


def _image_file(tmp_path, mode: str, fmt: str, size=(37, 23), seed=0, **save):
    if mode == "RGB-transparent":
        image = _random_image("RGB", size, seed).quantize(7).convert("RGB")  # few colours: the tRNS one is hit
        image.info["transparency"] = image.getpixel((0, 0))
    else:
        image = _random_image(mode, size, seed)
        if mode == "LA":  # alpha varies (convert("LA") of random RGBA keeps it), so compositing would show
            assert len(set(np.asarray(image)[..., 1].ravel())) > 1
    path = tmp_path / f"{mode.replace(';', '_')}.{fmt}"
    kwargs = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(path, **kwargs, **save)
    return path


def _hf_from_path(hf, path, prompt="caption en"):
    """transformers' processor given the file path: its own loading (image_utils.load_image)."""
    return hf(images=str(path), text="<image>" + prompt, return_tensors="pt")


@pytest.mark.parametrize("mode,fmt", [(m, f) for m, fmts in FILE_MODES.items() for f in fmts])
def test_image_files_identical_to_transformers_given_the_path(ours, converting, hf, tmp_path, mode, fmt):
    """Alpha is dropped, not composited (RGBA and LA PNGs differed by up to 1.46); with do_convert_rgb (key absent)
    a transparency colour is composited onto white, as transformers' convert_to_rgb does after load_image."""
    path = _image_file(tmp_path, mode, fmt)
    for proc, ref in ((ours, hf), converting):
        expected = _hf_from_path(ref, path)
        got = proc([path], ["caption en"])
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["pixel_values"], expected["pixel_values"]), \
            (mode, fmt, Image.open(path).mode, (got["pixel_values"] - expected["pixel_values"]).abs().max())
        assert torch.equal(proc.preprocess([str(path)]), expected["pixel_values"])


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "tiff"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_as_transformers(ours, hf, tmp_path, fmt, orientation):
    """Phone photos carry EXIF orientation; transformers' load_image applies it (ImageOps.exif_transpose)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    save = {"tiffinfo": {0x0112: orientation}} if fmt == "tiff" else {"exif": exif}  # TIFF: a tag of its own IFD
    path = _image_file(tmp_path, "RGB", fmt, size=(41, 17), **save)
    expected = _hf_from_path(hf, path)["pixel_values"]
    got = ours([path], ["caption en"])["pixel_values"]
    assert torch.equal(got, expected), (fmt, orientation, (got - expected).abs().max())
    as_stored = ours.preprocess([Image.open(path)])  # a PIL image is used as given (transformers: the same)
    assert torch.equal(as_stored, hf.image_processor(Image.open(path), return_tensors="pt")["pixel_values"])
    if fmt != "tiff":  # Pillow's TIFF decoder applies the orientation tag itself
        assert torch.equal(as_stored, got) == (orientation == 1)  # the rotation happened: this test can fail


_GOOD_EXIF = Image.Exif()
_GOOD_EXIF[0x0112] = 6


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["jpeg", "png", "webp"]),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 60))
def test_damaged_exif_as_transformers_or_one_input_error(ours, hf, tmp_path, fmt, edits, cut):
    """A damaged EXIF block: the same pixels as transformers, or (where its load_image raises) an InputError."""
    exif = bytearray(_GOOD_EXIF.tobytes())
    for at, byte in edits:
        exif[at % len(exif)] = byte
    path = tmp_path / f"x.{fmt}"
    _random_image("RGB", (41, 17), 3).save(path, format=fmt, exif=bytes(exif[:cut] if cut is not None else exif))
    try:
        expected = hf.image_processor(str(path), return_tensors="pt")["pixel_values"]
    except Exception:  # noqa: BLE001 - whatever Pillow's EXIF parser raises inside transformers
        with pytest.raises(InputError, match=re.escape(str(path))):
            ours.preprocess([path])
    else:
        assert torch.equal(ours.preprocess([path]), expected)


def test_rgba_file_and_rgba_image_differ_as_in_transformers(ours, converting, tmp_path):
    """The same RGBA pixels: from a file the alpha is dropped, as a PIL image (with conversion) composited."""
    path = _image_file(tmp_path, "RGBA", "png")
    ours_c, hf_c = converting
    image = Image.open(path)
    from_file, from_image = ours_c.preprocess([path]), ours_c.preprocess([image])
    assert torch.equal(from_image, hf_c.image_processor(image, return_tensors="pt")["pixel_values"])
    assert (from_file - from_image).abs().max() > 1  # white shows through where alpha is low


def _compare(ours, hf, prompts, suffixes=None, images=None):
    """Our processor and transformers' on the same inputs: every key transformers returns, equal (dtype included).
    `images` default: the built-in image once per prompt."""
    if images is None:
        images = [Image.open(default_image())] * len(prompts)
    got = ours(images, prompts, suffixes)
    expected = hf(images=images, text=prompts, suffix=suffixes, return_tensors="pt", padding=True)
    assert set(got) == set(expected) == {"input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"}
    for key in got:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), (key, prompts, suffixes, got[key], expected[key])
    return got


@pytest.mark.parametrize(
    "prompts, suffixes",
    [
        (["caption en"], None),
        ([""], None),  # the hub golden test's empty prompt: [<image>]*N + [<bos>, "\n"]
        (["answer en where is the cow standing?"], ["on the beach"]),
        (["caption en", "answer en what color is the car and where is it parked?", "ocr"], None),
        (["detect cat ; dog", "segment"], ["<loc0010><loc0020><loc0500><loc1023> cat", ""]),
        (["<image>caption en"], None),  # <bos> goes right after the user's <image>
        (["hi <image>caption en", "<image>"], ["x", "y z"]),
        (["  spaces  and\nnewlines\n\n", "ünïcödé 🐄 ☃ 中文", "<bos><eos><pad> specials"], None),
    ],
)
def test_text_identical_to_transformers(ours, hf, prompts, suffixes):
    got = _compare(ours, hf, prompts, suffixes)
    assert (got["token_type_ids"].sum(1) > 0).tolist() == [suffixes is not None] * len(prompts)


def test_prompt_layout_and_padding(ours):
    got = ours(default_image(), ["", "caption en"])
    n = ours.num_image_tokens
    assert got["input_ids"][0, -(n + 2):].tolist() == [ours.image_token_id] * n + [ours.bos_token_id, 108]
    assert ours.padding_side == "left" and got["attention_mask"][0, 0] == 0 and got["input_ids"][0, 0] == ours.pad_token_id
    assert got["pixel_values"].shape == (2, 3, 28, 28)
    tail = ours(default_image(), "x", "y")
    assert tail["input_ids"][0, -1] == ours.eos_token_id and tail["token_type_ids"][0, -1] == 1


@pytest.fixture(scope="session")
def right_padded(tiny_dir, tmp_path_factory):
    """(ours, transformers') read from a copy of the fixture whose tokenizer_config.json says padding_side right."""
    import shutil

    d = tmp_path_factory.mktemp("right") / "tiny"
    shutil.copytree(tiny_dir, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tc, "padding_side": "right"}))
    ours, hf = Processor.from_pretrained(d), transformers.PaliGemmaProcessor.from_pretrained(d, backend="pil")
    assert ours.padding_side == hf.tokenizer.padding_side == "right"
    return ours, hf


@pytest.fixture(params=["left", "right"])
def both_sides(request, ours, hf, right_padded):
    return (ours, hf) if request.param == "left" else right_padded


@pytest.mark.parametrize(
    "prompts, suffixes",
    [
        (["caption en"], None),
        (["caption en"], ["a cow on the beach"]),
        (["caption en", "answer en what color is the car and where is it parked?", "ocr"], None),
        (["caption en", "answer en what color is the car?", "ocr"], ["a cow", "red, in the street", ""]),
        (["<image>caption en", "<image>ocr"], ["a cow", "a much longer suffix than the other"]),
        (["detect cat", "x"], ["<loc0010><loc0020><loc0500><loc1023> cat ; <pad> <eos>", "much longer suffix here"]),
    ],
)
def test_labels_identical_to_transformers(both_sides, prompts, suffixes):
    """transformers always returns labels: -100 on the prefix and the padding, the suffix ids (with <eos>) else."""
    ours, hf = both_sides
    got = _compare(ours, hf, prompts, suffixes)
    lab, ids, tti = got["labels"], got["input_ids"], got["token_type_ids"]
    assert torch.equal(lab == -100, tti == 0) and torch.equal(lab[tti == 1], ids[tti == 1])
    if suffixes is None:
        assert bool((lab == -100).all())
    else:  # every row ends its suffix with <eos>, on both padding sides
        assert [row[row != -100][-1].item() for row in lab] == [ours.eos_token_id] * len(prompts)


def _three_images():
    """Three different images, so a swapped order shows in pixel_values and in the model's image features."""
    base = Image.open(default_image()).convert("RGB")
    return base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), _random_image("RGB", (40, 30), seed=3)


@pytest.mark.parametrize(
    "layout, prompts, suffixes",
    [
        ("nested", ["answer en are the two images the same?"], None),  # nlvr2: <image><image><bos>prompt\n
        ("flat", ["<image><image>answer en same?"], None),
        ("flat", ["<image> left <image> right"], ["yes"]),  # markers in the text; <bos> after the last one
        ("nested", ["two images", "one"], ["x", "a longer suffix"]),
        ("flat", ["<image><image>two", "<image>one"], ["x", "y z"]),
        ("nested", ["three"], ["all different"]),
        ("flat", ["<image>", "<image><image><image>"], None),
    ],
)
def test_several_images_per_prompt_identical_to_transformers(both_sides, layout, prompts, suffixes):
    ours, hf = both_sides
    a, b, c = _three_images()
    n = [max(p.count("<image>"), 1) for p in prompts]
    if layout == "nested":
        n = {1: [3 if prompts == ["three"] else 2], 2: [2, 1]}[len(prompts)]
    pool = iter([a, b, c, b, a, c])
    groups = [[next(pool) for _ in range(k)] for k in n]
    images = groups if layout == "nested" else [im for g in groups for im in g]
    got = _compare(ours, hf, prompts, suffixes, images)
    assert got["pixel_values"].shape[0] == sum(n)
    assert (got["input_ids"] == ours.image_token_id).sum(1).tolist() == [k * ours.num_image_tokens for k in n]


def test_several_images_layout(ours):
    """The nlvr2 prompt: one image-token block per image, then <bos>, the prompt and the newline."""
    a, b, _ = _three_images()
    got = ours([[a, b]], "answer en same?")
    k, ids = ours.num_image_tokens, got["input_ids"][0].tolist()
    assert ids[:2 * k + 1] == [ours.image_token_id] * (2 * k) + [ours.bos_token_id] and ids[-1] == 108
    assert torch.equal(got["pixel_values"], ours.preprocess([a, b]))
    assert torch.equal(ours([a, b], "<image><image>answer en same?")["input_ids"], got["input_ids"])


_FRAGMENTS = st.sampled_from(["<image>", "<bos>", "<eos>", "<loc0001>", "<seg127>", " ", "  ", "\n", "▁", "caption en",
                              "<", ">", "<loc", "é", "🐄", "\t"])
_TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), _FRAGMENTS),
                 max_size=6).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_TEXT, suffix=st.one_of(st.none(), _TEXT))
def test_fuzzed_prompts_identical_to_transformers(ours, hf, prompt, suffix):
    assume("<image>" not in (suffix or ""))
    images = [Image.open(default_image())] * max(prompt.count("<image>"), 1)  # one per marker
    _compare(ours, hf, [prompt], None if suffix is None else [suffix], images)


def test_decode_matches_transformers(ours, hf):
    ids = [45, 957, 43, 1128, 1706, 1, 2, 1664, 512, 1663, 108, 300, 278, 5]
    for skip in (True, False):
        assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)
    assert "<loc0000>" in ours.decode([512])  # <loc> survives skip_special_tokens (detection needs it)


def test_stream_decoder_matches_decode(ours):
    ids = ours.tokenizer.encode("héllo wörld 🐄 <loc0001> cat", add_special_tokens=False).ids + [1]
    step = ours.stream_decoder()
    assert "".join(step(i) for i in ids) == ours.decode(ids)


def test_tokenizer_passed_in_is_not_mutated(ours):
    from tokenizers import Tokenizer

    bare = Tokenizer.from_str(ours.tokenizer.to_str())
    bare_json = bare.to_str()
    proc = Processor(bare, image_size=(28, 28), num_image_tokens=16)
    assert bare.to_str() == bare_json and proc.tokenizer is not bare


# -- errors -------------------------------------------------------------------------------------------------------


def test_missing_tokenizer_files(tiny_dir, tmp_path):
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(InputError, match="tokenizer.json: missing"):
        Processor.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="not a checkpoint directory"):
        Processor.from_pretrained(tmp_path / "nope")


def test_config_mismatch_is_an_error(tiny_dir):
    from pgconv.model.config import PRESETS

    with pytest.raises(InputError, match="image_token_index"):
        Processor.from_pretrained(tiny_dir, config=PRESETS["tiny"].replace(image_token_index=7))


def test_prompt_errors(ours):
    with pytest.raises(InputError, match="prompt 0 holds 2 <image> markers but has 1 image"):
        ours(default_image(), "<image><image>two")
    with pytest.raises(InputError, match="prompt 1 holds 1 <image> markers but has 2 image"):
        ours([[default_image()], [default_image()] * 2], ["<image>a", "<image>b"])
    with pytest.raises(InputError, match="got 2 images for 2 prompts \\(3 wanted"):
        ours([default_image()] * 2, ["<image><image>a", "b"])
    with pytest.raises(InputError, match="1 image lists for 2 prompts"):
        ours([[default_image()]], ["a", "b"])
    with pytest.raises(InputError, match="not a mix"):
        ours([default_image(), [default_image()]], ["a", "b"])
    with pytest.raises(InputError, match="prompt 0 has no image"):
        ours([[], [default_image()]], ["a", "b"])
    with pytest.raises(InputError, match="2 images for 1 prompts"):
        ours([default_image()] * 2, ["one"])
    with pytest.raises(InputError, match="suffixes"):
        ours(default_image(), ["a", "b"], ["only one"])
    with pytest.raises(InputError, match="not a string"):
        ours(default_image(), [3])
    with pytest.raises(InputError, match="image tokens belong in the prompt"):
        ours(default_image(), "a", "b <image>")


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the data is a single tiny row, never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


def test_bad_image_files(ours, tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not an image file"):
        ours(text, "caption en")
    buf = io.BytesIO()
    _random_image("RGB", (64, 64), 0).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated.png: cannot decode"):
        ours(truncated, "caption en")
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(30000, 30000))
    with pytest.raises(InputError, match="decompression bomb"):
        ours(bomb, "caption en")
    # Still refused when a caller has switched Pillow's own limit off.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputError, match="decompression bomb"):
        ours(bomb, "caption en")
    with pytest.raises(InputError, match="expected a PIL image"):
        ours(np.zeros((4, 4, 3), np.uint8), "caption en")


PROCESSOR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json")


def _processor_dir(tiny_dir, tmp_path, name: str | None = None, content: str | bytes | None = None):
    """The tiny fixture's processor files (no weights) in tmp_path, with `name` replaced by `content`."""
    for f in PROCESSOR_FILES:
        (tmp_path / f).write_bytes((tiny_dir / f).read_bytes())
    if name is not None:
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return tmp_path


def _with_preprocessor(tiny_dir, tmp_path, **changes):
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    pre.update(changes)
    return _processor_dir(tiny_dir, tmp_path, "preprocessor_config.json", json.dumps(pre))


BAD_PREPROCESSOR = [
    ("resample", 99), ("resample", True), ("resample", "bicubic"), ("resample", [3]),
    ("rescale_factor", "x"), ("rescale_factor", float("nan")), ("rescale_factor", 0), ("rescale_factor", -1),
    ("image_mean", [0.5]), ("image_mean", [0.5, 0.5, 0.5, 0.5]), ("image_mean", ["a", 0.5, 0.5]),
    ("image_mean", [float("inf"), 0.5, 0.5]), ("image_mean", {"r": 0.5}),
    ("image_std", [0, 0, 0]), ("image_std", [0.5, -0.5, 0.5]), ("image_std", 0), ("image_std", [None, 1, 1]),
    ("do_resize", "no"), ("do_rescale", 1), ("do_normalize", "false"),
    ("size", [28, 28]), ("size", {"height": 1e9, "width": 28}), ("size", {"height": 28, "width": 0}),
    ("size", {"height": "28", "width": 28}), ("image_seq_length", -1), ("image_seq_length", "16"),
    ("image_seq_length", 16.0), ("image_seq_length", 10**12),
]


@pytest.mark.parametrize(("key", "value"), BAD_PREPROCESSOR)
def test_bad_preprocessor_values_name_file_and_key(tiny_dir, tmp_path, key, value):
    d = _with_preprocessor(tiny_dir, tmp_path, **{key: value})
    with pytest.raises(InputError, match=rf"preprocessor_config\.json: {key}\b") as e:
        Processor.from_pretrained(d)
    assert type(e.value) is InputError and "\n" not in str(e.value)


@pytest.mark.parametrize(("key", "value"), [("image_mean", 0.5), ("image_std", 0.5), ("do_resize", None),
                                            ("do_rescale", None), ("resample", 2), ("rescale_factor", 1)])
def test_preprocessor_values_transformers_accepts(tiny_dir, tmp_path, key, value):
    """A scalar mean/std (one value for every channel), null booleans (the default), any PIL filter are fine."""
    proc = Processor.from_pretrained(_with_preprocessor(tiny_dir, tmp_path, **{key: value}))
    assert proc.preprocess([default_image()]).isfinite().all()


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                                  "config.json"])
@pytest.mark.parametrize(("content", "problem"), [
    ("[]", "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    ("null", "expected a JSON object, got null"),
    ("[" * 50000 + "]" * 50000, "nested too deeply"),
    (b"{\"a\": \"\xff\"}", "cannot read JSON"),
    ("{", "cannot read JSON"),
])
def test_json_files_must_be_readable_objects(tiny_dir, tmp_path, name, content, problem):
    d = _processor_dir(tiny_dir, tmp_path, name, content)
    with pytest.raises(InputError, match=re.escape(f"{name}: ")) as e:
        Processor.from_pretrained(d)
    assert problem in str(e.value) and type(e.value) is InputError and "\n" not in str(e.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("name", ["preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "tokenizer.json", "processor_config.json", "config.json"])
def test_non_regular_json_file_is_refused(tiny_dir, tmp_path, name):
    """A FIFO would block read_text forever (nobody writes to it); a directory is no file either."""
    d = _processor_dir(tiny_dir, tmp_path)
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)
    with pytest.raises(InputError, match=re.escape(f"{name}: not a regular file")):
        Processor.from_pretrained(d)
    (d / name).unlink()
    (d / name).mkdir()
    with pytest.raises(InputError, match=re.escape(f"{name}: not a regular file")):
        Processor.from_pretrained(d)


@pytest.mark.parametrize("value", ["middle", 5, ["left"]])
def test_bad_padding_side_names_the_file(tiny_dir, tmp_path, value):
    tc = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    tc["padding_side"] = value
    d = _processor_dir(tiny_dir, tmp_path, "tokenizer_config.json", json.dumps(tc))
    with pytest.raises(InputError, match=r"tokenizer_config\.json: padding_side must be"):
        Processor.from_pretrained(d)


@pytest.mark.parametrize("text", ["a\udcffb", "\udc80", "ok \ud800"])
def test_prompt_and_suffix_must_be_utf8(ours, text):
    """Undecodable argv bytes reach Python as lone surrogates; tokenizers would raise a TypeError on them."""
    with pytest.raises(InputError, match="prompt 0 is not valid UTF-8"):
        ours.encode([text])
    with pytest.raises(InputError, match="suffix 0 is not valid UTF-8"):
        ours.encode(["caption en"], [text])


def test_null_preprocessor_values_mean_transformers_defaults(tmp_path):
    """transformers reads a null resample/mean/std/rescale as the class default, like a missing key."""
    import json
    import shutil

    from pgconv.converter.fixture import default_checkpoint, default_image

    src = tmp_path / "ck"
    shutil.copytree(default_checkpoint(), src)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    base = Processor.from_pretrained(src)
    pre.update(resample=None, image_mean=None, image_std=None, rescale_factor=None)
    (src / "preprocessor_config.json").write_text(json.dumps(pre))
    nulls = Processor.from_pretrained(src)
    image = default_image()
    assert torch.equal(nulls([image], ["caption en"])["pixel_values"], base([image], ["caption en"])["pixel_values"])


def test_nested_processor_config_written_by_transformers_5_is_read(tiny_dir, tmp_path):
    """transformers 5's PaliGemmaProcessor.save_pretrained writes the image settings only as processor_config.json's
    `image_processor`; pgconv reads them there first, as transformers does (defaults would differ silently)."""
    import shutil

    d = tmp_path / "resaved"
    shutil.copytree(tiny_dir, d)
    (d / "preprocessor_config.json").unlink()
    hp = transformers.PaliGemmaProcessor.from_pretrained(tiny_dir, backend="pil")
    hp.image_processor.image_mean, hp.image_processor.image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    hp.image_processor.resample = 0
    hp.save_pretrained(d)
    assert not (d / "preprocessor_config.json").exists() and "image_processor" in json.loads(
        (d / "processor_config.json").read_text())
    hf2 = transformers.PaliGemmaProcessor.from_pretrained(d, backend="pil")
    image = _random_image("RGB", (37, 23), seed=5)
    ref = hf2(images=image, text="<image>caption en", return_tensors="pt")["pixel_values"]
    got = Processor.from_pretrained(d)([image], ["caption en"])["pixel_values"]
    assert torch.equal(got, ref)
    base = Processor.from_pretrained(tiny_dir)([image], ["caption en"])["pixel_values"]
    assert not torch.equal(got, base)  # the nested settings were used, not defaults
