"""Policy: the rules model, the rules-file parser and the compiled engine that decides requests.

Imports nothing else of ours."""

from policy.decision import Decision, ReasonCode, Verdict

__all__ = ["Decision", "ReasonCode", "Verdict"]
