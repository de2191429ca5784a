"""The peers' low-rank fusion weights, as their code lays them out, and how ours take them.

* The original LMF code (Justin1904/Low-rank-Multimodal-Fusion, ``LMF``) registers
  ``audio_factor``, ``video_factor``, ``text_factor`` ``(R, d_m + 1, O)``, ``fusion_weights
  (1, R)`` and ``fusion_bias (1, O)``; ``forward(audio, video, text)``.
* MultiBench's ``LowRankTensorFusion`` (``fusions/common_fusions.py``) holds the same tensors,
  but its factors sit in a plain list ``factors``: never registered, so never in a
  ``state_dict``. ``fusion_weights``/``fusion_bias`` are ``nn.Parameter(...).to(device)``:
  registered on a CPU-only machine (``.to`` returns the Parameter itself), not at all on a GPU
  one (``.to`` returns a plain copy). Its ``state_dict`` can therefore never restore its model;
  only the live module (``from_multibench``) can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

# The original LMF model's factor keys, in its forward's modality order.
LMF_FACTOR_KEYS = ("audio_factor", "video_factor", "text_factor")

MULTIBENCH_NO_FACTORS = (
    "it holds fusion_weights and fusion_bias but no factors: that is the state_dict of MultiBench's "
    "LowRankTensorFusion, whose factors sit in a plain Python list, are never registered and so "
    "were never saved. The factors cannot be recovered from it; adopt the live MultiBench module "
    "with LowRankTensorFusion.from_multibench(module) (or from_lmf_weights(module.factors, "
    "module.fusion_weights, module.fusion_bias))"
)


def shape_errors(
    factors: Mapping[str, Tensor],
    factor_shapes: Sequence[tuple[int, ...]],
    fusion_weights: Tensor | None,
    fusion_bias: Tensor | None,
    rank: int,
    out: int,
) -> dict[str, str]:
    """Each peer tensor whose shape does not fit, by key, with what was expected: factors
    exactly ``factor_shapes`` (in ``factors``' order), ``fusion_weights`` ``(1, R)`` or
    ``(R,)``, ``fusion_bias`` ``(1, O)`` or ``(O,)``."""
    errors = {}
    for (key, t), want in zip(factors.items(), factor_shapes, strict=True):
        if tuple(t.shape) != tuple(want):
            errors[key] = f"{key} must have shape {tuple(want)}, got {tuple(t.shape)}"
    for key, t, n in (("fusion_weights", fusion_weights, rank), ("fusion_bias", fusion_bias, out)):
        if t is not None and tuple(t.shape) not in ((1, n), (n,)):
            errors[key] = f"{key} must have shape (1, {n}) or ({n},), got {tuple(t.shape)}"
    return errors


def load_peer_layout(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook of ``LowRankFusion``: renames the LMF code's keys to ours
    (``audio_factor`` → ``factors.0`` …, ``fusion_weights (1, R)`` → ``rank_weight (R,)``,
    ``fusion_bias (1, O)`` → ``bias (O,)``) and explains a MultiBench ``state_dict``.

    Problems are reported under the peer's key names, and then none of the peer's tensors is
    loaded. Our own layout passes untouched.
    """
    if prefix + "fusion_weights" not in state_dict:
        return
    name = type(module).__name__
    keys = tuple(getattr(module, "lmf_factor_keys", LMF_FACTOR_KEYS))
    present = [k for k in keys if prefix + k in state_dict]
    problems = []
    own = [k[len(prefix) :] for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix) :]]
    if (
        not present
        and not any(k.endswith("_factor") for k in own)
        and not any(k.startswith(prefix + "factors.") for k in state_dict)
    ):
        # An error even for strict=False (torch hands every hook strict=True): the model is lost.
        problems.append(MULTIBENCH_NO_FACTORS)
    elif len(keys) != len(module.factors):
        problems.append(
            f"this layer has {len(module.factors)} modalities but lmf_factor_keys names "
            f"{len(keys)} ({list(keys)}): set layer.lmf_factor_keys to the factors' keys in "
            "forward's modality order"
        )
        present = []
    # A missing factor is left to torch: strict lists it as factors.<m> (m = its lmf_factor_keys index).

    # peer key -> (our key, our tensor, the peer tensor reshaped to ours)
    slots: dict[str, tuple[str, Tensor, Tensor]] = {}
    for k in present:
        m = keys.index(k)
        slots[k] = (f"factors.{m}", module.factors[m], state_dict.pop(prefix + k))
    fw = state_dict.pop(prefix + "fusion_weights")
    slots["fusion_weights"] = ("rank_weight", module.rank_weight, fw)
    fb = state_dict.pop(prefix + "fusion_bias", None)
    if fb is not None:
        if module.bias is None:
            problems.append("the state_dict has fusion_bias but this layer was built with bias=False")
        else:
            slots["fusion_bias"] = ("bias", module.bias, fb)
    shapes = [tuple(module.factors[keys.index(k)].shape) for k in present]
    bad = shape_errors({k: slots[k][2] for k in present}, shapes, fw, fb, module.rank, module.output_dim)
    if bad:
        problems.append("mis-shaped: " + "; ".join(bad.values()))
    for ours, mine, t in slots.values():
        # On any problem the layer keeps all its values (the error names the problem, and no
        # torch "size mismatch"/"missing" line repeats it under our names): nothing half-loaded.
        state_dict[prefix + ours] = mine.detach() if problems else t.reshape(mine.shape)
    if problems:
        where = f" (prefix {prefix!r})" if prefix else ""
        error_msgs.append(f"{name}: cannot load the LMF weights{where}: " + "; ".join(problems) + ".")
