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

