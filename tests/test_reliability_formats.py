"""Issue 8 catalogue, the rest: NaN/Inf weights (converted faithfully, reported by inspect --scan and verify),
big_vision `.npz` damage through `pgconv convert`, and processor inputs (tokenizer files, prompts, image token
count) through `pgconv generate` and `pgconv verify`.

Reader/processor-level versions live with their modules: test_npz.py (`test_not_a_zip`, `test_truncated`,
`test_wrong_dtypes_name_file_and_member`), test_processor.py (`test_missing_tokenizer_files`, `test_prompt_errors`,
`test_config_mismatch_is_an_error`), test_inspect.py (NaN/Inf counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reliability_helpers import (assert_one_line_error, fresh_copy, litter, npz_checkpoint, run_cli, tiny_checkpoint,
                                 tree_digest)

EMBED = "language_model.model.embed_tokens.weight"
DOWN = "language_model.model.layers.1.mlp.down_proj.weight"


# -- NaN / Inf in weights ------------------------------------------------------------------------------------------

def test_nan_inf_weights_are_converted_faithfully_and_reported(tmp_path_factory, tmp_path, capsys):
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd[EMBED][3, :2] = float("nan")
    sd[EMBED][3, 2] = float("-inf")
    sd[DOWN][0, 0] = float("inf")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})

    res = run_cli(["convert", src, tmp_path / "out", "--to", "hf-v5-save", "--quiet"], capsys)
    assert res.code == 0, res.err
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in (EMBED, DOWN):  # hf-v5-save keeps these names; bit for bit, NaN payloads included
        assert torch.equal(out[name].view(torch.int32), sd[name].view(torch.int32))

    res = run_cli(["inspect", tmp_path / "out", "--scan", "--json"], capsys)
    assert res.code == 1
    report = json.loads(res.out)
    assert report["nonfinite"] == {EMBED: {"nan": 2, "inf": 1}, DOWN: {"nan": 0, "inf": 1}}

    res = run_cli(["verify", tmp_path / "out", "--max-new-tokens", "1", "--probes", "coarse"], capsys)
    assert res.code == 1 and "Traceback" not in res.err, res.err
    verdict = res.out.strip().splitlines()[-1]
    assert verdict.startswith("FAIL") and "NaN/Inf in 2 checkpoint tensor(s)" in verdict, verdict


# -- big_vision .npz -----------------------------------------------------------------------------------------------

@pytest.fixture
def npz_source(tmp_path_factory) -> Path:
    return npz_checkpoint(tmp_path_factory)


def _rewrite(src: Path, dst: Path, edit) -> None:
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(dst, **arrays)


HEAD_BIAS = "params/img/head/bias"
NORM = "params/llm/final_norm/scale"


def _npz_cases() -> dict:
    return {
        "not a zip": (lambda p, q: q.write_bytes(b"\x93NUMPY" + p.read_bytes()[:100]), ["not a zip"]),
        "truncated": (lambda p, q: q.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), ["truncated"]),
        "member with wrong dtype": (
            lambda p, q: _rewrite(p, q, lambda a: a.update({HEAD_BIAS: a[HEAD_BIAS].astype(np.int32)})),
            ["img/head/bias", "<i4"]),
        "bf16 void without matching shape": (
            lambda p, q: _rewrite(p, q, lambda a: a.update({NORM: np.zeros(71, dtype="V2")})),
            ["llm/final_norm/scale", "71"]),
        "void of the wrong width": (
            lambda p, q: _rewrite(p, q, lambda a: a.update({NORM: np.zeros(72, dtype="V4")})),
            ["llm/final_norm/scale", "V4"]),
        "member missing": (lambda p, q: _rewrite(p, q, lambda a: a.pop(NORM)), ["llm/final_norm/scale"]),
        "data byte flipped (zip CRC)": (_flip_data_byte, ["img/head/bias", "corrupt", "CRC-32"]),
        "local header name differs": (_rename_local_header, ["corrupt zip entry"]),
        "compressed member corrupt": (_corrupt_compressed, ["corrupt"]),
    }


def _flip_data_byte(p: Path, q: Path) -> None:
    from pgconv.converter.npz import NpzReader

    with NpzReader(p) as r:
        offset = r.members[HEAD_BIAS].data_offset
    raw = bytearray(p.read_bytes())
    raw[offset + 3] ^= 0x40  # still a valid float: only the zip CRC can tell
    q.write_bytes(bytes(raw))


def _rename_local_header(p: Path, q: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[30] ^= 0x01  # first byte of the first member's name in its local header (the central directory keeps it)
    q.write_bytes(bytes(raw))


def _corrupt_compressed(p: Path, q: Path) -> None:
    with np.load(p) as z:
        np.savez_compressed(q, **{k: z[k] for k in z.files})
    raw = bytearray(q.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    q.write_bytes(bytes(raw))


@pytest.mark.parametrize("case", list(_npz_cases()))
def test_damaged_npz_is_one_line_exit_2(npz_source, tmp_path, capsys, case):
    mutate, needles = _npz_cases()[case]
    bad = tmp_path / "bad.npz"
    mutate(npz_source, bad)
    before = bad.read_bytes()
    res = run_cli(["convert", bad, tmp_path / "out", "--to", "hf-legacy", "--config", "tiny", "--quiet"], capsys)
    assert_one_line_error(res, "bad.npz", *needles)
    assert not (tmp_path / "out").exists() and litter(tmp_path) == [] and bad.read_bytes() == before


def test_npz_never_unpickles(npz_source, tmp_path, capsys):
    """An object-array member (np.save pickles it) is refused by dtype, never loaded."""
    _rewrite(npz_source, tmp_path / "bad.npz", lambda a: a.update({HEAD_BIAS: np.array([{"x": 1}], dtype=object)}))
    res = run_cli(["convert", tmp_path / "bad.npz", tmp_path / "out", "--to", "hf-legacy", "--config", "tiny"], capsys)
    assert_one_line_error(res, "bad.npz", "img/head/bias")


def test_valid_npz_still_converts(npz_source, tmp_path, capsys):
    """The cases above fail because of the damage, not the set-up."""
    res = run_cli(["convert", npz_source, tmp_path / "out", "--to", "hf-legacy", "--config", "tiny", "--quiet"], capsys)
    assert res.code == 0, res.err


# -- processor inputs through generate and verify -------------------------------------------------------------------

def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


PROCESSOR_CASES = {
    "tokenizer.json missing": (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json", "missing"]),
    "tokenizer.json invalid": (lambda d: (d / "tokenizer.json").write_text("{oops"), ["tokenizer.json"]),
    "image_seq_length wrong": (lambda d: _edit_json(d / "preprocessor_config.json", image_seq_length=5),
                               ["image_seq_length=5", "16 image tokens"]),
    "image size wrong": (lambda d: _edit_json(d / "preprocessor_config.json", size={"height": 56, "width": 56}),
                         ["preprocessor_config.json", "does not match the model's image_size"]),
    "image token id wrong": (lambda d: _edit_json(d / "config.json", image_token_index=7),
                             ["<image>", "image_token_index=7"]),
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
@pytest.mark.parametrize("command", ["generate", "verify"])
def test_processor_files_are_checked(tmp_path_factory, tmp_path, capsys, command, case):
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    mutate, needles = PROCESSOR_CASES[case]
    mutate(src)
    before = tree_digest(src)
    res = run_cli([command, src, "--max-new-tokens", "1", "--probes" if command == "verify" else "--seed",
                   "coarse" if command == "verify" else "0"], capsys)
    assert_one_line_error(res, *needles)
    assert tree_digest(src) == before


def test_missing_preprocessor_config(tmp_path_factory, tmp_path, capsys):
    """generate takes the image size and token count from config.json; verify needs transformers' processor,
    which cannot load without it: a one-line error, not a traceback."""
    src = fresh_copy(tiny_checkpoint(tmp_path_factory), tmp_path / "src")
    (src / "preprocessor_config.json").unlink()
    assert run_cli(["generate", src, "--max-new-tokens", "2"], capsys).code == 0
    assert_one_line_error(run_cli(["verify", src, "--max-new-tokens", "1"], capsys), "processor")


def test_prompts_with_image_tokens_and_empty_prompts(tmp_path_factory, capsys):
    """An empty prompt is valid (transformers and the hub golden test use one); an <image> marker in a prompt marks
    where an image goes (as transformers); markers and --image files must agree in number."""
    src = tiny_checkpoint(tmp_path_factory)
    for command in ("generate", "verify"):
        res = run_cli([command, src, "--prompt", "", "--max-new-tokens", "2"], capsys)
        assert res.code == 0, res.err
    assert run_cli(["generate", src, "--prompt", "<image>caption en", "--max-new-tokens", "2"], capsys).code == 0
    from pgconv.converter.fixture import default_image

    image = str(default_image())
    assert_one_line_error(run_cli(["generate", src, "--image", image, "--prompt", "<image>a<image>",
                                   "--max-new-tokens", "2"], capsys), "2 <image> marker(s) but 1 --image")
    assert run_cli(["verify", src, "--prompt", "caption <image>", "--max-new-tokens", "1"], capsys).code == 0
    assert_one_line_error(run_cli(["verify", src, "--image", image, "--image", image, "--image", image, "--prompt",
                                   "<image>a<image>", "--max-new-tokens", "1"], capsys), "3 images", "taking 2")
