"""`pgconv fixture` and `pgconv generate` end to end (in-process through `pgconv.cli.main`)."""

from __future__ import annotations

import pytest
import torch

from pgconv.cli import main
from pgconv.converter.fixture import default_image, make_fixture

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("cli") / "tiny", "tiny")


def test_fixture_command(tmp_path, capsys):
    code, out, _ = run(capsys, "fixture", str(tmp_path / "a"), "--preset", "tiny-pg2", "--seed", "3")
    assert code == 0 and "tiny-pg2" in out and (tmp_path / "a" / "model.safetensors").is_file()
    code, _, err = run(capsys, "fixture", str(tmp_path / "a"))
    assert code == 2 and "not empty" in err and err.count("\n") == 1
    code, _, _ = run(capsys, "fixture", str(tmp_path / "a"), "--force")
    assert code == 0


def test_fixture_unknown_preset_is_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "fixture", str(tmp_path / "b"), "--preset", "paligemma-3b")
    assert code == 2 and out == ""
    assert err.startswith("pgconv: error: unknown preset 'paligemma-3b'; valid presets: tiny, tiny-pg2, ")
    assert err.count("\n") == 1 and not (tmp_path / "b").exists()


def test_generate_matches_transformers_greedy(tiny_dir, capsys):
    from PIL import Image

    prompt = "answer en where is the cow standing?"
    code, out, err = run(capsys, "generate", str(tiny_dir), "--image", str(default_image()), "--prompt", prompt,
                         "--max-new-tokens", "10")
    assert code == 0, err
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")
    proc = transformers.PaliGemmaProcessor.from_pretrained(tiny_dir)
    inputs = proc(images=Image.open(default_image()), text=prompt, return_tensors="pt")
    inputs.pop("labels")
    ids = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    expected = proc.decode(ids, skip_special_tokens=True)
    assert expected.strip() and out == expected + "\n"


@pytest.mark.parametrize("prompt", ["answer en are these the same?", "<image> or <image>: which is brighter?"])
def test_generate_with_two_images_matches_transformers_greedy(tiny_dir, tmp_path, capsys, prompt):
    """Repeated --image: several images in the one prompt (up front, or one per <image> marker, in order)."""
    from PIL import Image

    first = Image.open(default_image()).convert("RGB")
    second = first.transpose(Image.Transpose.FLIP_TOP_BOTTOM).rotate(90, expand=True)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    first.save(paths[0]), second.save(paths[1])
    args = ["generate", str(tiny_dir), "--image", str(paths[0]), "--image", str(paths[1]), "--prompt", prompt,
            "--max-new-tokens", "10"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager")
    proc = transformers.PaliGemmaProcessor.from_pretrained(tiny_dir)
    images = [Image.open(p) for p in paths]
    inputs = proc(images=[images] if "<image>" not in prompt else images, text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 2
    inputs.pop("labels")
    ids = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    expected = proc.decode(ids, skip_special_tokens=True)
    assert expected.strip() and out == expected + "\n"


def test_generate_image_markers_must_match_the_images(tiny_dir, capsys):
    image = str(default_image())
    code, _, err = run(capsys, "generate", str(tiny_dir), "--image", image, "--prompt", "<image><image>two?")
    assert_one_line_error(code, err, "--prompt holds 2 <image> marker(s) but 1 --image")
    code, out, err = run(capsys, "generate", str(tiny_dir), "--prompt", "<image> and <image>", "--max-new-tokens", "2")
    assert code == 0 and out.strip(), err  # no --image: the built-in image for every marker
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0 and "Repeat it for several images" in out


def test_generate_default_checkpoint_and_sampling(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path))
    code, greedy, err = run(capsys, "generate", "--max-new-tokens", "6")
    assert code == 0 and greedy.strip(), err
    assert len(list(tmp_path.iterdir())) == 1  # the default checkpoint was created in the cache
    sample = ["generate", "--max-new-tokens", "12", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95",
              "--dtype", "bfloat16"]
    a = run(capsys, *sample, "--seed", "1")
    b = run(capsys, *sample, "--seed", "1")
    c = run(capsys, *sample, "--seed", "2")
    assert a == b and a[0] == 0 and a[1] != c[1]


def test_generate_input_errors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    code, _, err = run(capsys, "generate", str(tiny_dir), "--image", str(bad))
    assert code == 2 and err.startswith("pgconv: error: ") and "not an image file" in err and err.count("\n") == 1
    code, _, err = run(capsys, "generate", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("pgconv: error: ")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", str(tiny_dir), "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err


@pytest.mark.parametrize("option", [["--top-k", "5"], ["--top-p", "0.9"]])
def test_sampling_options_without_temperature_are_refused(capsys, option):
    """At the default temperature 0 decoding is greedy: --top-k/--top-p would be silently ignored."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--max-new-tokens", "1", *option])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--temperature" in err



# -- bad input is one line, exit 2, for generate and (before any model is loaded) verify ----------------------------


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert err.startswith("pgconv: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err


def _broken_copy(tiny_dir, tmp_path, name: str, content: str):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    (d / name).unlink()
    (d / name).write_text(content)
    return d


def _preprocessor(tiny_dir, **changes) -> str:
    import json

    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    return json.dumps({**pre, **changes})


@pytest.mark.parametrize("command", ["generate", "verify"])
@pytest.mark.parametrize(("key", "value"), [("resample", 99), ("rescale_factor", "x"), ("image_mean", [0.5]),
                                            ("image_std", [0, 0, 0]), ("do_normalize", "yes"),
                                            ("image_seq_length", 0), ("size", {"height": 10**9, "width": 28})])
def test_bad_preprocessor_config_is_one_line(tiny_dir, tmp_path, capsys, command, key, value):
    d = _broken_copy(tiny_dir, tmp_path, "preprocessor_config.json", _preprocessor(tiny_dir, **{key: value}))
    code, out, err = run(capsys, command, str(d), "--max-new-tokens", "1")
    assert_one_line_error(code, err, "preprocessor_config.json", key)


@pytest.mark.parametrize("command", ["generate", "verify"])
@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"])
@pytest.mark.parametrize(("content", "problem"), [("[]", "expected a JSON object"),
                                                  ("[" * 50000 + "]" * 50000, "nested too deeply")])
def test_json_file_not_an_object_is_one_line(tiny_dir, tmp_path, capsys, command, name, content, problem):
    d = _broken_copy(tiny_dir, tmp_path, name, content)
    code, _, err = run(capsys, command, str(d), "--max-new-tokens", "1")
    assert_one_line_error(code, err, name, problem)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("command", ["generate", "verify"])
def test_fifo_config_file_is_refused_not_read(tiny_dir, tmp_path, capsys, command):
    import os

    d = _broken_copy(tiny_dir, tmp_path, "preprocessor_config.json", "")
    (d / "preprocessor_config.json").unlink()
    os.mkfifo(d / "preprocessor_config.json")  # reading it would block forever
    code, _, err = run(capsys, command, str(d), "--max-new-tokens", "1")
    assert_one_line_error(code, err, "preprocessor_config.json", "not a regular file")


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_prompt_that_is_not_utf8_is_one_line(tiny_dir, capsys, command):
    # What Python makes of `--prompt "$(printf 'a\xffb')"` (undecodable argv bytes become lone surrogates).
    code, _, err = run(capsys, command, str(tiny_dir), "--prompt", "a\udcffb", "--max-new-tokens", "1")
    assert_one_line_error(code, err, "--prompt", "UTF-8")


@pytest.mark.parametrize(("option", "value"), [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
    ("--top-p", "nan"), ("--top-p", "inf"), ("--top-p", "0"),
    ("--seed", "99999999999999999999999"), ("--seed", "18446744073709551616"), ("--seed", "-1"),
])
def test_bad_sampling_options_are_one_line(tiny_dir, capsys, option, value):
    argv = ["generate", str(tiny_dir), "--max-new-tokens", "1", "--temperature", "1", option, value]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, option)


def test_largest_seed_is_accepted(tiny_dir, capsys):
    code, out, err = run(capsys, "generate", str(tiny_dir), "--max-new-tokens", "2", "--temperature", "1",
                         "--seed", str(2**64 - 1))
    assert code == 0 and out.endswith("\n"), err


@pytest.mark.parametrize("command", ["generate", "verify"])
@pytest.mark.parametrize("n", ["491", "100000000000"])
def test_max_new_tokens_beyond_the_model_positions_is_one_line(tiny_dir, capsys, command, n):
    # tiny: 512 positions; "caption en" is 16 image tokens + <bos> + 5 text tokens = 22, so 490 new tokens fit.
    code, _, err = run(capsys, command, str(tiny_dir), "--max-new-tokens", n)
    assert_one_line_error(code, err, "--max-new-tokens", "512 positions", "at most 490 new tokens")


def test_check_length_boundary():
    from pgconv.model.generate import check_length
    from pgconv.errors import InputError

    check_length(22, 490, 512)
    with pytest.raises(InputError, match="at most 490 new tokens fit"):
        check_length(22, 491, 512)
    with pytest.raises(InputError, match="--prompt: the prompt is 512 tokens"):
        check_length(512, 1, 512)


def test_verify_api_refuses_non_utf8_prompt_and_long_generation(tiny_dir):
    """The library entry point checks too (the CLI's own callback catches the prompt first)."""
    from pgconv.errors import InputError
    from pgconv.parity.verify import verify

    with pytest.raises(InputError, match="not valid UTF-8"):
        verify(tiny_dir, prompts=["a\udcffb"])
    with pytest.raises(InputError, match="at most 490 new tokens fit"):
        verify(tiny_dir, max_new_tokens=491)


def test_generate_verbose_prints_the_kernel_chosen_per_shape(tiny_dir, tmp_path, monkeypatch, capsys):
    from pgconv.model import cpu_gemv, cpu_kernels

    monkeypatch.setenv("PGCONV_CACHE", str(tmp_path))
    monkeypatch.setenv("PGCONV_KERNELS", "auto")
    cpu_kernels.reset()
    argv = ("generate", str(tiny_dir), "--max-new-tokens", "3", "--dtype", "bfloat16")
    code, out, err = run(capsys, *argv, "--verbose")
    assert code == 0, err
    *lines, gemv = err.splitlines()
    assert lines and all(line.startswith(("kernel: linear bfloat16 ", "kernel: gelu_tanh")) for line in lines)
    assert any(line.startswith("kernel: gelu_tanh * up bfloat16 ") for line in lines)  # Gemma's GeGLU
    assert gemv.startswith("kernels: pgconv's one-row kernel (gemv) ")
    assert ("built for" in gemv) == cpu_gemv.available()
    assert any("rows=1: " in line and "(measured: " in line for line in lines)  # decode products, timed here
    cpu_kernels.reset()  # the next process: every decision comes from the cache, the text is the same
    code, again, err = run(capsys, *argv, "--verbose")
    assert code == 0 and again == out and err.count("(cached") == len(lines)
    if cpu_gemv.available():  # timed for every decode product (whichever won on these tiny shapes)
        assert all(" gemv " in line for line in lines if "rows=1: " in line)
    assert run(capsys, *argv)[1:] == (out, "")
    cpu_kernels.reset()


def test_generated_control_characters_are_escaped(monkeypatch, capsys, tiny_dir):
    """Generated text comes from the checkpoint's tokenizer (anyone's file): ESC/BEL never reach the terminal raw."""
    from pgconv.model.processor import Processor

    monkeypatch.setattr(Processor, "stream_decoder", lambda self: (lambda token: "\x1b]0;owned\x07\tok\n"))
    code, out, _ = run(capsys, "generate", str(tiny_dir), "--max-new-tokens", "1")
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07\tok" in out
