"""The gradsift command line: few, stable commands. Run `gradsift COMMAND --help` for each.

Each command that makes a run takes one config model (gradsift.schemas) and its options are generated from
it (gradsift.cli.options); ``build_config(argv)`` gives the config a command line runs, without running it."""

from gradsift.env import configure_environment

configure_environment()  # before prefect or ray is imported anywhere

from gradsift.cli.commands import app, build_config  # noqa: E402

__all__ = ["app", "build_config"]
