"""`gradsift store check | compact | expire`: upkeep of a store's DuckLake (storage.check, storage.lake)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradsift.cli.commands import StoreOpt
from gradsift.cli.errors import console, fail, reported

store_app = typer.Typer(help="Upkeep of a store's lake: check, compact, expire old snapshots.", no_args_is_help=True)


def _existing(store: Path):
    from gradsift.storage.store import Store

    st = Store(store)
    with reported():
        st.check_layout()
        st.check_catalog()
    if not st.exists():
        fail(f"no store at {st.root}: run a flow first (gradsift demo / score / nightly)")
    return st


@store_app.command("check")
def store_check(
    store: StoreOpt = Path("store"),
    deep: Annotated[
        bool, typer.Option(help="Read every data file in full, not only its footer (reads all the data).")
    ] = False,
) -> None:
    """List every data file of the lake's current state that is missing, unreadable or does not hold the rows its
    commit recorded; exits 1 when one is."""
    from gradsift.storage.check import check_store

    st = _existing(store)
    with reported():
        problems = check_store(st, deep=deep)
    for problem in problems:
        console.print(f"broken: {problem}", highlight=False, soft_wrap=True)
    if problems:
        console.print(
            "a broken data file is part of the committed history: restore it from a backup, or move the store "
            "aside and rerun the commands that wrote it",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    console.print(f"{st.root}: every data file of the current snapshot is whole", highlight=False, soft_wrap=True)


@store_app.command("compact")
def store_compact(store: StoreOpt = Path("store")) -> None:
    """Merge the lake's small data files (one per table per night) and delete the files no snapshot reads any
    more; the current state (and every query's result) is unchanged. Takes the writer lock."""
    from gradsift.storage.lock import StoreLock

    st = _existing(store)
    with reported(), StoreLock(st, "store-compact"), st.lake() as lake:
        lake.compact()
    console.print(f"compacted {st.root}", highlight=False)


@store_app.command("expire")
def store_expire(
    store: StoreOpt = Path("store"),
    older_than: Annotated[str, typer.Option(help="Snapshots older than this go: 30d, 12h, 90d.")] = "30d",
) -> None:
    """Drop snapshots older than ``--older-than`` and the files only they read (time travel to them stops; the
    current state never changes), then compact. Takes the writer lock."""
    import re

    from gradsift.storage.lock import StoreLock

    match = re.fullmatch(r"(\d+)([dh])", older_than)
    if match is None:
        fail(f"--older-than takes <n>d or <n>h, e.g. 30d, got {older_than!r}")
    interval = f"{match[1]} {'days' if match[2] == 'd' else 'hours'}"
    st = _existing(store)
    with reported(), StoreLock(st, "store-expire"), st.lake() as lake:
        lake.compact(older_than=interval)
    console.print(f"expired snapshots older than {interval} in {st.root}", highlight=False)
