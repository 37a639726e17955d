"""How the command line reports a failure: an ``error:`` line and exit code 2 for what the user can act on."""

from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # a path in it stays whole
    raise typer.Exit(2)


def failure(err: BaseException) -> tuple[BaseException, str]:
    """The real error behind a failed run and its message: a Ray task's error is its cause; an OSError reads
    ``path: reason``."""
    from gradsift.flows.retry import root_cause

    err = root_cause(err)
    if isinstance(err, OSError) and err.strerror:
        return err, f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return err, str(err)


@contextmanager
def reported():
    """Inside: a failure the user can act on (a bad model folder or config, an unreadable input, a locked
    store, a store of the old layout, an OSError such as a full disk; also when a Ray task raised it) is an ``error:`` line and exit 2;
    any other failure keeps its traceback."""
    from gradsift.data.ingest import IngestError
    from gradsift.storage.lock import StoreLocked
    from gradsift.storage.store import OldLayoutError

    try:
        yield
    except Exception as err:
        cause, message = failure(err)
        if not isinstance(
            cause, ValueError | OSError | IngestError | StoreLocked | OldLayoutError
        ):  # ModelFolderError: ValueError
            raise
        fail(message)


def config_problem(err: ValueError, flags: dict[str, str] | None = None) -> str:
    """A config error as one line per field ("score.engine.typo: Extra inputs are not permitted"), naming the
    option that sets the field where ``flags`` (dotted location -> option) has one."""
    from pydantic import ValidationError

    if not isinstance(err, ValidationError):
        return str(err)
    flags = flags or {}
    lines = [f"invalid configuration ({err.error_count()} problem{'s' if err.error_count() > 1 else ''}):"]
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(top level)"
        flag = flags.get(".".join(str(part) for part in e["loc"] if not isinstance(part, int)))
        given = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r:.60})"
        lines.append(f"  {where}{f' ({flag})' if flag else ''}: {e['msg'].removeprefix('Value error, ')}{given}")
    return "\n".join(lines)
