"""Teacher forcing: run one step of our model on the reference's captured input.

The difference between this output and the reference's output is the error the step *contributes*; the rest of the
end-to-end difference is *inherited* from upstream (kekzl/imp #1275 did this by hand; Polygraphy's golden-input
advice is the same idea). Recipes, named in the probe table's `replay` column:
- `call`: call our module again with the reference's input tensor in place of its first tensor argument, keeping our
  other arguments (the AttnContext our block really got);
- `merge`: our `embed(input_ids, image_features)` with the reference's projector output;
- `features`: the step between our projector and our merge (the identity in our model, not in every port),
  measured by what it changes: the reference's projector output + (our merged features - our projector output);
- `logits`: our `logits(hidden)` on the reference's final-norm output.
Every recipe is skipped, with contributed = end-to-end, when our input already equals the reference's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pgconv.parity.capture import Call, Recorder, primary
from pgconv.parity.probes import Probe

__all__ = ["replay", "same_input", "own_value", "OWN", "OWN_PATHS"]

T = "model.language_model."


# Our values that come from a method rather than a module: recomputed on our own run's inputs (deterministic, so
# equal to what the forward computed when the forward really uses the method; the chain check on the next block's
# input proves that it did).
OWN = {
    "vision.embed()": lambda model, rec, inputs: model.vision.embed(inputs["pixel_values"]),
    # The features our forward handed to `embed` (`image_tap`), not the projector's output: the two differ exactly
    # when our model changes the features in between, which the `image_features` probe reports.
    "embed()": lambda model, rec, inputs: model.embed(inputs["input_ids"], rec.get("image_tap", "output")),
}
OWN_PATHS = ("projector", "image_tap", "text.norm")  # modules of ours the OWN and replay recipes read


@torch.no_grad()
def own_value(probe: Probe, ours: nn.Module, ours_rec: Recorder, inputs: dict[str, Tensor]) -> Tensor:
    return OWN[probe.ours](ours, ours_rec, inputs)


def _ref_input(probe: Probe, ref_rec: Recorder) -> Tensor:
    return primary((*ref_rec.call(probe.ref).args, ref_rec.call(probe.ref).kwargs))


def _swap_first_tensor(call: Call, x: Tensor) -> tuple[tuple, dict[str, Any]]:
    args = list(call.args)
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            args[i] = x
            return tuple(args), dict(call.kwargs)
    kwargs = dict(call.kwargs)
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            kwargs[k] = x
            return tuple(args), kwargs
    raise ValueError("call has no tensor argument to replace")


# The inputs each recipe feeds our side: ((our module, side), the reference's module output) of the same tensor.
_RECIPE_INPUTS = {"merge": (("image_tap", "output"), "model.multi_modal_projector"),
                  "features": (("projector", "output"), "model.multi_modal_projector"),
                  "logits": (("text.norm", "output"), T + "norm")}


def same_input(probe: Probe, ours_rec: Recorder, ref_rec: Recorder) -> bool:
    """True when our step's input is bitwise the reference's (the replay would repeat the very same computation)."""
    if probe.replay == "call":
        ours_in = primary((*ours_rec.call(probe.ours).args, ours_rec.call(probe.ours).kwargs))
        ref_in = _ref_input(probe, ref_rec)
    elif probe.replay in _RECIPE_INPUTS:
        (ours_path, at), ref_path = _RECIPE_INPUTS[probe.replay]
        ours_in, ref_in = ours_rec.get(ours_path, at), ref_rec.get(ref_path, "output")
    else:
        return False
    return (ours_in is not None and ref_in is not None and ours_in.shape == ref_in.shape
            and ours_in.dtype == ref_in.dtype and bool(torch.equal(ours_in, ref_in)))


@torch.no_grad()
def replay(probe: Probe, ours: nn.Module, ours_rec: Recorder, ref_rec: Recorder, input_ids: Tensor) -> Tensor:
    """Our output for `probe` computed from the reference's input."""
    if probe.replay == "call":
        module = ours.get_submodule(probe.ours)
        args, kwargs = _swap_first_tensor(ours_rec.call(probe.ours), _ref_input(probe, ref_rec))
        return primary(module(*args, **kwargs))  # our forward ran without a KV cache: nothing to write
    if probe.replay == "merge":
        return ours.embed(input_ids, ref_rec.get("model.multi_modal_projector", "output"))
    if probe.replay == "features":
        ours_change = ours_rec.get("image_tap", "output") - ours_rec.get("projector", "output")
        return ref_rec.get("model.multi_modal_projector", "output") + ours_change
    if probe.replay == "logits":  # never whole in verify: `parity.logits` runs this recipe position chunk by chunk
        return ours.logits(ref_rec.get(T + "norm", "output"))
    raise ValueError(f"probe {probe.name}: no replay recipe {probe.replay!r}")
