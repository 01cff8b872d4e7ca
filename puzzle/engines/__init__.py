"""Serving engines: what each one's DeciLM loader accepts (:mod:`.rules`) and checks against it (:mod:`.check`)."""

from __future__ import annotations

from puzzle.engines.check import (Violation, allowed, allowed_attention, allowed_ffn, attention_refusal, block_problems,
                                  check_loadable, ffn_refusal, loaders, violations)
from puzzle.engines.rules import DEFAULT_ENGINE, ENGINE_NAMES, ENGINES, EngineRules, engine_rules

__all__ = ["DEFAULT_ENGINE", "ENGINE_NAMES", "ENGINES", "EngineRules", "Violation", "allowed", "allowed_attention",
           "allowed_ffn", "attention_refusal", "block_problems", "check_loadable", "ffn_refusal",
           "engine_rules", "loaders", "violations"]
