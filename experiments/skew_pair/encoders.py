"""Two small frozen ``transformers`` encoders with random weights, and their layer summaries.

Encoder A is a ``BertModel``; encoder B an ``ElectraModel`` (a different architecture: its
token embeddings are narrower than its hidden width and projected up) of another width. Both
are built from configs, offline, with random weights, and never trained: the study runs them
once, keeps the per-layer CLS summaries (``fusionops.layer_summaries``) in memory and trains
only the fusion heads on them.

Every layer attends within a band (token ``t`` sees ``t - r .. t + r``), passed as a 4-D
additive attention mask, so a token ``p`` positions from CLS reaches the CLS summary only in
layer ``ceil(p / r)``: the mechanism that lets ``task.py`` plant information at a depth.

Weights are drawn with ``initializer_range`` 0.2 (BERT's default is 0.02): at 0.02 each
attention hop shrinks a far token's contribution to CLS about a hundredfold, and after six hops
it sits below float32 resolution. Even at 0.2 a signal arriving deep is small next to the
constant part of the summary (about 1e-4 of it), so :func:`standardize` rescales every layer's
features with training-set statistics before the heads see them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import transformers
from torch import Tensor, nn

import fusionops


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the two encoders (A: BERT, B: ELECTRA) and the extraction batch size."""

    layers_a: int = 12
    width_a: int = 32
    heads_a: int = 2
    layers_b: int = 12
    width_b: int = 48
    embedding_b: int = 24
    heads_b: int = 4
    initializer_range: float = 0.2
    batch_size: int = 512

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def build_encoders(
    cfg: EncoderConfig, vocab_size: int, max_length: int, seed: int
) -> tuple[nn.Module, nn.Module]:
    """``(bert, electra)`` with random weights from ``seed``, in eval mode, gradients off."""
    common = {
        "vocab_size": vocab_size,
        "max_position_embeddings": max_length,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": cfg.initializer_range,
    }
    config_a = transformers.BertConfig(
        hidden_size=cfg.width_a,
        num_hidden_layers=cfg.layers_a,
        num_attention_heads=cfg.heads_a,
        intermediate_size=2 * cfg.width_a,
        **common,
    )
    config_b = transformers.ElectraConfig(
        embedding_size=cfg.embedding_b,
        hidden_size=cfg.width_b,
        num_hidden_layers=cfg.layers_b,
        num_attention_heads=cfg.heads_b,
        intermediate_size=2 * cfg.width_b,
        **common,
    )
    torch.manual_seed(seed)
    models = []
    for config in (config_a, config_b):
        model = transformers.AutoModel.from_config(config, attn_implementation="eager")
        model.eval().requires_grad_(False)
        models.append(model)
    return models[0], models[1]


def band_mask(length: int, radius: int) -> Tensor:
    """Additive attention mask ``(1, 1, length, length)``: 0 where ``|t - u| <= radius``, the
    most negative float32 elsewhere."""
    pos = torch.arange(length)
    inside = (pos[:, None] - pos[None, :]).abs() <= radius
    mask = torch.zeros(length, length)
    mask[~inside] = torch.finfo(torch.float32).min
    return mask[None, None]


@torch.no_grad()
def summaries(model: nn.Module, tokens: Tensor, radius: int, batch_size: int) -> Tensor:
    """The CLS summary of every layer (embedding output dropped), ``(N, L, width)`` float32."""
    n, length = tokens.shape
    mask = band_mask(length, radius)
    out = []
    for start in range(0, n, batch_size):
        ids = tokens[start : start + batch_size]
        hidden = model(
            input_ids=ids,
            attention_mask=mask.expand(ids.shape[0], 1, length, length),
            output_hidden_states=True,
        ).hidden_states
        out.append(fusionops.layer_summaries(hidden, pool="cls", drop_embeddings=True))
    return torch.cat(out)


def standardize(stack: Tensor, train: Tensor, floor: float = 1e-6) -> Tensor:
    """Z-score every (layer, feature) of ``stack (N, L, D)`` with the mean and standard
    deviation over the rows ``train``; a feature constant on them (sd below ``floor``) is
    only centred (divided by ``floor``, which keeps float noise small)."""
    ref = stack[train].double()
    mean, sd = ref.mean(dim=0), ref.std(dim=0).clamp_min(floor)
    return ((stack.double() - mean) / sd).float()
