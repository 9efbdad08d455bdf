"""The error every configuration problem raises, and the reporter validators receive."""

from __future__ import annotations

from collections.abc import Callable


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# ``fail(key, message)`` raises a ConfigError naming the file and the key (never returns).
Fail = Callable[[str, str], None]
