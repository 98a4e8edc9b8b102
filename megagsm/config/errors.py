"""The one exception type config loading and validation raise."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, key or file. The message is one line and names the dotted field or file."""
