"""Generation settings resolved exactly as transformers' `generate` resolves them from a checkpoint's files.

transformers 5.24 (`modeling_utils.from_pretrained` -> `GenerationMixin.adjust_generation_fn`, then
`generate` -> `_prepare_generation_config`, `_prepare_special_tokens`, `_prepare_generated_length`):
- the base is `generation_config.json` when the file exists, *only* that file: a key it lacks is unset, it is never
  filled from config.json (a generation_config.json without `eos_token_id` never stops on a token);
- without that file, `GenerationConfig.from_model_config(config.json's dict)`: config.json's top-level keys that
  are not null, then, for fields still unset, the first of its `decoder` / `generator` / `text_config` objects
  (PaliGemma 2 configs say `eos_token_id: 1` at the top and `[1, 107]` in text_config: transformers stops on 1
  alone; without the top-level key it would stop on both);
- unset fields take `GenerationConfig._get_default_generation_params()` (`GENERATE_DEFAULTS` below);
- `eos_token_id` becomes a list; a missing `pad_token_id` becomes the first eos id;
- without max_new_tokens / max_length given or stated, 20 new tokens (transformers caps that at a top-level
  max_position_embeddings, which PaliGemma configs do not have; pgconv caps it at the text model's positions,
  where its static cache ends, instead of refusing); a stated max_length counts the prompt.
`GREEDY_PROCESSORS` are the logits processors transformers builds from these fields under greedy decoding;
`pgconv.model.logits_processors` implements them, and the fields it cannot reproduce are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pgconv.errors import InputError

__all__ = ["GenerationSettings", "resolve_generation", "GENERATE_DEFAULTS", "GREEDY_PROCESSORS", "UNSUPPORTED"]

# GenerationConfig._get_default_generation_params() of transformers 5.24, the fields pgconv reads
# (tests/test_generation_config.py compares this with the installed transformers).
GENERATE_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "num_return_sequences": 1,
}
# Fields whose logits processors change greedy choices and that pgconv's generate reproduces (their neutral value).
GREEDY_PROCESSORS: dict[str, Any] = {
    "encoder_repetition_penalty": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None,
}
# Fields that change what `generate` returns and that pgconv does not reproduce (their neutral value): refused.
UNSUPPORTED: dict[str, Any] = {
    "encoder_no_repeat_ngram_size": 0, "forced_decoder_ids": None, "max_time": None, "num_beams": 1, "num_return_sequences": 1, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "remove_invalid_values": False, "guidance_scale": None, "watermarking_config": None, "dola_layers": None,
    "penalty_alpha": None, "stop_strings": None, "token_healing": False, "renormalize_logits": False,
    "low_memory": None, "constraints": None, "force_words_ids": None, "prompt_lookup_num_tokens": None,
    "assistant_model": None, "diversity_penalty": 0.0, "num_beam_groups": 1,
    # sampling-only warpers pgconv's sampler lacks (greedy ignores them)
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
}
_SAMPLING_ONLY = ("typical_p", "epsilon_cutoff", "eta_cutoff", "min_p", "top_h")
_SEARCH = ("num_beams", "num_return_sequences", "penalty_alpha", "low_memory", "constraints", "force_words_ids",
           "prompt_lookup_num_tokens", "assistant_model", "diversity_penalty", "num_beam_groups")


@dataclass(frozen=True)
class GenerationSettings:
    """What transformers' `generate()` (no arguments) would run with. `source` names the file the base came from."""

    source: str
    eos_token_ids: tuple[int, ...] = ()  # () = never stops on a token
    pad_token_id: int | None = None  # None only when there is no eos either
    bos_token_id: int | None = None
    max_new_tokens: int | None = None  # stated max_new_tokens
    max_length: int | None = None  # stated max_length (prompt included); None = transformers' 20 new tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    processors: dict[str, Any] = field(default_factory=dict)  # GREEDY_PROCESSORS fields with non-neutral values
    unsupported: dict[str, Any] = field(default_factory=dict)  # UNSUPPORTED fields with non-neutral values

    def new_tokens(self, prompt_length: int, max_positions: int) -> int:
        """How many tokens `generate()` may add to a prompt of `prompt_length` (`_prepare_generated_length`)."""
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 1:
                raise InputError(f"{self.source}: max_new_tokens={self.max_new_tokens} generates nothing")
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_length
        return max(min(GENERATE_DEFAULTS["max_length"] + prompt_length, max_positions) - prompt_length, 0)

    def check_supported(self, greedy: bool) -> None:
        """Refuse fields whose effect pgconv cannot reproduce (the sampling warpers only when sampling)."""
        bad = [k for k in self.unsupported if not (greedy and k in _SAMPLING_ONLY)]
        if bad:
            shown = ", ".join(f"{k}={self.unsupported[k]!r}" for k in bad)
            raise InputError(f"{self.source}: {shown} is not supported by pgconv's generate")

    def for_greedy_search(self) -> "GenerationSettings":
        """These settings with greedy single-beam search forced, as verify runs both `generate`s (it passes
        `do_sample=False, num_beams=1` to transformers'): search and sampling options no longer apply."""
        kept = {k: v for k, v in self.unsupported.items() if k not in _SEARCH and k not in _SAMPLING_ONLY}
        return dataclasses.replace(self, do_sample=False, unsupported=kept)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "eos_token_ids": list(self.eos_token_ids), "pad_token_id": self.pad_token_id,
                "max_new_tokens": self.max_new_tokens, "max_length": self.max_length, "do_sample": self.do_sample,
                "processors": dict(self.processors), "unsupported": dict(self.unsupported)}


def _neutral(v: Any, neutral: Any) -> bool:
    return v is None or v == neutral or (isinstance(v, (list, tuple, dict)) and not v)


def _ids(v: Any, name: str, allow_list: bool) -> tuple[int, ...]:
    vals = v if (allow_list and isinstance(v, list)) else [v]
    if not all(type(x) is int for x in vals):  # bool is an int subclass, 1.0 a float: neither is a token id
        raise InputError(f"{name}: expected a token id{' or a list of them' if allow_list else ''}, got {v!r}"[:200])
    return tuple(vals)


def _int(d: dict, key: str, where: str, lo: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if type(v) is not int or v < lo:
        raise InputError(f"{where}: {key}: expected an integer >= {lo}, got {v!r}"[:200])
    return v


def _number(d: dict, key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise InputError(f"{where}: {key}: expected a finite number >= 0, got {v!r}"[:200])
    return float(v)


def _id_lists(v: Any, name: str, nested: bool) -> Any:
    """suppress_tokens (a list of ids) or bad_words_ids (a list of lists of ids), type-checked."""
    if not isinstance(v, list) or not v:
        raise InputError(f"{name}: expected a non-empty list, got {v!r}"[:200])
    if nested:
        if not all(isinstance(s, list) and s for s in v):
            raise InputError(f"{name}: expected a list of non-empty lists of token ids, got {v!r}"[:200])
        return [list(_ids(s, name, True)) for s in v]
    return list(_ids(v, name, True))


def _from_model_config(config: dict) -> dict:
    """The fields `GenerationConfig.from_model_config` takes from a config dict: the top level's non-null values,
    then for the rest the first truthy `decoder` / `generator` / `text_config` object's."""
    if not isinstance(config, dict):
        raise InputError("config.json: not a JSON object")
    out = {k: v for k, v in config.items() if v is not None}
    sub = next((config[k] for k in ("decoder", "generator", "text_config") if config.get(k)), None)
    if isinstance(sub, dict):
        for k, v in sub.items():
            out.setdefault(k, v)
    return out


def resolve_generation(config: dict, generation: dict | None, *, config_name: str = "config.json",
                       generation_name: str = "generation_config.json") -> GenerationSettings:
    """Settings from config.json's dict and generation_config.json's (None when the file does not exist)."""
    if generation is not None:
        base, where = generation, generation_name
        if not isinstance(base, dict):
            raise InputError(f"{where}: not a JSON object")
    else:
        base, where = _from_model_config(config), config_name
    eos: tuple[int, ...] = ()
    if base.get("eos_token_id") is not None:
        eos = _ids(base["eos_token_id"], f"{where}: eos_token_id", True)
    pad = base.get("pad_token_id")
    pad = _ids(pad, f"{where}: pad_token_id", False)[0] if pad is not None else (eos[0] if eos else None)
    bos = base.get("bos_token_id")
    bos = _ids(bos, f"{where}: bos_token_id", False)[0] if bos is not None else None
    do_sample = base.get("do_sample")
    if do_sample is not None and type(do_sample) is not bool:
        raise InputError(f"{where}: do_sample: expected true or false, got {do_sample!r}"[:200])
    processors: dict[str, Any] = {}
    for key, neutral in GREEDY_PROCESSORS.items():
        v = base.get(key)
        if _neutral(v, neutral):
            continue
        name = f"{where}: {key}"
        if key in ("repetition_penalty", "encoder_repetition_penalty"):
            v = _number(base, key, where)
            if not v:
                raise InputError(f"{name}: must be > 0")
        elif key in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
            v = _int(base, key, where, 0)
        elif key in ("forced_bos_token_id", "forced_eos_token_id"):
            v = list(_ids(v, name, key == "forced_eos_token_id"))
        else:
            v = _id_lists(v, name, key == "bad_words_ids")
        if not _neutral(v, neutral):
            processors[key] = v
    if base.get("min_new_tokens") is not None:
        # `_prepare_generated_length` overwrites min_length with prompt + min_new_tokens: a stated one is void.
        processors.pop("min_length", None)
    unsupported = {k: base[k] for k, neutral in UNSUPPORTED.items() if not _neutral(base.get(k), neutral)}
    top_k = _int(base, "top_k", where, 0)
    temperature = _number(base, "temperature", where)
    top_p = _number(base, "top_p", where)
    return GenerationSettings(
        source=where, eos_token_ids=eos, pad_token_id=pad, bos_token_id=bos,
        max_new_tokens=_int(base, "max_new_tokens", where, 0), max_length=_int(base, "max_length", where, 0),
        do_sample=bool(do_sample),
        temperature=GENERATE_DEFAULTS["temperature"] if temperature is None else temperature,
        top_k=GENERATE_DEFAULTS["top_k"] if top_k is None else top_k,
        top_p=GENERATE_DEFAULTS["top_p"] if top_p is None else top_p,
        processors=processors, unsupported=unsupported,
    )
