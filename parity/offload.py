"""The reference side of a verify or golden run that does not fit the memory budget: transformers' own big-model
inference (accelerate's `device_map` with CPU and disk offload, `max_memory`), and what verify needs around it.

- `device_map(path, dtype, max_memory)`: accelerate's `infer_auto_device_map` on a meta-device copy of the model (no
  split inside a decoder or vision layer: `_no_split_modules`), with the token embedding and the head kept in memory
  (verify's float64 oracles read their weights directly, and pgconv's model shares them). Offloaded layers are read
  by accelerate's hooks from the checkpoint's own safetensors files when a layer runs (no copy on disk; other
  formats are saved once into a temporary `offload_folder`), cast to the run dtype by the hook;
- on several GPUs `max_memory` names each (`{0: "20GiB", 1: "20GiB", "cpu": "8GB"}`): accelerate spreads the layers
  over them in order and pgconv's streamed model loads each block onto the device of the reference's block
  (`placement`);
- `share_resident`: pgconv's streamed model adopts the reference's in-memory tensors (the same storage, as the
  in-memory verify shares every weight), so the budget pays for them once;
- `materialised_copy`: a module's weights gathered from the offload (`accelerate.utils.align_module_device`) for the
  float64 oracle's copy, which then carries no hooks;
- `weight_parity`: every mapped tensor compared bit for bit, one layer at a time.
Nothing here moves transformers' modules by hand: placement and offload are accelerate's.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgconv.errors import InputError

__all__ = ["load_offloaded", "load_pair", "device_map", "max_memory_for", "share_resident", "materialised_copy",
           "weight_parity", "placement", "materialised"]

_KEEP = ("model.language_model.embed_tokens", "lm_head")  # read directly by the oracles; shared with ours


def _accelerate():
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise InputError("the model does not fit --max-memory and the reference side needs accelerate: "
                         "pip install 'pgconv[big]' (or accelerate)") from None


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (never discards data: anonymous pages would be swapped)


@contextlib.contextmanager
def _paging_out(root: Path, every: float = 0.05):
    """While inside, the pages of `root`'s files that this process maps are handed back every `every`
    seconds (`madvise(MADV_PAGEOUT)`). transformers' loader reads every tensor of the checkpoint through
    safetensors' memory map, offloaded ones included, and the file stays mapped until it is done: every page
    touched counts in the resident set (measured at 10B: 17.3 GB of mapped pages next to 4.2 GB of memory), so the
    peak RSS would follow the checkpoint's size, not the budget. MADV_PAGEOUT is only a hint that never changes
    data (a private page written, or an address reused by another mapping in between, is at worst swapped out, and
    stays without swap); a kernel without it changes nothing."""
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        yield
        return
    files = {str(f.resolve()) for f in Path(root).iterdir() if f.is_file()}
    stop = threading.Event()

    def page_out() -> None:
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5] in files:  # safetensors maps rw-p: a written page is simply kept
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                madvise(lo, hi - lo, _MADV_PAGEOUT)

    def loop() -> None:
        while not stop.wait(every):
            page_out()

    thread = threading.Thread(target=loop, name="pgconv-pageout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def load_offloaded(path: Path, dtype: torch.dtype, max_memory: dict[Any, int]) -> tuple[nn.Module, dict]:
    """(transformers' model placed by accelerate under `max_memory`, its loading info): `from_pretrained` with a
    `device_map`, CPU and disk offload, eager attention. The offload folder (used only for weights that are not in
    safetensors files) is a temporary directory removed with the model."""
    import shutil
    import tempfile
    import weakref

    _accelerate()
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from pgconv.converter.checkpoint import open_checkpoint
    from pgconv.converter.plan import plan_conversion

    ckpt = open_checkpoint(path)
    if plan_conversion(ckpt.metas(), ckpt.pg_config(), "native").src_layout == "native":
        raise InputError(f"{path}: pgconv's native layout cannot be offloaded by transformers (it cannot map the "
                         "names): `pgconv convert` it to a transformers layout first, or raise --max-memory")
    from pgconv.model.streaming import map_large_allocations

    map_large_allocations()  # offloaded layers read at every forward: freed blocks must leave the resident set
    placed = device_map(path, dtype, max_memory)
    folder = tempfile.mkdtemp(prefix="pgconv-offload-")
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import logging

    quiet = logging.getLogger("accelerate.big_modeling")  # "Some parameters are on the meta device ...": asked for
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _paging_out(path):
            model, info = PaliGemmaForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation="eager", output_loading_info=True, device_map=placed,
                offload_folder=folder)
    except (OSError, ValueError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise InputError(f"{path}: transformers cannot load the checkpoint ({e})") from None
    finally:
        quiet.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    weakref.finalize(model, shutil.rmtree, folder, True)
    return model, info


def max_memory_for(budget: int, device: str) -> dict[Any, int]:
    """accelerate's `max_memory` for a reference share of `budget` bytes of host memory: CPU only, or every visible
    GPU (its free memory less 10 %) and then the CPU, in that order, for `--device cuda`."""
    out: dict[Any, int] = {}
    if device.startswith("cuda"):
        if device != "cuda":  # cuda:N pins the whole reference's GPU part to that one
            ids = [int(device.split(":", 1)[1])]
        else:
            ids = list(range(torch.cuda.device_count()))
        for i in ids:
            free, _ = torch.cuda.mem_get_info(i)
            out[i] = int(free * 0.9)
    out["cpu"] = budget
    return out


def device_map(path: Path, dtype: torch.dtype, max_memory: dict[Any, int]) -> dict[str, Any]:
    """The placement accelerate infers for `path` in `dtype` under `max_memory` (module docstring)."""
    _accelerate()
    from accelerate import init_empty_weights
    from accelerate.utils import infer_auto_device_map
    from transformers import AutoConfig, PaliGemmaForConditionalGeneration

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        meta = PaliGemmaForConditionalGeneration._from_config(config, dtype=dtype)
    meta.tie_weights()
    placed = infer_auto_device_map(meta, max_memory={**max_memory, "disk": 1 << 62}, dtype=dtype,
                                   no_split_module_classes=list(meta._no_split_modules), clean_result=False)
    main = next(iter(max_memory))  # the first device: a GPU when there is one
    modules = dict(meta.named_modules())
    for keep in _KEEP:
        # A coarser entry holding `keep` (all of `model.language_model` on disk) is split into its children
        # until `keep` is an entry of its own.
        while keep not in placed:
            outer = next((n for n in placed if keep.startswith(n + ".") or n == ""), None)
            if outer is None:
                break
            where = placed.pop(outer)
            for child, _ in modules[outer].named_children():
                placed[f"{outer}.{child}" if outer else child] = where
        if placed.get(keep) == "disk" or keep not in placed:
            placed[keep] = main
    return placed


def _offloaded_leaves(module: nn.Module) -> list[nn.Module]:
    from accelerate.utils.modeling import has_offloaded_params

    return [m for m in module.modules() if has_offloaded_params(m)]


@contextlib.contextmanager
def materialised(module: nn.Module):
    """Within the block every parameter of `module` holds its value (accelerate's `align_module_device` on each
    offloaded sub-module); outside it the offloaded ones are back on the meta device."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for leaf in _offloaded_leaves(module):
            stack.enter_context(align_module_device(leaf))
        yield module


def materialised_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every weight in memory and no accelerate hooks (the float64 oracle's copy)."""
    if getattr(module, "_hf_hook", None) is None and not any(hasattr(m, "_hf_hook") for m in module.modules()):
        return copy.deepcopy(module)
    from accelerate.hooks import remove_hook_from_module

    with materialised(module):
        out = copy.deepcopy(module)
    return remove_hook_from_module(out, recurse=True)


def share_resident(ours: nn.Module, ref: nn.Module, layout: str) -> int:
    """Pin each streamed unit of `ours` whose every reference tensor is in memory on `ours`' device in its dtype,
    on those tensors (no copy); the same for the always-resident parameters. Returns the bytes shared."""
    from pgconv.converter.layouts import key_map

    streamer = ours.streamer
    names = key_map(ours.cfg, layout)
    ref_sd = ref.state_dict()

    def theirs(native: str, device: torch.device) -> torch.Tensor | None:
        t = ref_sd.get(names.get(native, ""))
        ok = t is not None and t.device == device and t.dtype == streamer.dtype and t.device.type != "meta"
        return t if ok else None

    shared = 0
    for unit in streamer.units:
        tensors = [theirs(native, unit.device or streamer.device) for native, _, _ in unit.params]
        if any(t is None for t in tensors):
            continue
        if unit.resident:
            streamer.release(unit)
        for (native, module, attr), t in zip(unit.params, tensors):
            module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        unit.pinned = unit.resident = True
        shared += unit.nbytes
    return shared


def placement(ours: nn.Module, ref: nn.Module) -> dict[str, torch.device]:
    """On several devices: each streamed unit of ours runs on the device of the reference's module it mirrors
    (`hf_device_map`; `model.streaming.place` moves weights, inputs and the KV cache), so activations cross devices
    where the reference's do. Returns the placement ({} on one device: nothing moves)."""
    from pgconv.converter.layouts import key_map
    from pgconv.model.streaming import place

    hf_map = getattr(ref, "hf_device_map", None) or {}
    if not any(isinstance(v, int) or str(v).startswith("cuda") for v in hf_map.values()):
        return {}
    names = key_map(ours.cfg, "hf-5.6")
    devices = {}
    for unit in ours.streamer.units:
        ref_name = names.get(unit.params[0][0], "").rpartition(".")[0]
        best = max((k for k in hf_map if ref_name == k or ref_name.startswith(k + ".")), key=len, default=None)
        where = hf_map.get(best) if best is not None else None
        if where is not None and where != "disk":
            devices[unit.name] = torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    place(ours, devices)
    return devices


def weight_parity(ours: nn.Module, ref: nn.Module, cfg: Any, layout: str) -> dict[str, Any]:
    """`models.weight_parity` for a streamed pgconv model and an offloaded reference: each unit of ours read (or
    shared) and each reference layer gathered from its offload, one at a time, compared bit for bit."""
    from pgconv.converter.layouts import key_map
    from pgconv.parity.models import nonfinite_counts

    streamer = ours.streamer
    names = key_map(ours.cfg, layout)
    untied = None
    if cfg.tie_word_embeddings and not ours.cfg.tie_word_embeddings:  # as models.weight_parity says it
        untied = ("the stored lm_head differs from the embedding although the config ties them "
                  "(tie_word_embeddings=true): transformers keeps both untied, and so does pgconv")
    ref_modules = dict(ref.named_modules())
    rows, bad, nonfinite, nbytes = [], [], {}, 0
    by_native = {native: (unit, module, attr) for unit in streamer.units for native, module, attr in unit.params}
    own = dict(ours.named_parameters())
    for native, their_name in names.items():
        module_name, _, attr = their_name.rpartition(".")
        their_module = ref_modules.get(module_name)
        if their_module is None or (native not in own and native not in by_native):
            rows.append({"native": native, "reference": their_name,
                         "missing": "reference" if their_module is None else "ours"})
            bad.append(native)
            continue
        if native in by_native and not by_native[native][0].resident:
            a = streamer._read(native)
        elif native in by_native:
            unit, module, a_attr = by_native[native]
            a = module._parameters[a_attr]
        else:
            a = own[native]
        with materialised(their_module):
            b = getattr(their_module, attr)
            same_meta = a.shape == b.shape and a.dtype == b.dtype
            shared = same_meta and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
            equal = shared or (same_meta and bool(torch.equal(a, b.to(a.device))))
        nonfinite.update(nonfinite_counts({native: a}))
        nbytes += a.numel() * a.element_size()
        rows.append({"native": native, "reference": their_name, "shape": list(a.shape),
                     "dtype": str(a.dtype).removeprefix("torch."), "shared": bool(shared), "bit_identical": equal})
        if not equal:
            bad.append(native)
        del a
    return {
        "passed": not bad, "mapped": len(rows), "bit_identical": sum(bool(r.get("bit_identical")) for r in rows),
        "shared": sum(bool(r.get("shared")) for r in rows), "mismatched": bad, "layout": layout,
        "tied_lm_head": ours.cfg.tie_word_embeddings, "untied_by_transformers": untied, "nonfinite": nonfinite,
        "bytes": nbytes, "map": rows, "streamed": True,
    }


def load_pair(path: Path, dtype: torch.dtype, device: str, budget: int) -> tuple[nn.Module, nn.Module, dict]:
    """(reference, ours, weight parity) for a verify whose models do not fit `budget`. Each side streams one layer
    at a time (ours: `model.streaming`; the reference: accelerate's hooks), so two layers' working sets come off
    the budget and the rest is the reference's in-memory share (`max_memory["cpu"]`; accelerate places the other
    layers on disk: the checkpoint's own files). Ours shares the reference's in-memory tensors (no second copy)
    and streams the rest."""
    from pgconv.model.streaming import HEAD_UNITS, load_streamed
    from pgconv.parity.models import REF_LAYOUT, load_reference, read_config

    ours_device = device if device.startswith("cuda") else "cpu"
    if ours_device == "cuda":
        ours_device = "cuda:0"
    ours = load_streamed(path, dtype, ours_device, budget=budget, pin=False)  # refuses a budget below one layer
    # The embedding and head stay in memory on the reference's side (`device_map`) and ours shares them.
    working = ours.streamer.working_set([u for u in ours.streamer.units if u.name not in HEAD_UNITS])
    ref = load_reference(path, dtype, device, max_memory=max_memory_for(max(budget - 2 * working, 0), device))
    placement(ours, ref)
    share_resident(ours, ref, REF_LAYOUT)
    return ref, ours, weight_parity(ours, ref, read_config(path), REF_LAYOUT)
