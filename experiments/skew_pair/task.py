"""The synthetic two-modality task: an XOR of two bits planted at chosen encoder depths.

Each example has two token sequences, one per modality, and a label ``y = a XOR b`` of two
hidden bits: bit ``a`` is written into sequence A, bit ``b`` into sequence B. Neither sequence
alone says anything about ``y`` (it is balanced given either bit), so a model must combine the
two modalities.

Depth is planted through locality. The encoders (``encoders.py``) attend within a band: token
``t`` sees the tokens ``t - r .. t + r`` (``r`` = ``radius_*``). Information at position ``p``
therefore reaches the summary token (position 0) first in layer ``ceil(p / r)`` (1-based), i.e.
zero-based layer ``ceil(p / r) - 1`` of the ``layer_summaries(drop_embeddings=True)`` stack,
and not a layer earlier. A sequence is laid out as::

    [CLS] FILL ... FILL  S S S S  N N N N
          (constant)     signal   noise tail
          positions      starts at p = depth * r + 1

* ``FILL`` is one constant token, so the summary of every layer below ``depth`` is the same for
  every example (it carries nothing);
* the ``signal_len`` signal tokens are drawn from the vocabulary of the sequence's bit (with
  probability ``purity``) or of the other bit (``1 - purity``): the bit is readable, with some
  ambiguity, from the summary of layer ``depth`` on;
* the ``tail_len`` noise tokens (their own vocabulary, uniform) sit behind the signal and reach
  the summary a few layers later, adding label-free variation to the deep layers.

With the defaults (``depth_a = 6``, ``depth_b = 0``): bit ``a`` exists in layers 6..11 of A,
bit ``b`` in every layer of B. A skew-pair set (layer ``i`` of A with layer ``i - s`` of B,
``P`` consecutive pairs from the lowest layers that exist) can solve the task only when it
reaches layer 6 of A (:func:`reaches`): for ``s >= 0`` its A layers are ``s .. s + P - 1``, so it needs
``s >= depth_a - P + 1`` (6, 4 and 2 for 1, 3 and 5 pairs); for ``s < 0`` its A layers are
``0 .. P - 1`` and it stays at chance while ``P <= depth_a``.

The labels are balanced by construction: the four ``(a, b)`` combinations appear
``n // 4`` times each (the remainder drawn at random), in random order. Everything is drawn
from one ``torch.Generator`` seeded with ``seed``: same arguments, same tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# Token ids (shared by both modalities; each encoder has its own embeddings).
PAD, CLS, FILL = 0, 1, 2
FIRST_CLASS_TOKEN = 3


@dataclass(frozen=True)
class TaskConfig:
    """Parameters of the generator (see the module docstring).

    ``depth_a``/``depth_b``: zero-based layer of the summary stack where the bit of A / B
    first appears. ``radius_a``/``radius_b``: attention band half-width of the encoder that
    reads A / B (the generator needs it to place a signal at a depth; ``encoders.py`` uses the
    same values). ``signal_len``: signal tokens per sequence. ``tail_len``: noise tokens behind
    the signal. ``class_vocab``: distinct tokens per bit value. ``noise_vocab``: distinct tail
    tokens. ``purity``: probability that a signal token comes from its own bit's vocabulary.
    """

    depth_a: int = 6
    depth_b: int = 0
    radius_a: int = 1
    radius_b: int = 2
    signal_len: int = 4
    tail_len: int = 4
    class_vocab: int = 8
    noise_vocab: int = 16
    purity: float = 0.9

    def __post_init__(self) -> None:
        for name in ("depth_a", "depth_b", "tail_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"TaskConfig: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("radius_a", "radius_b", "signal_len", "class_vocab", "noise_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskConfig: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.5 <= self.purity <= 1:
            raise ValueError(f"TaskConfig: purity must be in [0.5, 1], got {self.purity}")

    @property
    def vocab_size(self) -> int:
        """Token ids used: PAD, CLS, FILL, both bit vocabularies, the noise vocabulary."""
        return FIRST_CLASS_TOKEN + 2 * self.class_vocab + self.noise_vocab

    def signal_start(self, modality: str) -> int:
        """Position of the first signal token of ``modality`` ("a" or "b"): ``depth * r + 1``."""
        depth, radius = self._depth_radius(modality)
        return depth * radius + 1

    def length(self, modality: str) -> int:
        """Tokens per sequence of ``modality``, CLS included."""
        return self.signal_start(modality) + self.signal_len + self.tail_len

    def arrival(self, modality: str) -> int:
        """Zero-based summary layer where the signal of ``modality`` first arrives (``== depth``)."""
        _, radius = self._depth_radius(modality)
        return math.ceil(self.signal_start(modality) / radius) - 1

    def _depth_radius(self, modality: str) -> tuple[int, int]:
        if modality == "a":
            return self.depth_a, self.radius_a
        if modality == "b":
            return self.depth_b, self.radius_b
        raise ValueError(f"modality must be 'a' or 'b', got {modality!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Task:
    """One generated data set: ``tokens_a (n, length_a)``, ``tokens_b (n, length_b)`` int64,
    ``bit_a``, ``bit_b``, ``label`` (``bit_a ^ bit_b``) int64 ``(n,)``."""

    config: TaskConfig
    tokens_a: Tensor
    tokens_b: Tensor
    bit_a: Tensor
    bit_b: Tensor
    label: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])


def _balanced_bits(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n // 4`` examples of each ``(a, b)`` combination plus a random remainder, shuffled."""
    combos = torch.arange(4).repeat(n // 4)
    extra = torch.randperm(4, generator=gen)[: n % 4]
    combos = torch.cat([combos, extra])[torch.randperm(n, generator=gen)]
    return combos // 2, combos % 2


def _sequence(cfg: TaskConfig, modality: str, bit: Tensor, gen: torch.Generator) -> Tensor:
    n = bit.shape[0]
    start = cfg.signal_start(modality)
    tokens = torch.full((n, cfg.length(modality)), FILL, dtype=torch.int64)
    tokens[:, 0] = CLS
    own = torch.rand(n, cfg.signal_len, generator=gen) < cfg.purity
    value = torch.where(own, bit[:, None], 1 - bit[:, None])  # which bit's vocabulary
    pick = torch.randint(0, cfg.class_vocab, (n, cfg.signal_len), generator=gen)
    tokens[:, start : start + cfg.signal_len] = FIRST_CLASS_TOKEN + value * cfg.class_vocab + pick
    noise_first = FIRST_CLASS_TOKEN + 2 * cfg.class_vocab
    tail = torch.randint(0, cfg.noise_vocab, (n, cfg.tail_len), generator=gen)
    tokens[:, start + cfg.signal_len :] = noise_first + tail
    return tokens


def make_task(cfg: TaskConfig, n: int, seed: int) -> Task:
    """Generate ``n`` examples of the task (deterministic in ``cfg``, ``n`` and ``seed``)."""
    if n < 1:
        raise ValueError(f"make_task: n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    bit_a, bit_b = _balanced_bits(n, gen)
    tokens_a = _sequence(cfg, "a", bit_a, gen)
    tokens_b = _sequence(cfg, "b", bit_b, gen)
    return Task(cfg, tokens_a, tokens_b, bit_a, bit_b, bit_a ^ bit_b)


def bit_readout(cfg: TaskConfig, tokens: Tensor, modality: str) -> Tensor:
    """Majority vote of the signal tokens of ``modality`` (ties: 0): the Bayes-optimal guess
    of its bit from the whole sequence."""
    start = cfg.signal_start(modality)
    signal = tokens[:, start : start + cfg.signal_len]
    ones = ((signal - FIRST_CLASS_TOKEN) // cfg.class_vocab).sum(dim=1)
    return (2 * ones > cfg.signal_len).long()


def bayes_accuracy(cfg: TaskConfig) -> float:
    """Accuracy of the best possible classifier of ``y`` given both full sequences.

    Per bit: a majority vote of ``signal_len`` tokens, each right with probability ``purity``
    (a tie is a coin flip): ``q``. The XOR of the two votes is right when both or neither are
    wrong: ``q² + (1 - q)²``. (No model here can beat it; the encoders' summaries may lose
    some of the tokens' information, so it is a ceiling, not a target.)
    """
    k, p = cfg.signal_len, cfg.purity
    q = 0.0
    for right in range(k + 1):
        prob = math.comb(k, right) * p**right * (1 - p) ** (k - right)
        q += prob * (1.0 if 2 * right > k else 0.5 if 2 * right == k else 0.0)
    return q * q + (1 - q) * (1 - q)


def reaches(cfg: TaskConfig, pairs: Tensor | list[tuple[int, int]]) -> bool:
    """Whether a pair set contains a layer of A at or above ``depth_a`` and a layer of B at or
    above ``depth_b``, i.e. whether both bits are in the summaries it fuses (the prediction the
    sweep is checked against; the two bits may sit in different pairs, as pooling and the
    classifier head can still combine them)."""
    table = torch.as_tensor(pairs).reshape(-1, 2)
    return bool(table[:, 0].max() >= cfg.depth_a and table[:, 1].max() >= cfg.depth_b)
