"""Exception types shared across fastgrow (kept here so modules can raise them without import circles)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""
