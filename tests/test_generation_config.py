"""Generation settings (`model.generation_config`, `model.logits_processors`) against transformers itself: what its
`from_pretrained` + `generate` resolve from config.json / generation_config.json, and the tokens its `generate`
returns, in `pgconv generate`, `pgconv.generate` and `pgconv verify` (issue 14: a verify that passed where
transformers stops after one token)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgconv
from pgconv.converter.checkpoint import open_checkpoint
from pgconv.converter.fixture import default_image
from pgconv.converter.load import generation_settings
from pgconv.errors import InputError
from pgconv.model.generate import generate
from pgconv.model.generation_config import GENERATE_DEFAULTS, resolve_generation
from pgconv.model.processor import Processor
from pgconv.parity import case
from pgconv.parity.generation import reference_settings
from pgconv.parity.verify import verify

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)

N = 8


def test_defaults_are_transformers_defaults():
    from transformers import GenerationConfig

    theirs = GenerationConfig._get_default_generation_params()
    assert {k: theirs[k] for k in GENERATE_DEFAULTS} == GENERATE_DEFAULTS


def _copy(tiny_checkpoint, tmp_path, preset="tiny", config=None, generation="keep"):
    """A copy of a tiny fixture with config.json edited by `config(d)` and generation_config.json replaced (None:
    removed; "keep": as written by the fixture)."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(preset), out)
    if config is not None:
        d = json.loads((out / "config.json").read_text())
        config(d)
        (out / "config.json").write_text(json.dumps(d))
    if generation is None:
        (out / "generation_config.json").unlink()
    elif generation != "keep":
        (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def _hf(path):
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def _inputs(path, hf=False):
    if hf:
        from transformers import AutoProcessor

        enc = AutoProcessor.from_pretrained(path)(images=_rgb(), text="<image>caption en", return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "pixel_values", "token_type_ids", "attention_mask")}
    return Processor.from_pretrained(path)(default_image(), "caption en")


def _rgb():
    from PIL import Image

    with Image.open(default_image()) as im:
        return im.convert("RGB")


def _theirs(path, n=N, **kwargs) -> list[int]:
    inputs = _inputs(path, hf=True)
    with torch.no_grad():
        out = _hf(path).generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _ours(path, n=N) -> list[int]:
    model = pgconv.load(path)
    x = _inputs(path)
    return generate(model, x["input_ids"], x["pixel_values"], x["token_type_ids"], x["attention_mask"],
                    max_new_tokens=n)[0].tolist()


def _first_token(tiny_checkpoint, preset="tiny") -> int:
    return _ours(tiny_checkpoint(preset), 1)[0]


def test_generation_config_eos_list_stops_like_transformers_and_verify_reports_it(tiny_checkpoint, tmp_path):
    """The issue's false PASS: generation_config.json's eos [1, X] with X the first greedy token. transformers
    stops after one token; so must pgconv generate, and verify's reference tokens must be that one token."""
    x = _first_token(tiny_checkpoint)
    path = _copy(tiny_checkpoint, tmp_path, generation={"bos_token_id": 2, "eos_token_id": [1, x], "pad_token_id": 0})
    assert _theirs(path) == [x]
    assert _ours(path) == [x]
    report = verify(str(path), max_new_tokens=N)
    g = report["cases"][0]["generation"]
    assert report["passed"], report["failures"]
    assert g["reference_tokens"] == g["candidate_tokens"] == [x]
    assert g["config"]["passed"] and g["config"]["transformers"]["eos_token_ids"] == [1, x]


def test_the_old_false_pass_now_fails(monkeypatch, tiny_checkpoint, tmp_path):
    """pgconv's old reading (config.json's eos only, generation_config.json ignored) under the same checkpoint:
    the speculation no longer accepts tokens running past the reference's eos, transformers' generate runs, and
    verify fails naming the settings difference instead of passing with tokens transformers never produces."""
    x = _first_token(tiny_checkpoint)
    path = _copy(tiny_checkpoint, tmp_path, generation={"eos_token_id": [1, x], "pad_token_id": 0})
    old = resolve_generation(json.loads((path / "config.json").read_text()), None)
    assert old.eos_token_ids == (1,)
    orig = case.run_case
    # verify imports run_case from parity.case when it runs: the old settings replace the resolved ones (arg 7).
    monkeypatch.setattr(case, "run_case", lambda *a, **k: orig(*a[:7], old, *a[8:], **k))
    report = verify(str(path), max_new_tokens=N)
    g = report["cases"][0]["generation"]
    assert not report["passed"]
    assert g["reference_tokens_from"] == "generate" and "eos" in g["speculation"]["reason"]
    assert g["reference_tokens"] == [x] and len(g["candidate_tokens"]) > 1
    assert not g["config"]["passed"] and "eos_token_ids" in g["config"]["differences"][0]
    assert any("generation settings differ" in f for f in report["failures"])


def test_top_level_eos_wins_over_text_config_without_generation_config(tiny_checkpoint, tmp_path):
    """Top-level eos 1 and text_config eos [1, X], no generation_config.json: transformers reads config.json's top
    level only and does not stop on X (all PaliGemma 2 configs of its conversion script look like this)."""
    x = _first_token(tiny_checkpoint)

    def edit(d):
        d["eos_token_id"] = 1
        d["text_config"]["eos_token_id"] = [1, x]

    path = _copy(tiny_checkpoint, tmp_path, config=edit, generation=None)
    theirs = _theirs(path)
    assert len(theirs) == N and theirs[0] == x
    assert _ours(path) == theirs
    report = verify(str(path), max_new_tokens=N)
    assert report["passed"], report["failures"]
    assert report["cases"][0]["generation"]["reference_tokens"] == theirs


def test_verify_reference_has_from_pretrained_generation_config(tiny_checkpoint, tmp_path):
    """verify builds the reference from a state dict (dtype cast): its generation config must be the one
    from_pretrained(path) gives, also without generation_config.json (text_config's eos is read then, when the
    top level has none)."""
    from pgconv.parity.models import load_reference

    def edit(d):
        d.pop("eos_token_id")
        d["text_config"]["eos_token_id"] = [1, 5]

    path = _copy(tiny_checkpoint, tmp_path, config=edit, generation=None)
    direct = reference_settings(_hf(path))
    cast = reference_settings(load_reference(path, torch.bfloat16, "cpu"))
    assert direct == cast and direct["eos_token_ids"] == [1, 5]
    assert generation_settings(open_checkpoint(path)).eos_token_ids == (1, 5)


_ID = st.integers(0, 40)
_EOS = st.one_of(st.none(), _ID, st.lists(_ID, min_size=1, max_size=3))
_FIELDS = st.fixed_dictionaries({}, optional={
    "eos_token_id": _EOS, "pad_token_id": st.one_of(st.none(), _ID), "bos_token_id": st.one_of(st.none(), _ID),
    "repetition_penalty": st.sampled_from([1.0, 1.3]), "no_repeat_ngram_size": st.sampled_from([0, 2]),
    "suppress_tokens": st.one_of(st.none(), st.lists(_ID, min_size=1, max_size=2)),
    "min_new_tokens": st.sampled_from([0, 3]), "max_new_tokens": st.sampled_from([4, 9]),
    "max_length": st.sampled_from([None, 30]), "min_length": st.sampled_from([0, 5]),
    "bad_words_ids": st.one_of(st.none(), st.lists(st.lists(_ID, min_size=1, max_size=2), min_size=1, max_size=2)),
})


@pytest.fixture(scope="module")
def hf_tiny(tiny_checkpoint):
    return _hf(tiny_checkpoint("tiny"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=_FIELDS, text=_FIELDS, gen=st.one_of(st.none(), _FIELDS))
def test_resolution_matches_transformers(hf_tiny, tmp_path_factory, top, text, gen):
    """Random eos/pad/processor fields at config.json's top level, in text_config and in generation_config.json:
    pgconv's settings equal what transformers' from_pretrained + generate resolve (its own code)."""
    from transformers import GenerationConfig

    d = tmp_path_factory.mktemp("g")
    config = {"model_type": "paligemma", **top, "text_config": {"model_type": "gemma", **text}}
    (d / "config.json").write_text(json.dumps(config))
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
        hf_tiny.generation_config = GenerationConfig.from_pretrained(d)
    else:  # what adjust_generation_fn does without the file
        hf_tiny.generation_config = GenerationConfig.from_pretrained(d, config_file_name="config.json",
                                                                    _from_model_config=True)
    ours = resolve_generation(config, gen)
    theirs = reference_settings(hf_tiny)
    assert list(ours.eos_token_ids) == theirs["eos_token_ids"]
    assert ours.pad_token_id == theirs["pad_token_id"]
    assert ours.processors == theirs["processors"]
    assert ours.max_new_tokens == hf_tiny.generation_config.max_new_tokens
    assert ours.max_length == hf_tiny.generation_config.max_length


@pytest.mark.parametrize("bad, needle", [
    ({"eos_token_id": "1"}, "eos_token_id"), ({"eos_token_id": [1, True]}, "eos_token_id"),
    ({"pad_token_id": [0]}, "pad_token_id"), ({"do_sample": "yes"}, "do_sample"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"bad_words_ids": [1, 2]}, "bad_words_ids"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"top_p": float("nan")}, "top_p"),
])
def test_bad_values_are_one_line_errors_naming_the_file_and_key(bad, needle):
    with pytest.raises(InputError, match=f"generation_config.json: {needle}"):
        resolve_generation({}, bad)


def test_unsupported_fields_are_refused_by_name(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path, generation={"eos_token_id": 1, "sequence_bias": [[[5], -1.0]]})
    model = pgconv.load(path)
    x = _inputs(path)
    with pytest.raises(InputError, match="sequence_bias"):
        generate(model, x["input_ids"], x["pixel_values"], max_new_tokens=2)
    with pytest.raises(InputError, match="sequence_bias"):
        verify(str(path), max_new_tokens=2)
    beams = _copy(tiny_checkpoint, tmp_path / "b", generation={"eos_token_id": 1, "num_beams": 3})
    with pytest.raises(InputError, match="num_beams"):
        generate(pgconv.load(beams), x["input_ids"], x["pixel_values"], max_new_tokens=2)
    assert verify(str(beams), max_new_tokens=3)["passed"]  # verify forces greedy search on both sides


def test_generate_cli_uses_the_generation_config(tiny_checkpoint, tmp_path, capsys):
    """`pgconv generate` stops where transformers' generate does, and without --max-new-tokens takes the
    generation config's max_new_tokens (else transformers' 20)."""
    from transformers import AutoProcessor

    from pgconv.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        out, err = capsys.readouterr()
        assert exit_.value.code == 0, err
        return out.strip()

    def text(path, ids):
        return AutoProcessor.from_pretrained(path).tokenizer.decode(ids, skip_special_tokens=False).strip()

    x = _first_token(tiny_checkpoint)
    stop = _copy(tiny_checkpoint, tmp_path, generation={"eos_token_id": [1, x], "pad_token_id": 0})
    assert run("generate", str(stop), "--max-new-tokens", "8") == text(stop, [x])
    for name, gen in (("three", {"eos_token_id": 1, "max_new_tokens": 3}), ("default", {"eos_token_id": 1})):
        path = _copy(tiny_checkpoint, tmp_path / name, generation=gen)
        inputs = _inputs(path, hf=True)
        with torch.no_grad():  # transformers' generate with no arguments: its generation config decides
            ids = _hf(path).generate(**inputs)[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(ids) == gen.get("max_new_tokens", 20)
        assert run("generate", str(path)) == text(path, ids)
