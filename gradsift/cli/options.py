"""Command-line options generated from a config model, so that a command, a TOML file and Python build the same
config: one option per field (nested sections flattened), the model's default as the option's default, the
field's description as its help, a Literal's values as its choices.

A command's ``Spec`` names its model, its positional arguments, the few options not named after their field
and the fields it leaves to TOML. Only the options given on the command line reach the config, over the
``--config`` file's table when there is one; the model supplies every other value, so no default is written
twice. Lists take comma-separated values or the option repeated. Fields with no flat form (optional sections,
dicts, lists of tables) are TOML-only, and so are a spec's ``exclude`` paths.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from gradsift.cli.errors import config_problem, fail
from gradsift.schemas.base import Config
from gradsift.schemas.config import DataSource
from gradsift.schemas.influence import FastSlowConfig, PairsConfig

RECORD_FIELDS: dict[type, set[str]] = {
    DataSource: {"prompt", "response", "text", "text_pair", "messages", "label", "domain", "id"},
    PairsConfig: {"chosen", "rejected", "prompt", "conversations"},
    FastSlowConfig: {"question", "answer"},
}
"""Fields that name a field of the input records, offered as ``--NAME-field``."""

SOURCE = "@source"  # first key of the options that go into the DataSource(s) a positional argument names
DRY: ContextVar[bool] = ContextVar("gradsift_cli_dry", default=False)  # build_config: return the config, run nothing
COMMANDS: dict[str, Spec] = {}  # the commands built from a config model, by name


class ConfigError(ValueError):
    """The config a command line (and its --config file) describes does not load or validate: one message."""


@dataclass(frozen=True)
class Positional:
    """A positional argument filling ``path``: ``sources`` (files: a list of DataSource), ``source`` (one file: a
    DataSource), ``value`` (a plain field) or ``variant`` (which of the model's optional sections the run fills)."""

    name: str
    path: str
    kind: Literal["sources", "source", "value", "variant"]


@dataclass
class Option:
    param: str  # python parameter name
    flag: str  # --name
    target: tuple[str, ...]  # where the value goes: a field path, (SOURCE, field), or a path in the variant section
    type: Any
    default: Any
    help: str
    panel: str | None
    many: bool
    sections: dict[str, tuple[Any, str]] = field(default_factory=dict)  # variant section -> (default, description)
    show: bool | str = True  # the default shown, where it is not ``default``

    def parameter(self) -> inspect.Parameter:
        decls = [f"{self.flag}/--no-{self.flag[2:]}"] if self.type is bool else [self.flag]
        default, show = (self.default, True) if self.show is True else (None, self.show)
        extra = {"metavar": _metavar(get_args(self.type)[0])} if self.many else {}
        info = typer.Option(*decls, help=self.help, rich_help_panel=self.panel, show_default=show, **extra)
        annotation = list[str] if self.many else self.type
        annotation = annotation | None if default is None else annotation
        annotation = Annotated[annotation, info]
        return inspect.Parameter(self.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    def value(self, given):
        if not self.many:
            return given
        return [part.strip() for item in given for part in str(item).split(",") if part.strip()]


@dataclass
class Spec:
    """How one command's arguments and options make its config model."""

    model: type[Config]
    positionals: tuple[Positional, ...] = ()
    names: dict[str, str] = field(default_factory=dict)  # dotted field path -> option name, where not its own
    exclude: tuple[str, ...] = ()  # dotted paths (with what is under them) left to TOML
    variants: dict[str, str] = field(default_factory=dict)  # variant argument -> the optional section it fills
    config_required: bool = False
    resolve: tuple[str, ...] = ()  # dotted paths whose value, given as an option, is made absolute
    extras: tuple[inspect.Parameter, ...] = ()  # plain parameters, passed on to the command as keywords
    options: list[Option] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.options = _options(self)

    def flags(self) -> dict[str, str]:
        """Dotted config location (list indexes left out) -> the option or argument that sets it."""
        out = {p.path: p.name.upper() for p in self.positionals if p.kind != "variant"}
        for o in self.options:
            if o.target[0] == SOURCE:
                out.update(
                    {f"{p.path}.{o.target[1]}": o.flag for p in self.positionals if p.kind in ("sources", "source")}
                )
            for prefix in o.sections or [""]:
                out[".".join(filter(None, (prefix, *o.target)))] = o.flag
        return out


def _unwrap(annotation) -> tuple[Any, bool]:
    """The type without None, and whether None is allowed."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(get_args(annotation))
    return annotation, False


def _scalar(tp) -> bool:
    return tp in (str, int, float, bool) or get_origin(tp) is Literal


def _metavar(tp) -> str:
    if get_origin(tp) is Literal:
        return "|".join(map(str, get_args(tp))) + ",..."
    return {int: "INT", float: "FLOAT"}.get(tp, "TEXT") + ",..."


def _panel(path: tuple[str, ...], model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().splitlines()
    return f"{'.'.join(path)}: {doc[0]}" if doc else ".".join(path)


def _field(model: type[BaseModel], dotted: str):
    *sections, name = dotted.split(".")
    for section in sections:
        model = _unwrap(model.model_fields[section].annotation)[0]
    return model.model_fields[name]


def _options(spec: Spec) -> list[Option]:
    taken = {p.path for p in spec.positionals}
    out: dict[str, Option] = {}

    def add(model, name, info, path, target, panel, section=None):
        tp, _ = _unwrap(info.annotation)
        many = get_origin(tp) is list and _scalar(get_args(tp)[0])
        if not (many or _scalar(tp)):
            return  # TOML-only
        own = f"{name}-field" if name in RECORD_FIELDS.get(model, ()) else name
        flag = "--" + spec.names.get(".".join(path), own).replace("_", "-")
        default = info.get_default(call_default_factory=True)
        if (prior := out.get(flag)) is not None:  # allowed: the same field of two variant sections
            if not (section and prior.sections and (prior.type, prior.target) == (tp, target)):
                raise TypeError(f"{spec.model.__name__}: two fields would be {flag}: {prior.target} and {target}")
            prior.sections[section] = (default, info.description)
            return
        param = "o_" + flag[2:].replace("-", "_")
        out[flag] = Option(param, flag, target, tp, default, info.description or "", panel, many)
        if section:
            out[flag].sections[section] = (default, info.description)

    def walk(model: type[BaseModel], prefix: tuple[str, ...], panel: str | None, section=None):
        for name, info in model.model_fields.items():
            path = (*prefix, name)
            dotted = ".".join(path)
            if dotted in taken or any(dotted == e or dotted.startswith(e + ".") for e in spec.exclude):
                continue
            tp, optional = _unwrap(info.annotation)
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                if not optional:
                    walk(tp, path, _panel(path, tp), section)
                elif name in spec.variants.values():
                    walk(tp, (), _panel(path, tp), name)
                continue
            add(model, name, info, (section, *path) if section else path, path, panel, section)

    walk(spec.model, (), None)
    for pos in spec.positionals:
        if pos.kind in ("sources", "source"):
            panel = f"{pos.path}: how the input's fields map onto samples"
            for name, info in DataSource.model_fields.items():
                if name != "path" and not (name == "dataset" and pos.kind == "sources"):
                    add(DataSource, name, info, (pos.path, name), (SOURCE, name), panel)
    variant = {section: name for name, section in spec.variants.items()}
    for o in out.values():
        if len(o.sections) > 1:  # the same field in every variant section: one panel, each default and description
            o.panel = " and ".join(variant[s] for s in o.sections) + ": the same field of each"
            o.help = "; ".join(f"{variant[s]}: {d.rstrip('.')}" for s, (_, d) in o.sections.items()) + "."
            if len({repr(v) for v, _ in o.sections.values()}) > 1:
                o.show = ", ".join(f"{variant[s]}: {'none' if v is None else v}" for s, (v, _) in o.sections.items())
    return list(out.values())


def _set(data: dict, keys, value) -> None:
    *sections, last = keys
    for key in sections:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[last] = value


def _get(data: dict, keys):
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _given(ctx, param: str) -> bool:
    source = ctx.get_parameter_source(param)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def make_config(spec: Spec, ctx, values: dict) -> Config:
    """The config the parsed command line ``values`` describe: the --config file's table (if any), the options
    given over it, validated by the model. Raises ConfigError."""
    config = values.get("config")
    try:
        data = spec.model.toml_data(config) if config else {}
    except (OSError, ValueError) as err:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{config}: {err.strerror if isinstance(err, OSError) and err.strerror else err}") from err
    given = [o for o in spec.options if _given(ctx, o.param)]
    fields = {o.target[1]: o.value(values[o.param]) for o in given if o.target[0] == SOURCE}
    for o in given:
        if o.target[0] != SOURCE and not o.sections:
            value = o.value(values[o.param])
            _set(data, o.target, str(Path(value).resolve()) if ".".join(o.target) in spec.resolve else value)
    for pos in spec.positionals:
        keys, value = pos.path.split("."), values.get(pos.name)
        if pos.kind == "sources":
            if value:
                _set(data, keys, [{"path": str(v), **fields} for v in value])
            elif fields and isinstance(sources := _get(data, keys), list):
                _set(data, keys, [{**s, **fields} if isinstance(s, dict) else s for s in sources])
            if not _get(data, keys):
                raise ConfigError(f"no input files: give {pos.name.upper()}... or a --config file with {pos.path}")
        elif pos.kind == "source" and (value or fields):
            current = _get(data, keys)
            source = (current if isinstance(current, dict) else {}) | ({"path": str(value)} if value else {})
            _set(data, keys, source | fields)
        elif pos.kind == "value" and value:
            _set(data, keys, str(value))
        elif pos.kind == "variant":
            section = spec.variants[value]
            for o in given:
                if o.sections and section not in o.sections:
                    others = [k for k, s in spec.variants.items() if s in o.sections]
                    raise ConfigError(f"{o.flag} applies to {' and '.join(others)} only, not to {value}")
            current = data.get(section)
            data[section] = current if isinstance(current, dict) else {}
            for o in given:
                if o.sections:
                    _set(data[section], o.target, o.value(values[o.param]))
    try:
        return spec.model.model_validate(data)
    except ValidationError as err:
        problem = config_problem(err, spec.flags())
        raise ConfigError(f"{config}: {problem}" if config else problem) from err


def _signature(spec: Spec) -> inspect.Signature:
    kinds = inspect.Parameter
    params = [kinds("ctx", kinds.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    path_help = DataSource.model_fields["path"].description
    for pos in spec.positionals:
        if pos.kind == "variant":
            fields = spec.model.model_fields
            help = "; ".join(f"{k}: {fields[s].description.rstrip('.')}" for k, s in spec.variants.items()) + "."
            info = typer.Argument(help=help, metavar=pos.name.upper(), show_default=False)
            annotation = Annotated[Literal[tuple(spec.variants)], info]
            params.append(kinds(pos.name, kinds.POSITIONAL_OR_KEYWORD, annotation=annotation))
            continue
        help = _field(spec.model, pos.path).description or ""
        if pos.kind != "value":
            help = f"{help} {path_help}"
        if not spec.config_required:
            help += " (optional with --config)"
        tp = list[str] | None if pos.kind == "sources" else str | None
        metavar = pos.name.upper() + ("..." if pos.kind == "sources" else "")
        info = typer.Argument(help=help, metavar=metavar, show_default=False)
        params.append(kinds(pos.name, kinds.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[tp, info]))
    config_help = (
        f"TOML file of the config ({spec.model.__name__}; paths in it are relative to it); the options given "
        "override it."
    )
    info = typer.Option("--config", help=config_help, show_default=False)
    required = inspect.Parameter.empty if spec.config_required else None
    params.append(kinds("config", kinds.KEYWORD_ONLY, default=required, annotation=Annotated[Path | None, info]))
    params += [o.parameter() for o in spec.options]
    params += [p.replace(kind=kinds.KEYWORD_ONLY) for p in spec.extras]
    return inspect.Signature(params)


def command(app: typer.Typer, name: str, spec: Spec, group: str = "") -> Callable:
    """Register ``run(config, **extras)`` as command ``name``, its arguments and options generated from ``spec``
    (``group``: the sub-command group ``app`` is, e.g. "scores"; COMMANDS then has "scores from-run")."""

    def register(run: Callable) -> Callable:
        def callback(ctx: typer.Context, **values):
            try:
                config = make_config(spec, ctx, values)
            except ConfigError as err:
                if DRY.get():
                    raise
                fail(str(err))
            if DRY.get():
                return config
            return run(config, **{p.name: values[p.name] for p in spec.extras})

        callback.__signature__ = _signature(spec)
        callback.__doc__, callback.__name__ = run.__doc__, run.__name__
        app.command(name)(callback)
        COMMANDS[f"{group} {name}".strip()] = spec
        return run

    return register


def build_config(app: typer.Typer, argv: list[str]) -> tuple[str, Config]:
    """The config command line ``argv`` (``[COMMAND, ARG...]``) runs, parsed as the command parses it; nothing
    runs. Raises ConfigError for a config that does not validate, typer's usage errors for bad arguments."""
    name = argv[0] if argv else ""
    if name not in COMMANDS:
        raise ValueError(f"{name!r} is not a command that makes a config: one of {', '.join(COMMANDS)}")
    token = DRY.set(True)
    try:
        group = typer.main.get_command(app)
        return name, group.main(list(argv), prog_name="gradsift", standalone_mode=False)
    finally:
        DRY.reset(token)
