"""Run as a Prefect flow or run the same stages directly: the one place that policy lives.

A command runs its stages directly (no Prefect imported, no temporary Prefect server started) unless a Prefect
server is configured (``PREFECT_API_URL``) or the user asks (``--prefect``); then it runs as the Prefect flow,
which is what the nightly deployment always runs. A stage (``stage``) is a Prefect task with its retries inside
a flow run and a plain call outside one, so the two paths run the same code.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


def use_prefect(asked: bool = False) -> bool:
    """Whether a command runs as its Prefect flow: a server is configured (PREFECT_API_URL) or the user asked."""
    return asked or bool(os.environ.get("PREFECT_API_URL"))


def in_flow_run() -> bool:
    """Whether the caller runs inside a Prefect flow run (prefect imported and a flow run context present)."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def stage(name: str, **options: Any) -> Callable[[Callable], Callable]:
    """A stage function that runs as the Prefect task ``name`` (with ``options``: retries, retry_condition_fn,
    and no result caching) inside a flow run, and as a plain call outside one. ``.fn`` is the plain function."""

    def wrap(fn: Callable) -> Callable:
        @functools.cache
        def as_task():
            from prefect import task
            from prefect.cache_policies import NO_CACHE

            return task(name=name, cache_policy=NO_CACHE, **options)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return as_task()(*args, **kwargs) if in_flow_run() else fn(*args, **kwargs)

        call.fn = fn
        return call

    return wrap


def markdown_artifact(markdown: str, key: str) -> None:
    """Publish ``markdown`` as the Prefect artifact ``key`` inside a flow run; a direct run has no UI to publish to."""
    if in_flow_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=key)


def lazy_flows(namespace: dict, flows: dict[str, tuple[str, Callable]]) -> Callable[[str], Callable]:
    """A module ``__getattr__`` that builds the module's flows (``attr -> (flow name, run function)``) on first
    use and stores each in ``namespace`` (the module's globals), so that prefect is imported only by code that
    uses a flow."""

    def flow_attr(attr: str) -> Callable:
        if attr not in flows:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {attr!r}")
        from prefect import flow

        flow_name, fn = flows[attr]
        namespace[attr] = built = flow(name=flow_name, log_prints=True)(fn)
        return built

    return flow_attr


def flow_or_direct(module: str, attr: str, fn: Callable, config: Any, asked: bool = False) -> Any:
    """``fn(config)`` directly, or the flow ``attr`` of ``module`` (built on first use) where ``use_prefect``."""
    if not use_prefect(asked):
        return fn(config)
    return getattr(sys.modules[module], attr)(config)
