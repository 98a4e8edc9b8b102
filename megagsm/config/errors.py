"""The one exception type config loading and validation raise."""
from __future__ import annotations

from megagsm.errors import UserError


class ConfigError(UserError):
    """A bad config value, key or file. The message is one line and names the dotted field or file."""
