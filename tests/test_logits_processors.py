"""The greedy-changing logits processors (`model.logits_processors`) against transformers' `generate` with the same
generation_config.json: same tokens from `pgconv.generate`, and `pgconv verify` passes with the reference's tokens
from transformers' `generate` (the speculation is off when a processor is set)."""

from __future__ import annotations

import pytest

from pgconv.parity.verify import verify

from test_generation_config import _copy, _ours, _theirs
from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)

N = 10


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    """Greedy tokens without processors (eos 1 only), and the prompt length."""
    from test_generation_config import _inputs

    path = tiny_checkpoint("tiny")
    return _ours(path, N), _inputs(path)["input_ids"].shape[1]


CASES = {
    "repetition_penalty": lambda t, p: {"repetition_penalty": 50.0},
    "no_repeat_ngram_size": lambda t, p: {"no_repeat_ngram_size": 1},
    "bad_words_one": lambda t, p: {"bad_words_ids": [[t[0]], [t[3]]]},
    "bad_words_seq": lambda t, p: {"bad_words_ids": [[t[0], t[1]]]},
    "min_new_tokens": lambda t, p: {"eos_token_id": [1, t[0]], "min_new_tokens": 3},
    "min_length": lambda t, p: {"eos_token_id": [1, t[0]], "min_length": p + 2},
    "suppress_tokens": lambda t, p: {"suppress_tokens": [t[1], t[2]]},
    "begin_suppress_tokens": lambda t, p: {"begin_suppress_tokens": [t[0]]},
    "forced_eos_token_id": lambda t, p: {"eos_token_id": [1, 7], "forced_eos_token_id": 7},
    # transformers passes a decoder-only model's prompt as the "encoder" ids: prompt tokens are raised.
    "encoder_repetition_penalty": lambda t, p: {"encoder_repetition_penalty": 50.0},
    # min_new_tokens set: transformers overwrites the stated min_length with prompt + min_new_tokens.
    "min_length_void_with_min_new_tokens": lambda t, p: {"eos_token_id": [1, t[2]], "min_new_tokens": 1,
                                                         "min_length": p + 6},
}


@pytest.mark.parametrize("name", list(CASES))
def test_processor_tokens_equal_transformers_generate(tiny_checkpoint, tmp_path, base, name):
    tokens, prompt = base
    gen = {"eos_token_id": 1, "pad_token_id": 0, **CASES[name](tokens, prompt)}
    path = _copy(tiny_checkpoint, tmp_path, generation=gen)
    theirs = _theirs(path, N)
    assert theirs != tokens, "the processor must change the greedy tokens for this test to mean anything"
    assert _ours(path, N) == theirs
    report = verify(str(path), max_new_tokens=N)
    g = report["cases"][0]["generation"]
    assert report["passed"], report["failures"]
    assert g["reference_tokens_from"] == "generate" and g["reference_tokens"] == theirs
    assert g["config"]["passed"]


def test_forced_bos_never_acts_after_a_prompt(tiny_checkpoint, tmp_path, base):
    """transformers forces it only at sequence length 1: never after PaliGemma's prompt."""
    tokens, _ = base
    path = _copy(tiny_checkpoint, tmp_path, generation={"eos_token_id": 1, "forced_bos_token_id": 5})
    assert _theirs(path, N) == _ours(path, N) == tokens


def test_a_field_pgconv_does_not_apply_fails_the_config_check(monkeypatch, tiny_checkpoint, tmp_path):
    """The check reads transformers' resolved config itself: a field that may change greedy choices and that
    pgconv's generate does not apply is a named failure (not only a token divergence blamed on the model)."""
    from pgconv.parity import models

    orig = models.load_reference

    def biased(*args, **kwargs):
        ref = orig(*args, **kwargs)
        ref.generation_config.sequence_bias = [[[5], -3.0]]  # pgconv refuses this in a file; here it is only theirs
        return ref

    monkeypatch.setattr(models, "load_reference", biased)
    report = verify(str(tiny_checkpoint("tiny")), max_new_tokens=3)
    g = report["cases"][0]["generation"]
    assert not g["config"]["passed"] and "sequence_bias" in g["config"]["differences"][0]
    assert g["reference_tokens_from"] == "generate"


def test_encoder_no_repeat_ngram_size_is_refused(tiny_checkpoint, tmp_path):
    from pgconv.errors import InputError

    path = _copy(tiny_checkpoint, tmp_path, generation={"eos_token_id": 1, "encoder_no_repeat_ngram_size": 2})
    with pytest.raises(InputError, match="encoder_no_repeat_ngram_size"):
        verify(str(path), max_new_tokens=2)
