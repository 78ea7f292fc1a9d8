"""generate(): token-identical to transformers' greedy `generate`, plus sampling, EOS, streaming and caching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgconv.model.generate import _filter_top_k, _filter_top_p, generate, sample_next
from reference_models import CONFIGS, make_inputs, pair

NO_EOS = [9999]  # outside the tiny vocabulary: generation runs to max_new_tokens


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    hf, ours = pair(cfg, seed=2)
    return cfg, hf, ours


def hf_new_tokens(hf, inp, **kwargs):
    with torch.no_grad():
        out = hf.generate(**inp, do_sample=False, **kwargs)
    return out[:, inp["input_ids"].shape[1] :]


@pytest.mark.parametrize("prompt_lens", [[5], [3, 9]], ids=["batch1", "batch2-left-padded"])
def test_greedy_matches_transformers(models, prompt_lens):
    cfg, hf, ours = models
    inp = make_inputs(cfg, prompt_lens, seed=7)
    ref = hf_new_tokens(hf, inp, max_new_tokens=12, eos_token_id=NO_EOS)
    got = generate(ours, **inp, max_new_tokens=12, eos_token_ids=NO_EOS)
    assert got.tolist() == ref.tolist()
    # The random model must not be degenerate, or token identity would prove little.
    assert all(len(set(row)) >= 3 for row in got.tolist())


def test_greedy_with_two_images_per_prompt_matches_transformers(models):
    cfg, hf, ours = models
    inp = make_inputs(cfg, [3, 7], seed=5, images=2)
    ref = hf_new_tokens(hf, inp, max_new_tokens=10, eos_token_id=NO_EOS)
    got = generate(ours, **inp, max_new_tokens=10, eos_token_ids=NO_EOS)
    assert got.tolist() == ref.tolist()
    assert all(len(set(row)) >= 3 for row in got.tolist())


def test_eos_stops_each_row_and_pads_like_transformers(models):
    cfg, hf, ours = models
    inp = make_inputs(cfg, [3, 9], seed=7)
    free = generate(ours, **inp, max_new_tokens=12, eos_token_ids=NO_EOS)
    eos = int(free[0, 2])  # row 0 stops at step 2 (or earlier); row 1 keeps going unless it meets it
    ref = hf_new_tokens(hf, inp, max_new_tokens=12, eos_token_id=[eos], pad_token_id=cfg.pad_token_id)
    got = generate(ours, **inp, max_new_tokens=12, eos_token_ids=[eos], pad_token_id=cfg.pad_token_id)
    assert got.tolist() == ref.tolist()
    row0 = got[0].tolist()
    first = row0.index(eos)
    assert all(tok == cfg.pad_token_id for tok in row0[first + 1 :])


def test_streams_every_step_runs_vision_once_and_prefills_one_logit_row():
    cfg = CONFIGS["tiny"]
    _, ours = pair(cfg, seed=2)
    inp = make_inputs(cfg, [3, 9], seed=7)
    streamed, vision_calls, logit_rows = [], [], []
    ours.vision.register_forward_hook(lambda *_: vision_calls.append(1))
    real_logits = ours.logits
    ours.logits = lambda h: (logit_rows.append(h.shape[1]), real_logits(h))[1]
    got = generate(ours, **inp, max_new_tokens=6, eos_token_ids=NO_EOS, on_token=lambda t: streamed.append(t.clone()))
    assert torch.equal(torch.stack(streamed, dim=1), got)
    assert len(vision_calls) == 1
    assert logit_rows == [1] * 6  # prefill keeps only the last position; 5 decode steps of one token


def test_cache_is_static_and_reused():
    cfg = CONFIGS["tiny"]
    _, ours = pair(cfg, seed=2)
    inp = make_inputs(cfg, [4], seed=7)
    first = generate(ours, **inp, max_new_tokens=5, eos_token_ids=NO_EOS)
    cache = ours.text.blocks[0].attn.cache
    ptr, shape = cache.k.data_ptr(), tuple(cache.k.shape)
    again = generate(ours, **inp, max_new_tokens=5, eos_token_ids=NO_EOS)
    assert torch.equal(first, again)  # a reused (reset) cache gives the same tokens
    assert ours.text.blocks[0].attn.cache.k.data_ptr() == ptr and tuple(cache.k.shape) == shape
    assert not any("cache" in k for k in ours.state_dict())


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    cfg = CONFIGS["tiny"]
    _, ours = pair(cfg, seed=2)
    inp = make_inputs(cfg, [3, 9], seed=7)
    kw = dict(max_new_tokens=10, eos_token_ids=NO_EOS)
    a = generate(ours, **inp, temperature=1.5, seed=11, **kw)
    b = generate(ours, **inp, temperature=1.5, seed=11, **kw)
    c = generate(ours, **inp, temperature=1.5, seed=12, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(ours, **inp, **kw)
    assert torch.equal(generate(ours, **inp, temperature=0.7, top_k=1, seed=3, **kw), greedy)
    assert torch.equal(generate(ours, **inp, temperature=0.7, top_p=1e-6, seed=3, **kw), greedy)


logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(1, 50), st.floats(0.05, 1.0))
def test_filters_match_transformers_warpers(row, k, p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([row])
    ids = torch.zeros((1, 1), dtype=torch.long)
    assert torch.equal(_filter_top_k(logits, k), TopKLogitsWarper(top_k=k)(ids, logits.clone()))
    assert torch.equal(_filter_top_p(logits, p), TopPLogitsWarper(top_p=p)(ids, logits.clone()))


def test_sample_next_distribution_follows_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 2.0, generator=g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.03)


def test_a_cache_that_does_not_fit_is_replaced():
    cfg = CONFIGS["tiny"]
    _, ours = pair(cfg, seed=2)
    one, two = make_inputs(cfg, [4], seed=7), make_inputs(cfg, [4, 6], seed=7)
    ours.setup_cache(1, 64, dtype=torch.bfloat16)  # wrong dtype for this fp32 model
    generate(ours, **one, max_new_tokens=3, eos_token_ids=NO_EOS)
    assert ours.text.blocks[0].attn.cache.k.dtype == torch.float32
    generate(ours, **two, max_new_tokens=3, eos_token_ids=NO_EOS)  # another batch size
    assert ours.text.blocks[0].attn.cache.k.shape[0] == 2


def test_processor_output_unpacks_into_generate(tmp_path):
    """The README's `generate(model, **processor(...))`: the processor's labels (always returned, as transformers)
    are accepted and change nothing; several images per prompt unpack the same way."""
    import pgconv
    from pgconv.converter.fixture import default_image, make_fixture
    from pgconv.model.processor import Processor

    d = make_fixture(tmp_path / "tiny", "tiny")
    model, proc = pgconv.load(d), Processor.from_pretrained(d)
    for images, prompt in [([default_image()], "caption en"), ([[default_image()] * 2], "answer en same?")]:
        batch = proc(images=images, prompts=[prompt])
        assert "labels" in batch
        got = generate(model, **batch, max_new_tokens=4)
        batch.pop("labels")
        assert torch.equal(got, generate(model, **batch, max_new_tokens=4))
