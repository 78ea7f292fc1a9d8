"""Speculative reference tokens (`parity.generation.speculate`, used by `parity.case`): our greedy tokens are taken
as the reference's when its uncached argmax agrees at every step with margins clear of a near tie; otherwise
transformers' `generate` runs as before. Both paths, and the accepted tokens against `generate`'s."""

from __future__ import annotations

import pytest
import torch

from pgconv.parity import case, generation
from pgconv.parity.generation import SPECULATION_MARGIN, speculate
from pgconv.parity.verify import verify

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)


def _steps(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_speculate_accepts_clear_agreement_and_rejects_disagreement_and_near_ties():
    steps = _steps([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    ok = speculate(steps, [0, 2], near_tie=0.1)
    assert ok["accepted"] and ok["step"] is None and ok["margin_needed"] == pytest.approx(SPECULATION_MARGIN * 0.1)
    bad = speculate(steps, [0, 1], near_tie=0.1)
    assert not bad["accepted"] and bad["step"] == 1 and "argmax" in bad["reason"]
    tie = speculate(_steps([[5.0, 0.0, 0.0], [0.0, 0.15, 0.0]]), [0, 1], near_tie=0.1)  # margin 0.15 < 0.2
    assert not tie["accepted"] and tie["step"] == 1 and "near tie" in tie["reason"]
    exact = speculate(_steps([[1.0, 1.0, 0.0]]), [0], near_tie=0.0)  # an exact tie is never accepted
    assert not exact["accepted"]
    assert not speculate(steps, [0], near_tie=0.1)["accepted"]  # lengths differ


def _gen(report):
    return report["cases"][0]["generation"]


@pytest.mark.parametrize("ckpt", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accepted_tokens_equal_transformers_generate(monkeypatch, tiny_checkpoint, ckpt, dtype):
    path = str(tiny_checkpoint(ckpt))
    spec = verify(path, dtype=dtype, max_new_tokens=8)
    assert spec["passed"], spec["failures"]
    monkeypatch.setattr(generation, "SPECULATION_MARGIN", float("inf"))  # never accepted: generate runs
    plain = verify(path, dtype=dtype, max_new_tokens=8)
    assert plain["passed"], plain["failures"]
    assert _gen(plain)["reference_tokens_from"] == "generate" and "reference_generate" in plain["cases"][0]["timing"]
    assert not _gen(plain)["speculation"]["accepted"]
    # Whichever path the speculative run took, its reference tokens are transformers' generate's.
    assert _gen(spec)["reference_tokens"] == _gen(plain)["reference_tokens"]
    assert spec["generation"]["reference_tokens_from"] == _gen(spec)["reference_tokens_from"]
    if _gen(spec)["reference_tokens_from"] == "teacher-forced argmax":
        assert "reference_generate" not in spec["cases"][0]["timing"]
        # Same sequence, same forwards: the probe rows and the teacher-forced metrics agree.
        assert [p["nrmse"] for p in spec["probes"]] == [p["nrmse"] for p in plain["probes"]]
        assert _gen(spec)["teacher_forced"]["kl"] == _gen(plain)["teacher_forced"]["kl"]


def test_fp32_tiny_fixtures_take_the_speculative_path(tiny_checkpoint):
    for ckpt in ("tiny", "tiny-pg2"):
        g = _gen(verify(str(tiny_checkpoint(ckpt)), dtype="float32", max_new_tokens=8))
        assert g["reference_tokens_from"] == "teacher-forced argmax", g["speculation"]
        assert g["speculation"]["accepted"] and g["cache"]["passed"] and not g["cache"]["extra_forward"]


def test_a_disagreeing_candidate_falls_back_to_generate(monkeypatch, tiny_checkpoint):
    """Our last token replaced by another one: the reference's argmax disagrees there, so `generate` runs, the
    forwards are redone over the reference's tokens (the probes still match) and the generation check fails at
    that step (not a near tie)."""
    orig = case.ours_greedy

    def mutated(*args, **kwargs):
        tokens, steps = orig(*args, **kwargs)
        tokens[-1] = (tokens[-1] + 1) % steps.shape[-1]
        steps[-1, tokens[-1]] = steps[-1].max() + 10.0  # our step logits agree with our (wrong) token
        return tokens, steps

    monkeypatch.setattr(case, "ours_greedy", mutated)
    report = verify(str(tiny_checkpoint("tiny")), dtype="float32", max_new_tokens=4)
    g = _gen(report)
    assert g["reference_tokens_from"] == "generate" and not g["speculation"]["accepted"]
    n = len(g["candidate_tokens"])
    assert g["speculation"]["step"] == n - 1 and "argmax" in g["speculation"]["reason"]
    assert "reference_forward_again" in report["cases"][0]["timing"]
    assert g["reference_tokens"][:-1] == g["candidate_tokens"][:-1] != g["reference_tokens"]
    assert not report["passed"] and not g["passed"]
    assert g["first_divergence"]["step"] == n - 1 and not g["first_divergence"]["near_tie"]
    assert report["first_divergence"] is None  # no probe is to blame: every probe ran over the reference's tokens
    assert all(p["passed"] for p in report["probes"])


def test_a_generation_config_that_changes_greedy_choices_disables_speculation(monkeypatch, tiny_checkpoint):
    """transformers' logits processors (here a repetition penalty) make `generate` differ from the raw argmax: the
    speculation is not tried and the reference's tokens come from `generate`, penalty included."""
    from transformers import GenerationConfig

    from pgconv.parity.generation import greedy_changers

    assert greedy_changers(GenerationConfig()) == []
    assert greedy_changers(GenerationConfig(repetition_penalty=1.0, suppress_tokens=[])) == []
    assert greedy_changers(GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=2)) == [
        "no_repeat_ngram_size", "repetition_penalty"]
    from pgconv.parity import models

    orig = models.load_reference

    def penalised(*args, **kwargs):
        ref = orig(*args, **kwargs)
        ref.generation_config.repetition_penalty = 1.5
        return ref

    monkeypatch.setattr(models, "load_reference", penalised)
    g = _gen(verify(str(tiny_checkpoint("tiny")), dtype="float32", max_new_tokens=4))
    assert g["reference_tokens_from"] == "generate"
    assert "repetition_penalty" in g["speculation"]["reason"]
