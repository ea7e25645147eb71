"""Policy: the rules model, the rules-file parser and the compiled engine that decides requests.

Imports nothing else of ours. Public API (docs/dev/interfaces.md): `load_policy`, `Engine`,
`Decision`, `Verdict`, `ReasonCode`; the rules-file reference is `policy/README.md`."""

from policy.decision import Decision, ReasonCode, Verdict
from policy.engine import Engine, load_policy
from policy.model import Action, Mode, Policy, Rule

__all__ = ["Action", "Decision", "Engine", "Mode", "Policy", "ReasonCode", "Rule", "Verdict", "load_policy"]
