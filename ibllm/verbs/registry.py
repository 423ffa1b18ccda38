"""The verbs of ``python -m ibllm`` other than Lightning's: typed functions made into command lines.

A verb is a function with type hints and a docstring whose ``Args:`` section documents each parameter.
``@verb("name")`` registers it; :func:`run` builds its parser from the signature with jsonargparse
(``ArgumentParser.add_function_arguments``), so the help text is the docstring, and every verb accepts
``--config FILE.yaml`` (keys: the option names with underscores) and ``--print-config``.

Conventions added to jsonargparse's:

* every ``--snake_case`` option is also spelled ``--kebab-case`` (the spelling the help shows);
* a ``bool`` option given bare (``--force``) means true; ``--no-NAME`` means false;
* ``aliases`` maps more spellings to canonical tokens (``{"--llm": "--llama", "--fp32": "--bf16=false"}``);
* ``positional`` names the parameters given by position; other parameters without a default are required
  options;
* ``flat`` names dataclass parameters whose fields are top-level options (option groups shared by verbs,
  stage-0 recipes);
* a parameter named ``argv`` receives the command line as typed (for options whose order matters);
* ``rest`` names a ``list[str]`` parameter that receives the options the verb does not know (passed on);
* a verb named ``"easyvqa prepare"`` is a sub-action: ``python -m ibllm easyvqa prepare ...``.

A bad command line or config file ends with one line, ``python -m ibllm VERB: error: ...``, naming the
file and key when a config file gave the value (:mod:`ibllm.verbs.errors`), and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from ibllm.verbs.errors import CommandLineError, check_config_files, explain, report

PROG = "python -m ibllm"
BOOL_WORDS = ("true", "false", "yes", "no", "True", "False")


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help layout, keeping the line breaks of descriptions (docstrings are laid out by hand)."""


@dataclass
class Verb:
    """A registered verb: its function and how its command line maps onto the signature."""

    name: str
    function: Callable[..., Any]
    positional: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    flat: tuple[str, ...] = ()
    skip: frozenset[str] = frozenset()
    rest: str | None = None
    description: str | None = None
    epilog: str | None = None
    config_fallback: str | None = None
    program: str | None = None
    config_file: bool = True

    @property
    def prog(self) -> str:
        """The program name shown in help and errors (``python -m ibllm NAME`` unless ``program`` says)."""
        return self.program or f"{PROG} {self.name}"


REGISTRY: dict[str, Verb] = {}


def verb(name: str, *, positional: Sequence[str] = (), aliases: dict[str, str] | None = None,
         flat: Sequence[str] = (), skip: Sequence[str] = (), rest: str | None = None, description: str | None = None,
         epilog: str | None = None, config_fallback: str | None = None,
         program: str | None = None, config_file: bool = True) -> Callable[[Callable], Callable]:
    """Register the decorated function as ``python -m ibllm NAME`` (see the module docstring for the options).

    ``config_fallback``: an option that takes a ``--config`` value which is not a config file (no
    ``.yaml``/``.yml``/``.json`` suffix and no such file), for a verb whose ``--config`` once meant that.
    ``program``: the program name, for a command not run as ``python -m ibllm NAME``. ``config_file``
    False: no ``--config FILE.yaml`` (for a command whose own ``--config`` means something else).
    """
    def register(function: Callable) -> Callable:
        REGISTRY[name] = Verb(name, function, tuple(positional), dict(aliases or {}), tuple(flat), frozenset(skip),
                              rest, description, epilog, config_fallback, program, config_file)
        return function
    return register


def _hints(function: Callable) -> dict[str, Any]:
    return typing.get_type_hints(function)


def build_parser(name: str) -> ArgumentParser:
    """The jsonargparse parser of a registered verb (with the kebab-case spellings added)."""
    spec = REGISTRY[name]
    fn = spec.function
    doc = inspect.getdoc(fn) or ""
    parser = ArgumentParser(prog=spec.prog, description=spec.description or doc.split("\n\nArgs:")[0],
                            epilog=_epilog(spec), exit_on_error=False, formatter_class=HelpFormatter)
    if spec.config_file:
        parser.add_argument("--config", action=ActionConfigFile, help="YAML file of option values (keys as the "
                            "options, with underscores); later options override it")
    params = inspect.signature(fn).parameters
    hidden = set(spec.skip) | set(spec.flat) | {"argv"} | ({spec.rest} if spec.rest else set())
    named = [p for p in params if p not in hidden and p not in spec.positional]
    if spec.positional:
        parser.add_function_arguments(fn, as_positional=True, skip=set(params) - set(spec.positional),
                                      as_group=False)
    parser.add_function_arguments(fn, as_positional=False, skip=set(params) - set(named))
    hints = _hints(fn)
    for group in spec.flat:
        cls = hints[group]
        fields = {f.name for f in dataclasses.fields(cls)}
        parser.add_class_arguments(cls, nested_key=None, skip=set(spec.skip) & fields)
        default = params[group].default
        if default is not inspect.Parameter.empty and default is not None:
            parser.set_defaults({f.name: getattr(default, f.name) for f in dataclasses.fields(cls)
                                 if f.name not in spec.skip})
    _add_kebab_spellings(parser)
    return parser


def _epilog(spec: Verb) -> str | None:
    extra = [f"{alias} = {target}" for alias, target in spec.aliases.items()]
    text = "\n".join(filter(None, [spec.epilog, "also: " + "; ".join(extra) if extra else None]))
    return text or None


def _add_kebab_spellings(parser: ArgumentParser) -> None:
    for action in parser._actions:
        for option in list(action.option_strings):
            kebab = option.replace("_", "-")
            if option.startswith("--") and kebab != option and kebab not in parser._option_string_actions:
                action.option_strings.insert(0, kebab)
                parser._option_string_actions[kebab] = action


def _bool_options(parser: ArgumentParser) -> set[str]:
    names = set()
    for option, action in parser._option_string_actions.items():
        hint = getattr(action, "_typehint", None)
        if hint is bool or hint == typing.Optional[bool]:
            names.add(option)
    return names


def _list_options(parser: ArgumentParser) -> set[str]:
    names = set()
    for option, action in parser._option_string_actions.items():
        hint = getattr(action, "_typehint", None)
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(typing.get_origin(k) is list for k in kinds):
            names.add(option)
    return names


def translate(spec: Verb, parser: ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` in jsonargparse's terms: aliases replaced, bare and ``--no-`` booleans given values, the
    values of a repeated list option gathered into one JSON list, a non-file ``--config`` value given to
    ``config_fallback``. Returns ``(tokens, unknown options)``; the unknown ones are only split off for a
    verb with ``rest``."""
    known = parser._option_string_actions
    bools = _bool_options(parser)
    lists = _list_options(parser)
    gathered: dict[str, list[str]] = {}
    out: list[str] = []
    rest: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            out += tokens[i - 1:]
            break
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        if name in spec.aliases:
            target = spec.aliases[name]
            name, has_value, _ = target.partition("=")
            if has_value:
                out.append(target)
                continue
        if name == "--config" and spec.config_fallback:
            given = value if eq else (tokens[i] if i < len(tokens) else "")
            if given and not _looks_like_config(given):
                name = spec.config_fallback
        if name in bools and not eq:
            if i < len(tokens) and tokens[i] in BOOL_WORDS:
                out += [name, tokens[i]]
                i += 1
            else:
                out.append(f"{name}=true")
            continue
        if name in lists:
            if not eq and i < len(tokens):
                value = tokens[i]
                i += 1
            gathered.setdefault(known[name].option_strings[0], []).append(value)
            continue
        if name.startswith("--no-") or name.startswith("--no_"):
            positive = "--" + name[5:]
            if positive in bools and name not in known and not eq:
                out.append(f"{positive}=false")
                continue
        if name not in known and spec.rest and name not in ("--help", "-h"):
            rest.append(token)
            if not eq and i < len(tokens) and not tokens[i].startswith("--"):
                rest.append(tokens[i])
                i += 1
            continue
        out.append(f"{name}={value}" if eq else name)
    out += [f"{name}={json.dumps(values)}" for name, values in gathered.items()]
    return out, rest


def _looks_like_config(value: str) -> bool:
    return value.endswith((".yaml", ".yml", ".json")) or Path(value).is_file()


def parse(name: str, argv: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments of verb ``name``'s function for ``argv``; raises :class:`CommandLineError`."""
    spec = REGISTRY[name]
    parser = build_parser(name)
    tokens, rest = translate(spec, parser, argv)
    if spec.config_file:
        check_config_files(parser, tokens)
    try:
        namespace = parser.parse_args(tokens)
    except Exception as err:  # jsonargparse raises ArgumentError, or TypeError/ValueError from a type
        raise CommandLineError(explain(err, tokens, parser)) from None
    values = namespace.as_dict()
    for key in ("config", "print_config", "__path__") if spec.config_file else ("print_config", "__path__"):
        values.pop(key, None)
    hints = _hints(spec.function)
    for group in spec.flat:
        cls = hints[group]
        names = [f.name for f in dataclasses.fields(cls) if f.name not in spec.skip]
        base = inspect.signature(spec.function).parameters[group].default
        base = cls() if base in (None, inspect.Parameter.empty) else base
        values[group] = dataclasses.replace(base, **{n: values.pop(n) for n in names if n in values})
    params = inspect.signature(spec.function).parameters
    if "argv" in params:
        values["argv"] = list(argv)
    if spec.rest:
        values[spec.rest] = rest
    return {k: v for k, v in values.items() if k in params}


def sub_actions(name: str) -> dict[str, Verb]:
    """The registered sub-actions of ``name`` (``"easyvqa"`` -> ``{"prepare": ..., "evaluate": ...}``)."""
    prefix = name + " "
    return {key[len(prefix):]: spec for key, spec in REGISTRY.items() if key.startswith(prefix)}


def run(name: str, argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) for verb ``name`` and call its function; returns its result.

    A name with sub-actions takes the action from ``argv[0]``. Command-line errors print one line and exit 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    actions = sub_actions(name) if name not in REGISTRY else {}
    if actions:
        if argv and argv[0] in actions:
            return run(f"{name} {argv[0]}", argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            print(f"usage: {PROG} {name} {{{','.join(actions)}}} [options]\n")
            for action, spec in actions.items():
                summary = (inspect.getdoc(spec.function) or "").split("\n")[0]
                print(f"  {action:<10} {summary}")
            print(f"\n{PROG} {name} ACTION --help: the options of each action")
            raise SystemExit(0)
        report(f"{PROG} {name}", f"expected an action, one of: {', '.join(actions)}"
               + (f" (got {argv[0]!r})" if argv else ""))
    try:
        kwargs = parse(name, argv)
    except CommandLineError as err:
        report(REGISTRY[name].prog, str(err))
    return REGISTRY[name].function(**kwargs)
