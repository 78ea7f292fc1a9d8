"""verify's memory-saving paths give the same results as the straightforward ones.

- the reference loaded through `cast_state_dict` (tensors cast one at a time) is the model `from_pretrained` builds;
- logit checks computed position chunk by chunk from the final hidden states (`parity.logits`) equal the metrics of
  whole logit tensors, and the reference's head reproduces its forward's logits bit for bit;
- probes compared while our forward runs (captures dropped as they go) give the rows of a compare-after-forward
  run; our mask's extra cache columns are checked, not ignored.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgconv.converter.fixture import make_fixture
from pgconv.parity import capture
from pgconv.parity.models import cast_state_dict, load_reference

from test_parity_fixtures import tiny_checkpoint  # noqa: F401  (pytest fixture)


@pytest.fixture(scope="module")
def reduced_checkpoints(tmp_path_factory):
    """The tiny presets stored in bf16 and fp16 (the hub stores bf16; verify usually runs them in fp32)."""
    root = tmp_path_factory.mktemp("reduced")
    return {(preset, dt): make_fixture(root / f"{preset}-{dt}", preset, dtype=dt)
            for preset in ("tiny", "tiny-pg2") for dt in ("bfloat16", "float16")}


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones too (embed_scale, inv_freq)
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    assert a.lm_head.weight is a.model.language_model.embed_tokens.weight  # still tied
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    assert a.config.to_dict() == b.config.to_dict()
    assert a.config._attn_implementation == b.config._attn_implementation == "eager"
    assert a.training == b.training is False


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_cast_reference_is_what_from_pretrained_builds(reduced_checkpoints, preset, stored, dtype):
    from transformers import PaliGemmaForConditionalGeneration

    path = reduced_checkpoints[(preset, stored)]
    want = getattr(torch, dtype)
    if stored == dtype:
        assert cast_state_dict(path, want) is None  # nothing to cast: transformers maps the files itself
        return
    ours = load_reference(path, want, "cpu")
    theirs = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=want, attn_implementation="eager")
    _same_model(ours, theirs)


def test_cast_state_dict_pieces(reduced_checkpoints):
    """The read-into-a-buffer path (bytes not aligned to their dtype) gives the mapped path's tensors exactly, also
    when tensors span several pieces."""
    from pgconv.converter.checkpoint import open_checkpoint
    from pgconv.converter.dtypes import torch_dtype
    from pgconv.parity import models

    path = reduced_checkpoints[("tiny", "bfloat16")]
    whole = cast_state_dict(path, torch.float32)
    ckpt = open_checkpoint(path, trusted_root=path)
    checked = 0
    for name, t in whole.items():
        src = ckpt.tensors[name]
        if torch_dtype(src.meta.dtype) != torch.bfloat16:
            continue
        got = models._cast_pieces(src, torch.float32, max_bytes=1000)  # 500 bf16 elements per piece
        assert got.dtype == torch.float32 and torch.equal(got, t), name
        checked += 1
    assert checked > 10 and any(t.numel() > 500 for t in whole.values())  # several pieces for some tensors


def test_cast_state_dict_truncated_file_is_an_input_error(reduced_checkpoints, tmp_path, monkeypatch):
    """A file that gets shorter between reading its header and mapping it is named, not a SIGBUS from the
    mapping (`open_checkpoint` names one truncated before)."""
    import shutil

    from pgconv.converter import checkpoint
    from pgconv.errors import InputError

    src = reduced_checkpoints[("tiny", "bfloat16")]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    weights = next(dst.glob("*.safetensors"))
    orig = checkpoint.open_checkpoint

    def open_then_truncate(*args, **kwargs):
        ckpt = orig(*args, **kwargs)
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 4096)
        return ckpt

    monkeypatch.setattr(checkpoint, "open_checkpoint", open_then_truncate)
    with pytest.raises(InputError, match=r"is truncated \(file shorter than its header says\)"):
        cast_state_dict(dst, torch.float32)


def test_cast_state_dict_reads_files_it_cannot_map(reduced_checkpoints, monkeypatch):
    """A filesystem that refuses memory maps: the tensors are read into a buffer instead, with the same result."""
    from pgconv.parity import models

    path = reduced_checkpoints[("tiny-pg2", "bfloat16")]
    mapped = cast_state_dict(path, torch.float32)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(models.mmap, "mmap", refuse)
    read = cast_state_dict(path, torch.float32)
    assert mapped.keys() == read.keys()
    assert all(torch.equal(mapped[k], read[k]) and read[k].dtype == mapped[k].dtype for k in mapped)


# -- logits ----------------------------------------------------------------------------------------------------------


def _hf_pair(name, dtype):
    from reference_models import CONFIGS, make_inputs, pair

    cfg = CONFIGS[name]
    hf, ours = pair(cfg, seed=3, dtype=dtype)
    return cfg, hf, ours, make_inputs(cfg, [6], seed=5)


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_reference_head_is_the_forwards_head(name, dtype):
    from pgconv.parity.capture import Recorder
    from pgconv.parity.logits import reference_head

    cfg, hf, _, inp = _hf_pair(name, dtype)
    with Recorder(hf, ["model.language_model.norm"]) as rec:
        want = hf(**inp, use_cache=False).logits
    got = reference_head(hf, rec.get("model.language_model.norm"))
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 5])  # 5: balanced chunks differ from plain ones of 5 (4 + 4 + 3, not 5 + 5 + 1)
@torch.no_grad()
def test_logits_pass_equals_the_metrics_of_whole_logit_tensors(name, dtype, rows):
    from pgconv.parity.logits import logits_pass, reference_head
    from pgconv.parity.metrics import logit_metrics, segment_masks, segment_metrics, segment_summary

    cfg, hf, ours, inp = _hf_pair(name, dtype)
    g = torch.Generator().manual_seed(0)
    t = 11
    h_ref = torch.randn(1, t, cfg.text.hidden_size, generator=g).to(dtype)
    h_ours = (h_ref.float() + 1e-2 * torch.randn(h_ref.shape, generator=g)).to(dtype)
    ids = torch.full((1, t), 5)
    ids[0, :3] = cfg.image_token_index
    tti = torch.zeros(1, t, dtype=torch.long)
    tti[0, 8:] = 1
    masks = segment_masks(ids, tti, cfg.image_token_index)
    assert h_ours.shape[1] == 11  # the chunk sizes above
    lp = logits_pass(ours, hf, h_ours, h_ref, slice(7, 10), rows=rows)
    # The whole tensors, built from the same per-chunk products (a product of another shape may round otherwise).
    chunks = [(ours.logits(h_ours[:, i:i + 4]), reference_head(hf, h_ref[:, i:i + 4]),
               ours.logits(h_ref[:, i:i + 4])) for i in range(0, t, 4)]
    o, r, tf = (torch.cat([c[k] for c in chunks], 1) for k in range(3))
    whole = logit_metrics(o, r)
    for k in ("kl", "top1", "top5", "margin", "dp"):
        assert lp.per[k] == whole[k], k
    assert segment_summary(lp.e2e, lp.width, masks) == segment_metrics(o, r, masks)
    assert segment_summary(lp.contrib, lp.width, masks) == segment_metrics(tf, r, masks)
    assert torch.equal(lp.ours_rows, o[0, 7:10]) and torch.equal(lp.ref_rows, r[0, 7:10])
    # One chunk or many: the same numbers up to the products' rounding.
    one = logits_pass(ours, hf, h_ours, h_ref, slice(7, 10), rows=64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max(abs(a - b) for a, b in zip(one.per["kl"], lp.per["kl"])) <= tol * max(1.0, max(lp.per["kl"]))
    # Bitwise equal hidden states: no teacher-forced head at all.
    assert logits_pass(ours, hf, h_ref, h_ref, slice(7, 10), rows=4).contrib is None


@torch.no_grad()
def test_chunked_logits_oracle_equals_the_whole_float64_computation():
    from pgconv.parity.capture import Recorder
    from pgconv.parity.logits import reference_head
    from pgconv.parity.oracle import logits_errors

    cfg, hf, ours, inp = _hf_pair("tiny-pg2", torch.float32)
    with Recorder(hf, ["model.language_model.norm"]) as rec:
        hf(**inp, use_cache=False)
    h = rec.get("model.language_model.norm")
    cap = hf.config.get_text_config().final_logit_softcapping
    exact = torch.tanh((h.double() @ hf.lm_head.weight.double().T) / cap) * cap
    # Products of the oracle's shape (2 positions): another shape may round otherwise.
    o = torch.cat([ours.logits(h[:, i:i + 2]) for i in range(0, h.shape[1], 2)], 1)
    r = torch.cat([reference_head(hf, h[:, i:i + 2]) for i in range(0, h.shape[1], 2)], 1)
    want_o = float((o.double() - exact).norm() / exact.norm())
    want_r = float((r.double() - exact).norm() / exact.norm())
    got_o, got_r = logits_errors(ours, hf, rec, rows=2, chunk=100)
    assert want_o > 0 and want_r > 0
    assert math.isclose(got_o, want_o, rel_tol=1e-9) and math.isclose(got_r, want_r, rel_tol=1e-9)


# -- probes while our forward runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
def test_streamed_probe_rows_equal_rows_made_after_the_forward(tiny_checkpoint, name, monkeypatch):
    """The same verify run with the stream's evaluation deferred to after the forward (nothing dropped early)."""
    from pgconv.parity import case
    from pgconv.parity.verify import verify

    streamed = verify(str(tiny_checkpoint(name)), max_new_tokens=3)
    orig = case._ProbeStream.step
    monkeypatch.setattr(case._ProbeStream, "step", lambda self, m="", final=False: orig(self, m, True) if final
                        else None)
    monkeypatch.setattr(case._ProbeStream, "_release", lambda self, i: None)
    deferred = verify(str(tiny_checkpoint(name)), max_new_tokens=3)
    assert streamed["probes"] == deferred["probes"]
    assert streamed["passed"] and deferred["passed"]


def test_mask_columns_past_the_sequence_must_be_masked():
    from pgconv.parity.case import _cache_tail

    ref = torch.ones(1, 4, 4).tril()
    ours = torch.cat([ref, torch.zeros(1, 4, 2)], -1)
    trimmed, problem = _cache_tail(ours, ref)
    assert problem is None and torch.equal(trimmed, ref)
    ours[0, 3, 5] = 1.0
    assert "past the sequence" in _cache_tail(ours, ref)[1]
    assert _cache_tail(ref, ref) == (ref, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vision_tower_runs_once_and_its_probes_equal_a_forward_that_reruns_it(tiny_checkpoint, dtype, monkeypatch):
    """Our vision tower runs only in our decode's prefill; the hooked forward takes its image features. A run whose
    hooked forward recomputes the tower from the pixels (the straightforward way) feeds its text stack the same
    features: every row is the same."""
    from pgconv.model.paligemma import PaliGemma
    from pgconv.parity.verify import verify

    calls = []
    orig_features = PaliGemma.image_features
    monkeypatch.setattr(PaliGemma, "image_features", lambda self, pv: calls.append(1) or orig_features(self, pv))
    once = verify(str(tiny_checkpoint("tiny")), dtype=dtype, max_new_tokens=3)
    assert len(calls) == 1 and not once["generation"]["cache"]["extra_forward"]

    orig_forward = PaliGemma.forward

    def rerun(self, input_ids, pixel_values=None, *args, image_features=None, **kwargs):
        if image_features is not None:  # the hooked forward: recompute the tower from the pixels
            pixel_values, image_features = pixel_values_seen[0], None
        return orig_forward(self, input_ids, pixel_values, *args, image_features=image_features, **kwargs)

    pixel_values_seen = []
    monkeypatch.setattr(PaliGemma, "image_features",
                        lambda self, pv: pixel_values_seen.append(pv) or orig_features(self, pv))
    monkeypatch.setattr(PaliGemma, "forward", rerun)
    twice = verify(str(tiny_checkpoint("tiny")), dtype=dtype, max_new_tokens=3)
    assert len(pixel_values_seen) == 2  # the tower ran again in the hooked forward
    assert once["probes"] == twice["probes"] and once["passed"] and twice["passed"]


@pytest.mark.skipif(capture._TRIM is None, reason="glibc malloc_trim not available")
def test_release_freed_memory_returns_freed_heap_pages():
    """Small tensors freed below a live one stay resident until the trim (the 3B logits-phase peak, issue 4)."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    held = [torch.ones(16 << 10) for _ in range(4000)]  # 64 KiB each, 250 MiB: heap allocations
    pin = torch.ones(16 << 10)  # allocated after them: the heap cannot shrink from the top
    del held
    before = rss()
    capture.release_freed_memory()
    after = rss()
    assert before - after > 100 << 20, (before, after)
    assert float(pin.sum()) == 16 << 10


@pytest.mark.parametrize("name", ["tiny", "tiny-pg2"])
def test_vision_rows_are_made_during_the_reference_forward(tiny_checkpoint, name, monkeypatch):
    """Both sides' vision captures are dropped while the reference's vision tower runs (they would otherwise be held
    through its whole text stack: ~3 GB per side at 896 px, 3B fp32); text rows wait for the final sequence."""
    from pgconv.parity import case
    from pgconv.parity.verify import verify

    made = []
    orig = case._ProbeStream._row

    def spy(self, p):
        made.append((p.name, self.sequence_ready, sorted(m for m in self.ref_rec.calls if "vision" in m)))
        return orig(self, p)

    monkeypatch.setattr(case._ProbeStream, "_row", spy)
    report = verify(str(tiny_checkpoint(name)), max_new_tokens=3)
    assert report["passed"]
    early = [n for n, ready, _ in made if not ready]
    assert early == [n for n, _, _ in made if n.startswith("vision.") or n in ("projector", "image_features")]
    assert len(early) > 5
    assert all(ready for n, ready, _ in made if n.startswith("text."))
    # By the time the text rows are made, no vision activation of the reference is held any more.
    assert all(not held for n, _, held in made if n.startswith("text."))
