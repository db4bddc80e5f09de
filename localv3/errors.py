"""Errors that reach the user as one line (the CLI prints the message and exits non-zero)."""


class LocalV3Error(Exception):
    """Base class: a problem the user can act on, described in one sentence."""


class ConfigError(LocalV3Error):
    """config.json is missing, unreadable, or lacks required fields."""


class CheckpointError(LocalV3Error):
    """A weight file is missing, truncated, or holds a tensor of the wrong shape or dtype."""


class ContextFullError(LocalV3Error):
    """More tokens than a session's context holds: a prompt or conversation longer than it, or
    a forward pass past the end of its cache."""


class ModelNotFoundError(LocalV3Error):
    """A model name that is neither in models.toml, the hub cache, nor a directory."""
