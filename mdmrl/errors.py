"""Errors caused by user input. The CLI prints them as one line and exits with 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a recipe, an option, a path, a missing weight file.

    The message is one line that names the file or field and what is allowed.
    """

    exit_code = 2


class ConfigError(UserError):
    """A recipe failed validation. Holds every problem found, each with its dotted path."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        head = f"{self.source}: {len(self.problems)} problem(s): "
        return head + "; ".join(self.problems)


class PluginLookupError(UserError):
    """A recipe named a part that no installed plug-in registers."""
