"""Checkpoint specs: built-in specs in sync with their data, hypothesis round trips, and every check's error."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pgconv.converter import layouts
from pgconv.converter.custom import open_spec_checkpoint
from pgconv.converter.layouts import native_shapes
from pgconv.converter.spec import (BUILTIN_DIR, FLAGS, Rule, Spec, builtin_texts, dumps, layout_spec, load_spec,
                                   loads)
from pgconv.converter.spec_bind import bind
from pgconv.converter.spec_ops import OpSpec, SpecError
from pgconv.converter.spec_write import convert_to_spec
from pgconv.errors import InputError
from pgconv.model.config import PRESETS
from pgconv.model.hf_config import to_hf_config

CONFIGS = {"tiny": PRESETS["tiny"], "tiny-pg2": PRESETS["tiny-pg2"]}


def random_natives(cfg, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """Random bit patterns (NaN payloads, -0, infinities): every conversion must keep each bit."""
    g = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    ints = {2: torch.int16, 4: torch.int32}[size]
    return {n: torch.randint(-2**15, 2**15, s, generator=g, dtype=torch.int64).to(ints).view(dtype)
            for n, s in native_shapes(cfg).items()}


def file_dict(bound, natives) -> dict[str, torch.Tensor]:
    """Export in memory: each file tensor from its consecutive C-order parts."""
    out = {}
    for ft in bound.file_tensors(natives.__getitem__):
        out[ft.name] = torch.cat([p.reshape(-1) for p in ft.parts()]).reshape(ft.shape)
    return out


def import_dict(bound, files) -> dict[str, torch.Tensor]:
    read = lambda name, k: files[name] if k is None else files[name][k]  # noqa: E731
    return {n: t.load() for n, t in bound.native_tensors(read).items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Built-in specs


def test_builtin_spec_files_are_generated_from_their_data():
    for name, text in builtin_texts().items():
        assert (BUILTIN_DIR / name).read_text(encoding="utf-8") == text, f"{name}: run python -m pgconv.converter.spec"


@pytest.mark.parametrize("layout", list(layouts.LAYOUTS))
@pytest.mark.parametrize("preset", ["tiny", "tiny-pg2", "paligemma-3b-pt-224", "paligemma2-10b-pt-448"])
@pytest.mark.parametrize("tied", [True, False])
def test_layout_specs_equal_the_layout_key_maps(layout, preset, tied):
    cfg = PRESETS[preset].replace(tie_word_embeddings=tied)
    bound = bind(load_spec(layout), cfg)  # the shipped file, not the generator
    got = {inst.native[0]: inst.file[0] for inst in bound.instances}
    assert got == layouts.key_map(cfg, layout)
    assert all(not inst.ops for inst in bound.instances)


def test_hkproj_example_spec():
    spec = load_spec(BUILTIN_DIR / "hkproj-pytorch-paligemma.toml")
    cfg = PRESETS["tiny"]
    assert {i.file[0] for i in bind(spec, cfg).instances} == set(layouts.key_map(cfg, "hf-legacy").values())
    with pytest.raises(SpecError, match=r"has no rule making 6 native tensor\(s\).*post_attn_norm"):
        bind(spec, PRESETS["tiny-pg2"])  # the tutorial implements PaliGemma 1 only


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: random invertible specs over the tiny configs round-trip bit for bit, as data and as text.

_PAIRS = [("text.blocks.{i}.mlp.gate.weight", "text.blocks.{i}.mlp.up.weight"),
          ("text.blocks.{i}.attn.k.weight", "text.blocks.{i}.attn.v.weight"),
          ("vision.blocks.{i}.norm1.weight", "vision.blocks.{i}.norm1.bias")]


@st.composite
def random_spec(draw, cfg) -> Spec:
    shapes = native_shapes(cfg)
    templates = [r.native[0] for r in layout_spec("native").rules if all(FLAGS[f](cfg) for f in r.when)]
    layers = lambda tpl: cfg.vision.num_layers if tpl.startswith("vision.") else cfg.text.num_layers  # noqa: E731
    rules, used = [], set()

    def add(natives: tuple[str, ...], file_shape: tuple[int, ...], ops: list[OpSpec], files: int = 1) -> None:
        k = len(rules)
        stacked = "{i}" in natives[0] and draw(st.booleans())
        axis = draw(st.integers(0, len(file_shape))) if stacked else None
        if stacked:
            file_shape = file_shape[:axis] + (layers(natives[0]),) + file_shape[axis:]
        names = tuple(f"w{k}/{j}" + ("" if stacked or "{i}" not in natives[0] else ".{i}") for j in range(files))
        rules.append(Rule(names, natives, tuple(ops), (file_shape,) * files, axis))

    for a, b in _PAIRS:
        mode = draw(st.sampled_from(["separate", "unbind", "split"]))
        if mode == "separate":
            continue
        used |= {a, b}
        s = shapes[a.format(i=0)]
        if mode == "unbind":
            add((a, b), (2, *s), [OpSpec("unbind", 0)])
        else:
            add((a, b), (2 * s[0], *s[1:]), [OpSpec("split", {"axis": 0, "sizes": [s[0], s[0]]})])
    for tpl in templates:
        if tpl in used:
            continue
        s = shapes[tpl.format(i=0)]
        mode = draw(st.sampled_from(["rename", "transpose", "flatten", "halves", "slice_rows"]))
        if mode == "transpose" and len(s) > 1:
            perm = draw(st.permutations(range(len(s))))
            add((tpl,), tuple(s[p] for p in perm), [OpSpec("transpose", [perm.index(j) for j in range(len(s))])])
        elif mode == "flatten":
            add((tpl,), (len(torch.empty(s).reshape(-1)),), [OpSpec("reshape", list(s))])
        elif mode == "halves" and s[0] % 2 == 0:
            add((tpl,), (s[0] // 2, *s[1:]), [OpSpec("concat", 0)], files=2)
        elif mode == "slice_rows":  # the file has 3 more rows, all zero padding
            add((tpl,), (s[0] + 3, *s[1:]), [OpSpec("slice_rows", s[0])])
        else:
            add((tpl,), s, [])
    order = draw(st.permutations(range(len(rules))))
    return Spec(name="random", rules=tuple(rules[j] for j in order), format=draw(st.sampled_from(["safetensors", "npz"])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), preset=st.sampled_from(sorted(CONFIGS)), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_specs_round_trip(data, preset, dtype):
    cfg = CONFIGS[preset]
    spec = data.draw(random_spec(cfg))
    assert loads(dumps(spec)) == spec and loads(dumps(spec, "json"), "json") == spec
    bound = bind(spec, cfg)
    natives = random_natives(cfg, dtype, seed=data.draw(st.integers(0, 2**16)))
    files = file_dict(bound, natives)
    assert {n: tuple(t.shape) for n, t in files.items()} == bound.file_shapes
    back = import_dict(bound, files)
    assert set(back) == set(natives)
    for name in natives:
        assert same_bits(back[name], natives[name]), name


def test_add_offsets_round_trip_within_rounding():
    cfg = CONFIGS["tiny"]
    k = next(k for k, r in enumerate(layout_spec("native").rules) if r.native == ("text.blocks.{i}.attn_norm.weight",))
    rules = list(layout_spec("native").rules)
    rules[k] = dataclasses.replace(rules[k], ops=(OpSpec("add", 1.0),))  # a file storing w - 1 (reading adds 1)
    bound = bind(Spec("offsets", tuple(rules)), cfg)
    natives = {n: torch.randn(s) for n, s in native_shapes(cfg).items()}
    files = file_dict(bound, natives)
    torch.testing.assert_close(files["text.blocks.1.attn_norm.weight"], natives["text.blocks.1.attn_norm.weight"] - 1)
    back = import_dict(bound, files)
    torch.testing.assert_close(back["text.blocks.1.attn_norm.weight"], natives["text.blocks.1.attn_norm.weight"],
                               rtol=0, atol=1e-6)  # x - 1 + 1 rounds: add is the one op that is not bit-exact
    assert bound.offsets == {"text.blocks.{i}.attn_norm.weight": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Checks before any bytes move: coverage, invertibility, syntax. Each error names the rule and the tensor.

BASE = layout_spec("native")


def with_rules(*changes: tuple[int, Rule | None], extra: tuple[Rule, ...] = ()) -> Spec:
    rules = list(BASE.rules)
    for k, rule in changes:
        rules[k] = rule
    return Spec("user", tuple(r for r in rules if r is not None) + extra, origin="user.toml")


def rule_of(native: str) -> int:
    return next(k for k, r in enumerate(BASE.rules) if r.native == (native,))


Q = rule_of("text.blocks.{i}.attn.q.weight")


@pytest.mark.parametrize("spec,message", [
    (with_rules((Q, None)), r"user.toml: spec 'user' has no rule making 2 native tensor\(s\).*text.blocks.0.attn.q.weight"),
    (with_rules(extra=(Rule(("again.{i}",), ("text.blocks.{i}.attn.q.weight",)),)),
     r"rule \d+ \('again.{i}' -> 'text.blocks.{i}.attn.q.weight'\): makes 'text.blocks.0.attn.q.weight', which rule "),
    (with_rules((rule_of("text.blocks.{i}.attn.k.weight"),
                 Rule(("text.blocks.{i}.attn.q.weight",), ("text.blocks.{i}.attn.k.weight",)))),
     r"reads 'text.blocks.0.attn.q.weight', which rule \d+ .* reads too"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.qq.weight",)))),
     r"makes 'text.blocks.0.attn.qq.weight', which is not a native tensor of this config"),
    (with_rules(extra=(Rule(("head",), ("lm_head.weight",)),)), r"lm_head.weight'.*ties it.*when = \[\"untied\"\]"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("reshape", [96, 71]),), ((72, 96),)))),
     r"rule \d+ \('q.{i}' -> 'text.blocks.{i}.attn.q.weight'\): op 1 reshape\(\[96, 71\]\): reshape \[72, 96\]"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("transpose", [0, 0]),), ((72, 96),)))),
     r"op 1 transpose\(\[0, 0\]\): transpose \[0, 0\] is not a permutation"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("transpose", [1.0, 0]),), ((72, 96),)))),
     r"transpose \[1.0, 0\] is not a permutation"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("reshape", ["N*H//0", 72]),), ((96, 72),)))),
     r"divides by zero"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("transpose", [1, 0]),)))),
     r"give the file shape \(`shape = \[...\]`\)"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (), ((72, 96),)))),
     r"makes 'text.blocks.0.attn.q.weight' with shape \[72, 96\]; the config implies \[96, 72\]"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("unbind", 0),), ((2, 96, 72),)))),
     r"the ops make 2 tensor\(s\) for 1 native name\(s\)"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight", "text.blocks.{i}.attn.zz.weight"),
                         (OpSpec("split", {"axis": 0, "sizes": [96, 95]}),), ((192, 72),)))),
     r"split sizes \[96, 95\] do not add up to axis 0 of \[192, 72\]"),
    (with_rules((Q, Rule(("q",), ("text.blocks.{i}.attn.q.weight",)))),
     r"native names have {i} but the file name does not; say which file axis stacks the layers"),
    (with_rules((Q, Rule(("q",), ("text.blocks.{i}.attn.q.weight",), layer_axis=0, shape=((3, 96, 72),)))),
     r"file shape \[3, 96, 72\] has no layer axis 0 of size 2"),
    (with_rules((Q, Rule(("q.{i}",), ("text.norm.weight",)))), r"the file name has {i} but the native name does not"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), (OpSpec("reshape", ["N*H", "Z"]),), ((96, 72),)))),
     r"unknown symbol 'Z'"),
    (with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",), when=("gemma3",)))), r"unknown `when` flag 'gemma3'"),
])
def test_check_errors_name_the_rule_and_tensor(spec, message):
    with pytest.raises(SpecError, match=message):
        bind(spec, CONFIGS["tiny"])


@pytest.mark.parametrize("text,message", [
    ('name = "x"\n[[rule]]\nfile = "a"\nnativ = "b"\n', r"x.toml: rule 1: unknown key 'nativ'"),
    ('name = "x"\n[[rule]]\nfile = "a"\nnative = "b"\nops = [{rotate = 1}]\n', r"rule 1: op 1: unknown op 'rotate'"),
    ('name = "x"\n[[rule]]\nfile = "a"\nnative = "b"\nops = [{transpose = [1, 0], reshape = [2]}]\n',
     r"rule 1: op 1 must be a one-key table"),
    ('name = "x"\ndtype = "int8"\n[[rule]]\nfile = "a"\nnative = "b"\n', r"dtype 'int8' is not one of"),
    ('name = "x"\nformat = "gguf"\n[[rule]]\nfile = "a"\nnative = "b"\n', r"format 'gguf' is not one of"),
    ('name = "x"\n', r"no rules"),
    ('name = "x"\n[[rule]]\nfile = "a"\nnative = "b"\nshape = [true]\n', r"shape entries must be integers or expressions"),
    ('name = "x" x\n', r"x.toml: invalid TOML"),
    ('name = "x"\n[[rule]]\nfile = "a"\nnative = "b"\nops = 5\n', r"rule 1: ops must be a list"),
    ('x = ' + "[" * 20000 + "]" * 20000 + "\n", r"x.toml: TOML nested too deeply"),
])
def test_parse_errors(text, message):
    with pytest.raises(SpecError, match=message):
        loads(text, origin="x.toml")


def test_shape_expressions_are_not_python():
    spec = with_rules((Q, Rule(("q.{i}",), ("text.blocks.{i}.attn.q.weight",),
                               (OpSpec("reshape", ["__import__('os').getpid()", 72]),), ((96, 72),))))
    with pytest.raises(SpecError, match="only integers, symbols"):
        bind(spec, CONFIGS["tiny"])


def test_unknown_spec_reference_lists_builtins():
    with pytest.raises(SpecError, match=r"unknown spec 'nope'.*big-vision.*hf-legacy"):
        load_spec("nope")


# ---------------------------------------------------------------------------------------------------------------
# On disk: a user spec with a norm offset, written and read back; provenance refuses a double offset.

@pytest.fixture
def offset_spec(tmp_path):
    """The hub layout with the Gemma norms stored shifted: reading adds 1 (native = file + 1)."""
    norms = ("attn_norm.weight", "mlp_norm.weight")
    rules = tuple(dataclasses.replace(r, ops=(OpSpec("add", 1.0),)) if r.native[0].endswith(norms) else r
                  for r in layout_spec("hf-legacy").rules)
    path = tmp_path / "plus-one.toml"
    path.write_text(dumps(Spec("plus-one", rules, metadata=(("note", "norm weights stored as w - 1"),))))
    return path


def test_user_spec_with_offsets_on_disk(tmp_path, offset_spec):
    cfg = CONFIGS["tiny"]
    natives = {n: torch.randn(s) for n, s in native_shapes(cfg).items()}
    natives["text.blocks.0.attn_norm.weight"] = torch.tensor([0.5, -0.25] * 36)  # exact under +1 -1
    (tmp_path / "src").mkdir()
    save_file(layouts.from_native(natives, cfg, "hf-legacy"), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))

    convert_to_spec(tmp_path / "src", tmp_path / "out", offset_spec, quiet=True)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        meta = f.metadata()
        stored = f.get_tensor("language_model.model.layers.0.input_layernorm.weight")
    assert meta["pgconv.format"] == "plus-one" and json.loads(meta["pgconv.offsets"])
    assert torch.equal(stored, natives["text.blocks.0.attn_norm.weight"] - 1.0)

    back = open_spec_checkpoint(tmp_path / "out", offset_spec)  # config.json written next to it
    assert torch.equal(back.tensors["text.blocks.0.attn_norm.weight"].load(), natives["text.blocks.0.attn_norm.weight"])
    # The same names read as the plain hub layout would skip the offset: refused.
    with pytest.raises(InputError, match=r"written by pgconv as format 'plus-one' with offsets .* reading it as 'hf-legacy'"):
        open_spec_checkpoint(tmp_path / "out", "hf-legacy")
    with pytest.raises(InputError, match=r"format 'plus-one'.*reading it as 'hf-legacy'"):
        convert_to_spec(tmp_path / "out", tmp_path / "again", offset_spec, quiet=True)
    # pgconv.load (and so verify) reads layouts too: it must refuse the same way instead of skipping the offset.
    from pgconv.converter.load import load_state_dict

    with pytest.raises(InputError, match=r"format 'plus-one'.*reading it as 'hf-legacy'"):
        load_state_dict(tmp_path / "out")


def _offset_source(tmp_path) -> dict:
    cfg = CONFIGS["tiny"]
    natives = {n: torch.randn(s) for n, s in native_shapes(cfg).items()}  # random norms: x - 1 + 1 rounds
    (tmp_path / "src").mkdir()
    save_file(layouts.from_native(natives, cfg, "hf-legacy"), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
    return natives


def test_check_of_an_offset_spec_verifies_hashes_and_bounds_the_rounding(tmp_path, offset_spec):
    """`--check` on a spec with `add`: x - 1 + 1 cannot give the source back bit for bit in fp32, so those tensors
    are held to the rounding of the two steps and their change is reported."""
    natives = _offset_source(tmp_path)
    name = "text.blocks.0.attn_norm.weight"
    assert not torch.equal(natives[name] - 1 + 1, natives[name])  # the case the check must handle
    summary = convert_to_spec(tmp_path / "src", tmp_path / "out", offset_spec, check=True, quiet=True)
    assert "tensor hashes verified" in summary.check and "through `add`, where x - c + c rounds" in summary.check
    assert "largest change" in summary.check


def _offset_spec(tmp_path, c: float) -> Path:
    norms = ("attn_norm.weight", "mlp_norm.weight")
    rules = tuple(dataclasses.replace(r, ops=(OpSpec("add", c),)) if r.native[0].endswith(norms) else r
                  for r in layout_spec("hf-legacy").rules)
    path = tmp_path / f"offset-{c:g}.toml"
    path.write_text(dumps(Spec(f"offset-{c:g}", rules)))
    return path


def test_check_fails_an_add_that_destroys_the_values(tmp_path):
    """An offset far above the values (1e30 in fp32) keeps nothing of them; the check must not call that rounding."""
    _offset_source(tmp_path)
    with pytest.raises(InputError, match=r"moved by up to .* through the spec's add of 1e\+30"):
        convert_to_spec(tmp_path / "src", tmp_path / "out", _offset_spec(tmp_path, 1e30), check=True, quiet=True)
    assert not (tmp_path / "out").exists()


def test_failed_spec_check_leaves_no_destination_and_keeps_a_forced_one(tmp_path, offset_spec, monkeypatch):
    """The check runs on the temporary output: a failure leaves no DST, and a --force'd DST untouched."""
    from pgconv.converter import spec_write

    _offset_source(tmp_path)
    real_open = spec_write.open_spec_checkpoint

    def off_by_a_lot(*args, **kwargs):  # the read-back moves every rounded tensor far beyond its rounding
        ck = real_open(*args, **kwargs)
        t = ck.tensors["text.blocks.0.attn_norm.weight"]
        ck.tensors["text.blocks.0.attn_norm.weight"] = dataclasses.replace(t, loader=lambda t=t: t.load() + 1)
        return ck

    monkeypatch.setattr(spec_write, "open_spec_checkpoint", off_by_a_lot)
    with pytest.raises(InputError, match="check failed.*more than the rounding"):
        convert_to_spec(tmp_path / "src", tmp_path / "new", offset_spec, check=True, quiet=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep").write_text("x")
    with pytest.raises(InputError, match="check failed"):
        convert_to_spec(tmp_path / "src", tmp_path / "old", offset_spec, check=True, force=True, quiet=True)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "plus-one.toml", "src"]  # no temporary left


def test_check_catches_a_corrupted_spec_output(tmp_path, offset_spec, monkeypatch):
    """A byte changed on disk after writing (before the check): the manifest hash catches it."""
    from pgconv.converter import spec_write

    _offset_source(tmp_path)
    real = spec_write._check

    def corrupt_then_check(out, *args):
        f = out / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
        return real(out, *args)

    monkeypatch.setattr(spec_write, "_check", corrupt_then_check)
    with pytest.raises(InputError, match="sha256 differs from the manifest"):
        convert_to_spec(tmp_path / "src", tmp_path / "out", offset_spec, check=True, quiet=True)
    assert not (tmp_path / "out").exists()


def test_npz_check_reads_the_temporary_output(tmp_path):
    """big_vision `.npz` with --check: read back under its temporary name before the rename."""
    cfg = CONFIGS["tiny"]
    natives = {n: torch.randn(s) for n, s in native_shapes(cfg).items()}
    (tmp_path / "src").mkdir()
    save_file(layouts.from_native(natives, cfg, "hf-legacy"), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
    summary = convert_to_spec(tmp_path / "src", tmp_path / "out.npz", "big-vision", check=True, quiet=True,
                              allow_cut=True)
    assert summary.check.startswith("check: out.npz read back") and (tmp_path / "out.npz").is_file()
    lossy = convert_to_spec(tmp_path / "src", tmp_path / "bf16.npz", "big-vision", dtype="bfloat16", quiet=True,
                            allow_cut=True)
    assert "lossy cast" in str(lossy) and "manifest" not in str(lossy)  # an .npz has no manifest to point to


USER_SPEC = '''
name = "flax-like"
description = "hub names, but decoder projections stacked over layers and stored (in, out) like flax kernels"
format = "safetensors"

[[rule]]
file = "decoder/q/kernel"
native = "text.blocks.{i}.attn.q.weight"
layer_axis = 0
shape = ["L", "D", "N*H"]
ops = [{transpose = [1, 0]}]

[[rule]]
file = "decoder/kv/kernel"
native = ["text.blocks.{i}.attn.k.weight", "text.blocks.{i}.attn.v.weight"]
layer_axis = 0
shape = ["L", "D", "2*K*H"]
ops = [{transpose = [1, 0]}, {split = {axis = 0, sizes = ["K*H", "K*H"]}}]
'''


def rules_toml(spec: Spec) -> str:
    """Just the [[rule]] tables of a spec, to append to a hand-written header."""
    return "\n[[rule]]" + dumps(spec).split("\n[[rule]]", 1)[1]


def test_cli_user_spec_round_trip(tmp_path):
    from pgconv.cli import main

    cfg = CONFIGS["tiny"]
    # The rest of the rules: the hub layout's, minus the tensors the two rules above make.
    taken = {"text.blocks.{i}.attn.q.weight", "text.blocks.{i}.attn.k.weight", "text.blocks.{i}.attn.v.weight"}
    rest = Spec("x", tuple(r for r in layout_spec("hf-legacy").rules if r.native[0] not in taken))
    spec_path = tmp_path / "flax-like.toml"
    spec_path.write_text(USER_SPEC + rules_toml(rest))
    natives = random_natives(cfg)
    (tmp_path / "src").mkdir()
    save_file(layouts.from_native(natives, cfg, "hf-legacy"), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))

    def cli(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        assert exc.value.code == 0

    cli("convert", tmp_path / "src", tmp_path / "out", "--to", spec_path, "--check", "--quiet")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_slice("decoder/kv/kernel").get_shape() == [2, 72, 96]
        assert f.metadata()["pgconv.format"] == "flax-like"
        kv = f.get_tensor("decoder/kv/kernel")
    assert same_bits(kv[1, :, :48], natives["text.blocks.1.attn.k.weight"].T.contiguous())
    cli("convert", tmp_path / "out", tmp_path / "back", "--from", spec_path, "--to", "hf-legacy", "--check", "--quiet")
    a, b = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)


def test_slice_rows_on_disk_checks_the_dropped_rows(tmp_path):
    """A file that stores 3 more embedding rows than the config: read by streaming, refused if they are not zero."""
    cfg = CONFIGS["tiny"]
    rules = tuple(dataclasses.replace(r, ops=(OpSpec("slice_rows", "V"),), shape=(("V+3", "D"),))
                  if r.native == ("text.embed.weight",) else r for r in layout_spec("hf-legacy").rules)
    spec = Spec("padded", rules)
    natives = random_natives(cfg)
    files = layouts.from_native(natives, cfg, "hf-legacy")
    embed = files["language_model.model.embed_tokens.weight"]
    for name, extra in (("zero", torch.zeros(3, 72)), ("data", torch.ones(3, 72))):
        files["language_model.model.embed_tokens.weight"] = torch.cat([embed, extra])
        (tmp_path / name).mkdir()
        save_file(files, tmp_path / name / "model.safetensors")
        ck = open_spec_checkpoint(tmp_path / name / "model.safetensors", spec, cfg)
        streamed = ck.tensors["text.embed.weight"]
        if name == "zero":
            pieces = [p.clone() for p in streamed.chunks(4096)]  # the reader reuses its buffer
            assert same_bits(torch.cat(pieces).reshape(embed.shape), embed)
            assert same_bits(streamed.load(), embed)
        else:
            with pytest.raises(InputError, match="would be cut but are not zero padding"):
                list(streamed.chunks(4096))
            with pytest.raises(InputError, match="would be cut but are not zero padding"):
                streamed.load()
