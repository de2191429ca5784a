"""Atomic JSON output shared by training and the studies (see ``experiments.atomic``)."""

from __future__ import annotations

from experiments.atomic import write_json as write_json_atomic

__all__ = ["write_json_atomic"]
