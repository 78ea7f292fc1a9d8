"""Issue 8 security rules: no unpickling of untrusted data, no trust_remote_code, no path leaving the checkpoint,
hostile images refused. Reader-level versions: test_safetensors_io.py (`test_bin_reader_is_weights_only`,
`test_bad_index` traversal/absolute/symlink) and test_processor.py (`test_bad_image_files`).
"""

from __future__ import annotations

import ast
import io
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from reliability_helpers import assert_one_line_error, fresh_copy, litter, run_cli, tiny_checkpoint, tree_digest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("model", "converter", "parity", "pgconv", "benchmarks")


def _call_name(node: ast.Call) -> str:
    f, parts = node.func, []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _is_false(node: ast.expr | None) -> bool:
    return node is None or isinstance(node, ast.Constant) and node.value is False


def unsafe_calls(root: Path) -> tuple[int, list[str]]:
    """(files scanned, violations) over the shipped packages under `root`: any mention of trust_remote_code,
    torch.load without weights_only=True, pickle/marshal/dill/joblib loads, numpy loads allowing pickles."""
    files = sorted(p for d in SOURCE_DIRS if (root / d).is_dir() for p in (root / d).rglob("*.py"))
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(root)
        if "trust_remote_code" in text:
            problems.append(f"{where}: mentions trust_remote_code")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            kw = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}:{node.lineno}: {ast.unparse(node)} without weights_only=True")
            if name.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle", "joblib") and "load" in name:
                problems.append(f"{where}:{node.lineno}: {name}")
            if name.endswith(("np.load", "numpy.load", "read_array")) and not _is_false(kw.get("allow_pickle")):
                problems.append(f"{where}:{node.lineno}: {ast.unparse(node)} allows pickles")
    return len(files), problems


def test_no_unsafe_deserialisation_anywhere_in_the_package():
    scanned, problems = unsafe_calls(ROOT)
    assert scanned > 20, "source tree not found"
    assert problems == []


def test_scan_catches_what_it_looks_for(tmp_path):
    """The scan above is not vacuous: planted violations are reported, safe calls are not."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.py").write_text(
        "import torch, pickle, numpy as np\ntorch.load('x')\ntorch.load('y', weights_only=False)\n"
        "torch.load('z', weights_only=True)\npickle.loads(b'')\nnp.load('x', allow_pickle=True)\nnp.load('ok')\n"
        "f(trust_remote_code=False)\n")
    _, problems = unsafe_calls(tmp_path)
    assert len(problems) == 5, problems
    for needle in ("torch.load('x') without", "weights_only=False) without", "pickle.loads", "allows pickles",
                   "trust_remote_code"):
        assert any(needle in p for p in problems), needle


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PGCONV_PWNED']}",))


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "generate"])
def test_malicious_bin_is_never_unpickled(tmp_path_factory, tmp_path, capsys, monkeypatch, command):
    """A pytorch_model.bin whose pickle runs a shell command: every command refuses it, nothing runs."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "model.safetensors").unlink()
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("PGCONV_PWNED", str(pwned))
    torch.save({"weights": _Evil()}, src / "pytorch_model.bin")
    argv = {"convert": ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"],
            "inspect": ["inspect", src], "verify": ["verify", src, "--max-new-tokens", "1"],
            "generate": ["generate", src, "--max-new-tokens", "1"]}[command]
    res = run_cli(argv, capsys)
    assert_one_line_error(res, "pytorch_model.bin", "weights-only")
    assert not pwned.exists() and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors"])
@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "generate"])
def test_symlink_out_of_the_checkpoint_is_refused(tmp_path_factory, tmp_path, capsys, name, command):
    """A file inside the checkpoint that is a symlink to somewhere else (here a copy of the real file, so only
    the path check can stop it) is refused, never read or copied into the output."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    outside = tmp_path / f"secret-{name}"
    (src / name).rename(outside)
    (src / name).symlink_to(outside)
    before = tree_digest(src)
    argv = {"convert": ["convert", src, tmp_path / "dst", "--to", "native", "--quiet"],
            "inspect": ["inspect", src], "verify": ["verify", src, "--max-new-tokens", "1"],
            "generate": ["generate", src, "--max-new-tokens", "1"]}[command]
    res = run_cli(argv, capsys)
    if command == "inspect" and name == "tokenizer.json":  # inspect never opens the tokenizer
        assert res.code == 0, res.err
    else:
        assert_one_line_error(res, name, "outside the checkpoint")
    assert not (tmp_path / "dst").exists() and litter(tmp_path) == [] and tree_digest(src) == before


def test_symlinks_inside_the_checkpoint_are_fine(tmp_path_factory, tmp_path, capsys):
    """Links that stay inside (hub snapshots link into the repo's blobs/) are followed normally."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "blobs").mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (src / name).rename(src / "blobs" / name)
        (src / name).symlink_to(Path("blobs") / name)
    res = run_cli(["convert", src, tmp_path / "dst", "--to", "native", "--quiet"], capsys)
    assert res.code == 0, res.err
    assert not (tmp_path / "dst" / "tokenizer.json").is_symlink() and (tmp_path / "dst" / "tokenizer.json").is_file()


# -- hostile images ------------------------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (decompression bomb: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()[:300]


IMAGES = {
    "not an image": (b"%PDF-1.4 definitely not pixels", "not an image"),
    "empty file": (b"", "not an image"),
    "truncated": (_truncated_jpeg(), "cannot decode"),
    "decompression bomb": (_png_header(40_000, 40_000), "decompression bomb"),
    "zero size": (_png_header(0, 5), "image"),
}


@pytest.mark.parametrize("case", list(IMAGES))
@pytest.mark.parametrize("command", ["generate", "verify"])
def test_hostile_images_are_one_line_errors(tmp_path_factory, tmp_path, capsys, case, command):
    data, needle = IMAGES[case]
    image = tmp_path / "input.img"
    image.write_bytes(data)
    src = tiny_checkpoint(tmp_path_factory)
    res = run_cli([command, src, "--image", image, "--max-new-tokens", "1"], capsys)
    assert_one_line_error(res, "input.img", needle)


def test_pillow_limit_kept_even_if_disabled(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """A caller that switched Pillow's bomb check off (MAX_IMAGE_PIXELS = None) still gets the refusal."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    image = tmp_path / "bomb.png"
    image.write_bytes(_png_header(40_000, 40_000))
    for command in ("generate", "verify"):
        res = run_cli([command, tiny_checkpoint(tmp_path_factory), "--image", image, "--max-new-tokens", "1"], capsys)
        assert_one_line_error(res, "bomb.png", "decompression bomb")
