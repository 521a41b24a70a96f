"""Imports every module that registers `flora` sub-commands (see `flora.cli.command`)."""

from flora import (
    cli_core,  # noqa: F401
    cli_data,  # noqa: F401
    cli_train,  # noqa: F401
)
