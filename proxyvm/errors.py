"""The appliance's exception root.

Owns: `ProxyVMError` (every error the appliance raises on purpose derives from it) and
`ConfigError`, the located problems of a configuration or policy file as the CLI prints them.
Must not: print, log or exit (the CLI decides how to show an error and which exit code to use),
or carry a secret's content in any message.
"""

from __future__ import annotations

from collections.abc import Iterable

from policy.source import Problem, SourceError


class ProxyVMError(Exception):
    """Root of every error the appliance raises on purpose."""


class ConfigError(ProxyVMError, SourceError):
    """One or more located problems (`FILE:LINE:COL: message` + hint) in the config or policy.

    It is also a `policy.source.SourceError`, so code catching that keeps working. `problems`
    is ordered: configuration problems first, then policy problems, each in file order."""

    def __init__(self, problems: Problem | Iterable[Problem]):
        SourceError.__init__(self, problems)

    @classmethod
    def from_source(cls, error: SourceError) -> ConfigError:
        if isinstance(error, ConfigError):
            return error
        return cls(error.problems)

    def lines(self) -> list[str]:
        """What `proxyvm check` prints: one `FILE:LINE:COL: message` line per problem, each
        followed by its `  hint: ...` line when it has one."""
        out: list[str] = []
        for p in self.problems:
            out.extend(str(p).splitlines())
        return out
