"""Candidate implementations for `pgconv verify --candidate NAME`: anything that maps golden inputs to probe values.

The protocol (a porter's adapter implements it; README.md's "Verifying your own port" has a complete one to copy,
and tests/test_golden.py runs that file):

    def load(checkpoint: Path, dtype: torch.dtype, device: str) -> Candidate   # module-level, in an adapter file

    class Candidate:
        name: str
        def run(self, inputs: dict[str, Tensor], probes: list[str]) -> dict[str, Tensor]: ...
        # optional: the step alone on the golden value of the probe's teacher_input (teacher forcing)
        def teacher(self, probe: str, x: Tensor, inputs: dict[str, Tensor]) -> Tensor | None: ...
        # optional: greedy tokens
        def generate(self, inputs: dict[str, Tensor], max_new_tokens: int) -> list[int]: ...

`inputs` are golden's (`input_ids`, `pixel_values`, `attention_mask`, `token_type_ids`, as transformers' processor
gives them); `probes` the schema names wanted (`probes.json`); `run` returns any subset, by those names and in the
golden shapes (`parity.golden`). Built in: `transformers-sdpa` (transformers with SDPA attention, the question "is
SDPA the same as eager here?"), `keras-hub` (`parity.keras_hub`, the optional extra `pgconv[keras]`), `mlx-vlm`
(`parity.mlx_vlm`, `mlx[cpu]` + mlx-vlm), `pgconv`
through this protocol (`pgconv-adapter`: what the default verify checks in depth), a dump file (`dump:FILE`), or
a Python file defining `load` (`path/to/adapter.py`).

Every call into a candidate's code (an adapter's `load`, and `run`, `teacher`, `generate` of any candidate) that
raises is a one-line input error naming the candidate and the method (exit 2, not a parity failure); `run` must
return a mapping of probe name -> Tensor, `teacher` a Tensor or None, `generate` a list of ints.
verify --candidate writes the golden activations to a temporary directory next to --report when given, else
under $PGCONV_TMP, else in tempfile's default ($TMPDIR, /tmp): where /tmp is a RAM disk, a 3B golden's
activations and logits would take memory.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from pgconv.errors import InputError

__all__ = ["Candidate", "load_candidate", "verify_candidate", "compare_cases", "BUILT_IN"]


class Candidate(Protocol):
    name: str

    def run(self, inputs: dict[str, Tensor], probes: list[str]) -> dict[str, Tensor]: ...


class _Recorded:
    """Probe values of a torch candidate from one hooked forward, its module calls kept for teacher forcing: a
    probe's step is rerun on another input by calling its module again with that input in place of the first
    tensor argument (`parity.replay`'s `call` recipe; masks, RoPE tables and the like as the forward passed them)."""

    rec: Any = None
    table: dict[str, Any]

    def _module_path(self, p: Any) -> str:
        raise NotImplementedError

    @torch.no_grad()
    def _rerun(self, probe: str, x: Tensor) -> Tensor | None:
        from pgconv.parity.capture import primary, split_path
        from pgconv.parity.replay import _swap_first_tensor

        p = self.table.get(probe)
        if p is None or p.replay != "call" or self.rec is None:
            return None
        module = split_path(self._module_path(p))[0]
        call = self.rec.calls.get(module)
        if call is None or not call.done:
            return None
        args, kwargs = _swap_first_tensor(call, x.to(self.dtype))
        return primary(self.model.get_submodule(module)(*args, **kwargs))


class TransformersCandidate(_Recorded):
    """transformers' PaliGemma with another attention implementation than the golden's eager one."""

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: str, attn: str = "sdpa") -> None:
        from transformers import PaliGemmaForConditionalGeneration

        from pgconv.parity.models import read_config
        from pgconv.parity.probes import probes_for

        self.name, self.dtype = f"transformers-{attn}", dtype
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(
            checkpoint, dtype=dtype, attn_implementation=attn).to(device).eval()
        self.table = {p.name: p for p in probes_for(read_config(checkpoint), "all")}

    def _module_path(self, p: Any) -> str:
        return p.ref

    @torch.no_grad()
    def run(self, inputs: dict[str, Tensor], probes: list[str]) -> dict[str, Tensor]:
        from pgconv.parity.capture import Recorder
        from pgconv.parity.compare import value
        from pgconv.parity.logits import reference_head

        table = [self.table[n] for n in probes if n in self.table]
        norm = "model.language_model.norm"
        self.rec = Recorder(self.model, [p.ref for p in table if p.ref] + [norm])
        with self.rec:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        out = {p.name: value(self.rec, p.ref, p.ref_at, p.kind) for p in table if p.ref}
        if "logits" in probes:
            out["logits"] = reference_head(self.model, self.rec.get(norm, "output"))
        return out

    @torch.no_grad()
    def teacher(self, probe: str, x: Tensor, inputs: dict[str, Tensor]) -> Tensor | None:
        from pgconv.parity.logits import reference_head

        if probe == "logits":
            return reference_head(self.model, x.to(self.dtype))
        if probe == "image_features":  # transformers 5 merges the projector output unchanged
            return x
        if probe == "text.embed":  # PaliGemmaModel.forward's merge, on the golden features
            ids = inputs["input_ids"]
            is_image = ids == self.model.config.image_token_id
            emb = self.model.get_input_embeddings()(ids.masked_fill(is_image, 0))
            return emb.masked_scatter(is_image[..., None], x.to(emb.dtype))
        return self._rerun(probe, x)

    @torch.no_grad()
    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int) -> list[int]:
        from pgconv.parity.generation import reference_greedy

        return reference_greedy(self.model, inputs, max_new_tokens)[0]


class PgconvCandidate(_Recorded):
    """pgconv's model through the protocol (end to end, and teacher forced on each probe's golden input)."""

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: str) -> None:
        import pgconv
        from pgconv.parity.probes import probes_for

        self.name, self.dtype = "pgconv-adapter", dtype
        self.model = pgconv.load(checkpoint, dtype=dtype, device=device)
        self.table = {p.name: p for p in probes_for(self.model.cfg, "all")}

    def _module_path(self, p: Any) -> str:
        return p.ours

    @torch.no_grad()
    def run(self, inputs: dict[str, Tensor], probes: list[str]) -> dict[str, Tensor]:
        from pgconv.parity.capture import Recorder
        from pgconv.parity.compare import value
        from pgconv.parity.replay import OWN_PATHS, own_value

        m, table = self.model, [self.table[n] for n in probes if n in self.table]
        paths = {p.ours for p in table if p.ours and p.ours_at != "call"} | set(OWN_PATHS)
        self.rec = Recorder(m, paths)
        with self.rec:
            hidden = m(inputs["input_ids"], inputs["pixel_values"].to(self.dtype), inputs["token_type_ids"],
                       inputs["attention_mask"], return_hidden=True)
        out = {}
        for p in table:
            if p.name == "logits":
                out[p.name] = m.logits(hidden)
            elif p.ours_at == "call":
                out[p.name] = own_value(p, m, self.rec, inputs)
            else:
                out[p.name] = value(self.rec, p.ours, p.ours_at, p.kind)
        return out

    @torch.no_grad()
    def teacher(self, probe: str, x: Tensor, inputs: dict[str, Tensor]) -> Tensor | None:
        m, x = self.model, x.to(self.dtype)
        if probe == "logits":
            return m.logits(x)
        if probe == "image_features":  # what our step between projector and merge changes, on the golden input
            return x + (self.rec.get("image_tap", "output") - self.rec.get("projector", "output"))
        if probe == "text.embed":
            return m.embed(inputs["input_ids"], x)
        return self._rerun(probe, x)

    @torch.no_grad()
    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int) -> list[int]:
        from pgconv.model.generate import generate

        m = self.model
        return generate(m, inputs["input_ids"], inputs["pixel_values"].to(self.dtype), inputs["token_type_ids"],
                        inputs["attention_mask"], max_new_tokens=max_new_tokens)[0].tolist()


def _from_file(path: Path, checkpoint: Path, dtype: torch.dtype, device: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"pgconv_adapter_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path}: cannot be imported as a Python adapter")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: its error, in one line
        raise InputError(f"{path}: importing the adapter failed ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, "load", None)):
        raise InputError(f"{path}: an adapter file must define load(checkpoint, dtype, device)")
    cand = _call(str(path), "load", module.load, checkpoint, dtype, device)
    if not callable(getattr(cand, "run", None)):
        raise InputError(f"{path}: load() must return an object with run(inputs, probes)")
    return cand


def _keras(checkpoint: Path, dtype: torch.dtype, device: str) -> Any:
    from pgconv.parity.keras_hub import KerasHubCandidate

    return KerasHubCandidate(checkpoint, dtype, device)


def _mlx(checkpoint: Path, dtype: torch.dtype, device: str) -> Any:
    from pgconv.parity.mlx_vlm import load

    return load(checkpoint, dtype, device)


BUILT_IN = {
    "transformers-sdpa": lambda c, d, dev: TransformersCandidate(c, d, dev, "sdpa"),
    "pgconv-adapter": PgconvCandidate,
    "keras-hub": _keras,
    "mlx-vlm": _mlx,
}


def load_candidate(name: str, checkpoint: Path, dtype: torch.dtype, device: str) -> Any:
    if name in BUILT_IN:
        return BUILT_IN[name](checkpoint, dtype, device)
    path = Path(name)
    if name.endswith(".py"):
        if not path.is_file():
            raise InputError(f"{path}: adapter file not found (--candidate)")
        return _from_file(path, checkpoint, dtype, device)
    raise InputError(f"--candidate {name!r}: not one of pgconv, {', '.join(BUILT_IN)}, dump:FILE or FILE.py")


def verify_candidate(checkpoint: str | Path | None, candidate: str, *, images=(), prompts=(), dtype: str = "float32",
                     device: str = "cpu", probes: str = "all", max_new_tokens: int = 10,
                     tolerances: str | Path | None = None, report_dir: str | Path | None = None) -> dict[str, Any]:
    """Golden activations of CHECKPOINT (written to a temporary directory), then the candidate's against them with
    `pgconv compare`'s rules and reports (`parity.dump`)."""
    from pgconv.parity.dump import compare
    from pgconv.parity.golden import golden
    from pgconv.parity.tolerances import load_tolerances
    from pgconv.parity.verify import _check_report_dir, _resolve, dtype_list

    if len(dtype_list(dtype)) != 1:
        raise InputError(f"--candidate {candidate}: one dtype at a time")
    # --tolerances and --report before the golden run and the candidate's load (minutes at 3B), as verify does.
    tol = load_tolerances(tolerances)
    if report_dir is not None:
        _check_report_dir(Path(report_dir))
    # The candidate's name (and its file) before the reference loads and the golden activations are written.
    if candidate.startswith("dump:"):
        if not Path(candidate[5:]).is_file():
            raise InputError(f"{candidate[5:]}: not a file (--candidate dump:FILE)")
    elif candidate not in BUILT_IN and not (candidate.endswith(".py") and Path(candidate).is_file()):
        load_candidate(candidate, Path(), torch.float32, device)  # raises the one-line error
    with tempfile.TemporaryDirectory(prefix="pgconv-golden-", dir=_scratch(report_dir)) as tmp:
        gdir = Path(tmp) / "golden"
        doc = golden(checkpoint, gdir, images=images, prompts=prompts, dtype=dtype, device=device, probes=probes,
                     max_new_tokens=max_new_tokens)
        if candidate.startswith("dump:"):
            return compare(gdir, candidate[5:], tolerances=tol, report_dir=report_dir)
        path, _, _ = _resolve(checkpoint)
        cand = load_candidate(candidate, path, getattr(torch, dtype), device)
        return compare_cases(gdir, doc, cand, max_new_tokens=max_new_tokens, tolerances=tol, report_dir=report_dir,
                             adapter=candidate)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _call(adapter: str, method: str, fn: Any, *args: Any) -> Any:
    """A call into a candidate's code: what it raises is a one-line input error naming the adapter and method."""
    try:
        return fn(*args)
    except InputError:
        raise
    except Exception as e:  # the candidate's code, not ours: its error, in one line
        raise InputError(f"{adapter}: {method}() failed ({_one_line(e)})") from None


def _tensors(adapter: str, got: Any) -> dict[str, Tensor]:
    if not isinstance(got, Mapping):
        raise InputError(f"{adapter}: run() must return a mapping of probe name -> torch.Tensor, got "
                         f"{type(got).__name__}")
    for k, v in got.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise InputError(f"{adapter}: run() returned {type(v).__name__} for {str(k)[:60]!r}; values must be "
                             "torch.Tensor under probe names")
    return dict(got)


def _tokens(adapter: str, got: Any) -> Tensor:
    from pgconv.parity.golden_dir import is_int

    if not isinstance(got, (list, tuple)) or not all(is_int(t) for t in got):
        raise InputError(f"{adapter}: generate() must return a list of ints, got {type(got).__name__}"
                         + (f" holding {type(next(t for t in got if not is_int(t))).__name__}"
                            if isinstance(got, (list, tuple)) else ""))
    return torch.tensor(list(got), dtype=torch.long)


def compare_cases(gdir: Path, doc: dict[str, Any], candidate: Any, *, max_new_tokens: int,
                  tolerances: Any = None, report_dir: str | Path | None = None,
                  adapter: str | None = None) -> dict[str, Any]:
    """A candidate (the protocol above) run on every golden case and compared like a dump (`parity.dump`): its `run`
    on the case's inputs, its optional `teacher` on each probe's golden teacher input, its optional `generate`. One
    case at a time: its outputs are compared and dropped before the next runs. `adapter` names the candidate in
    the one-line errors its code's exceptions become (default: its `name`)."""
    from pgconv.parity.dump import TEACHER, _case, _check_kinds, _nonempty, _precheck, _report, _tol, check_dump
    from pgconv.parity.golden_dir import case_files, read_golden

    t0 = time.perf_counter()
    tol = _tol(tolerances)
    _precheck(report_dir)
    doc = read_golden(gdir)  # the caller's doc may be a golden() return: the file on disk is what is compared
    _check_kinds(gdir, doc, tol)
    name = str(getattr(candidate, "name", type(candidate).__name__))
    adapter = adapter or name
    label = f"candidate {name}"
    names = [p["name"] for p in doc["probes"]]
    teacher_of = {p["name"]: p["teacher_input"] for p in doc["probes"] if p["teacher_input"]}
    teach, gen = getattr(candidate, "teacher", None), getattr(candidate, "generate", None)
    cases = []
    for case in doc["cases"]:
        k = case["case"]
        inputs, golden = case_files(gdir, doc, k)
        out = _tensors(adapter, _call(adapter, "run", candidate.run, dict(inputs), list(names)))
        if callable(teach):
            for probe, source in teacher_of.items():
                y = _call(adapter, "teacher", teach, probe, golden[source], dict(inputs))
                if y is not None and not isinstance(y, Tensor):
                    raise InputError(f"{adapter}: teacher() returned {type(y).__name__} for {probe!r}, not a "
                                     "torch.Tensor or None")
                if y is not None:
                    out[probe + TEACHER] = y
        if callable(gen):
            out["generation.tokens"] = _tokens(adapter, _call(adapter, "generate", gen, dict(inputs), max_new_tokens))
        _nonempty(check_dump(doc["probes"], golden, out, label), out,
                  f"{adapter}" + (f" (case {k})" if len(doc["cases"]) > 1 else ""))
        cases.append(_case(doc, k, out, inputs, golden, label, tol))
        del out
    notes = [str(n) for n in getattr(candidate, "notes", None) or []]  # what an adapter found about its side
    return _report(gdir, doc, cases, label, tol, report_dir, t0, notes)


def _scratch(report_dir: str | Path | None) -> str | None:
    """Where the temporary golden goes: next to --report (the nearest existing directory above it: the report is
    written there anyway), else $PGCONV_TMP, else tempfile's default. Not /tmp by choice: often a RAM disk."""
    import os

    if report_dir is not None:
        probe = Path(report_dir).absolute().parent
        while not probe.is_dir() and probe != probe.parent:
            probe = probe.parent
        return str(probe)
    env = os.environ.get("PGCONV_TMP")
    if env:
        if not Path(env).is_dir():
            raise InputError(f"{env}: not a directory (PGCONV_TMP)")
        return env
    return None
