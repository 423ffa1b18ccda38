"""Command-line and config-file errors as one line: which file, which key, what was expected.

jsonargparse reports a bad value as ``Parser key "steps":\\n  Expected a <class 'int'>. Got value: x``
after a usage dump, and a YAML syntax error as ``in "<unicode string>", line 6``. The verbs (and
``fit``/``validate``/...) print instead, as the first and only line::

    python -m ibllm bind: error: experiments/stage0_digits.yaml: key "steps": expected int, got 'x'
    python -m ibllm fit: error: exp.yaml, line 6, column 3: mapping values are not allowed here
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml


class CommandLineError(ValueError):
    """A bad option or config file; its message is one line meant for the user."""


def report(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` (one line) to stderr and exit with status 2."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def config_paths(tokens: Sequence[str], options: Sequence[str] = ("--config",)) -> list[str]:
    """The files given with ``--config FILE`` / ``--config=FILE`` (or another of ``options``) in ``tokens``."""
    paths = []
    for i, token in enumerate(tokens):
        name, eq, value = token.partition("=")
        if name in options and eq:
            paths.append(value)
        elif token in options and i + 1 < len(tokens):
            paths.append(tokens[i + 1])
    return paths


def read_config(path: str) -> Any:
    """The YAML document in ``path``; a missing file or a syntax error raises :class:`CommandLineError`
    naming the file (and the line and column of the syntax error)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandLineError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CommandLineError(f"--config {path}: cannot read it ({err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CommandLineError(yaml_error_line(path, err)) from None


def yaml_error_line(path: str, err: yaml.YAMLError) -> str:
    """``FILE, line L, column C: PROBLEM`` for a YAML syntax error (lines counted from 1)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def option_keys(parser: Any) -> set[str]:
    """The keys a config file of ``parser`` may hold (the options' destinations)."""
    return {a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config", "print_shtab")}


def check_config_files(parser: Any, tokens: Sequence[str]) -> None:
    """Read every ``--config`` file in ``tokens``: a syntax error, a document that is not a mapping or a key
    the verb does not have raises :class:`CommandLineError` naming the file."""
    keys = option_keys(parser)
    for path in config_paths(tokens):
        data = read_config(path)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise CommandLineError(f"{path}: expected a mapping of option names to values, "
                                   f"got {type(data).__name__}")
        unknown = [str(k) for k in data if str(k) not in keys]
        if unknown:
            raise CommandLineError(f"{path}: key {unknown[0]!r} is not an option of {parser.prog} "
                                   f"(options: {', '.join(sorted(keys))})")


MISSING = object()


def find_key(data: Any, dotted: str) -> Any:
    """The value at ``dotted`` (``"trainer.max_steps"``) in the nested mapping ``data``, else :data:`MISSING`."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return MISSING
        data = data[part]
    return data


def _source(key: str, tokens: Sequence[str], got: str | None = None) -> str | None:
    """The config file that gave ``key`` (the last one holding it; with ``got``, the one holding that
    value), or None when the command line gave it."""
    found, given = None, False
    for path in config_paths(tokens, ("--config", "-c")):
        try:
            value = find_key(read_config(path), key)
        except CommandLineError:
            continue
        if value is not MISSING and (got is None or str(value) == got):
            found, given = path, True
    flags = {f"--{key}", f"--{key.replace('_', '-')}"}
    on_command_line = any(t.split("=", 1)[0] in flags for t in tokens)
    return found if given and (got is not None or not on_command_line) else None


def _expected(text: str) -> str:
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"typing\.Literal\[(.*?)\]", r"one of \1", text)
    text = re.sub(r"(?:typing\.)?Optional\[(\w+)\]", r"\1 or null", text)
    return text


def _spelling(name: str, parser: Any, kebab: bool = True) -> str:
    """How the user writes option or positional ``name``: ``--kebab-case`` (``--as_is`` without ``kebab``)
    or ``NAME``."""
    options = {a.dest: a for a in parser._actions} if parser is not None else {}
    action = options.get(name)
    if action is not None and not action.option_strings:
        return name.upper()
    return f"--{name.replace('_', '-')}" if kebab else f"--{name}"


def check_yaml_files(tokens: Sequence[str]) -> None:
    """Read every config file (``--config``/``-c``) in ``tokens``: a missing file or a YAML syntax error
    raises :class:`CommandLineError` naming the file (and line)."""
    for path in config_paths(tokens, ("--config", "-c")):
        read_config(path)


def explain(err: BaseException, tokens: Sequence[str], parser: Any = None, kebab: bool = True) -> str:
    """One line for a jsonargparse error: the file that gave the value (if a config file did), the key and
    what was expected. ``kebab``: options are spelled with hyphens (the verbs; not Lightning's)."""
    message = str(err).strip()
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if m:
        # a class given by class_path nests its own errors: model -> init_args -> lr
        keys = re.findall(r'Parser key "([^"]+)"', message)
        key = ".init_args.".join(keys) if "class_path" in message else keys[0]
        value = re.search(r"Expected an? (.+?)\. Got value: (.*)", message)  # one line: the innermost
        got = None
        if value:
            got = value.group(2).strip().splitlines()[0]
            detail = f"expected {_expected(value.group(1))}, got {got!r}"
        else:
            detail = " ".join(m.group(2).split())
        source = _source(key, tokens, got)
        where = f"{source}: key {key!r}" if source else _spelling(key, parser, kebab)
        return f"{where}: {detail}"
    m = re.search(r"does not accept option '([^']+)'|Option '([^']+)' is not accepted", message)
    if m:
        key = m.group(1) or m.group(2)
        source = _source(key, tokens)
        where = f"{source}: key {key!r}" if source else _spelling(key, parser, kebab)
        return f"{where}: no such option"
    m = re.match(r'Key "([^"]+)" is required', message)
    if m:
        return f"{_spelling(m.group(1), parser, kebab)} is required"
    m = re.match(r"the following arguments are required: (.*)", message)
    if m:
        names = [_spelling(n.strip(), parser, kebab) for n in m.group(1).split(",")]
        return f"missing {', '.join(names)} (required)"
    m = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if m:
        return f"unrecognized arguments: {' '.join(m.group(1).split())}"
    return " ".join(message.split())
