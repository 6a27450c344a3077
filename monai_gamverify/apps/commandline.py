"""What every ``gamverify`` command line shares: a parser whose errors are one ``ERROR:`` line with exit code 2,
deprecated flag spellings that still work but say what replaced them, and the flags of a command built from its
function's signature and Google docstring (:func:`add_function_flags`, :func:`call_command`).

Used by the one parser of :mod:`monai_gamverify.cli` and by the pass-through commands that keep a parser of their own
(``gamverify cohort`` = ``python -m monai_gamverify.apps.cohort``; a ``deploy``/``pacs`` command would do the same).

Example:
    >>> ap = CommandParser(prog="gamverify cohort")
    >>> ap.add_argument("--seg_labels", nargs="+")
    >>> add_deprecated_alias(ap, "--labels", "--seg_labels", nargs="+")
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "CommandParser",
    "DeprecatedAlias",
    "add_deprecated_alias",
    "EXIT_USAGE",
    "add_function_flags",
    "call_command",
    "command_summary",
    "docstring_parts",
    "split_unknown_flags",
    "show_result",
    "as_list",
    "json_dict",
]

#: exit code of a command-line mistake (a mistyped flag, a bad value), as argparse uses it
EXIT_USAGE = 2


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are exactly one line on stderr, ``ERROR: <prog>: <message> (see <prog>
    --help)``, and exit code 2; abbreviated flags are refused (``--out`` never silently means ``--out_dir``).

    Subparsers made with ``add_subparsers`` are of the same class, so ``gamverify screen fit --nope`` errs the same way.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print one ``ERROR:`` line and exit with code 2 (argparse's default prints the usage block too)."""
        line = " ".join(str(message).split())
        print(f"ERROR: {self.prog}: {line} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


class DeprecatedAlias(argparse.Action):
    """An old flag spelling: stores into the new flag's destination and warns once on stderr that it is deprecated.

    Args:
        option_strings: the old spelling(s).
        dest: the new flag's destination.
        new: the new spelling, named in the warning.
        kwargs: the rest of ``add_argument``'s keywords (``nargs``, ``type``, ...).
    """

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(
            f"WARNING: {option} is deprecated and will be removed; use {self.new} (same values)",
            file=sys.stderr,
            flush=True,
        )
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> argparse.Action:
    """Let ``old`` keep working as ``new`` (same destination), with a warning; listed in ``--help`` as deprecated.

    Args:
        parser: the parser that defines ``new``.
        old: the deprecated spelling, e.g. ``"--labels"``.
        new: the current spelling, e.g. ``"--seg_labels"``.
        kwargs: ``add_argument`` keywords of the old flag (``nargs``, ``type``).

    Returns:
        The added action.
    """
    dest = new.lstrip("-").replace("-", "_")
    kwargs.setdefault("default", argparse.SUPPRESS)  # the new flag sets the default
    return parser.add_argument(old, action=DeprecatedAlias, dest=dest, new=new, help=f"deprecated: use {new}", **kwargs)


def as_list(value: Any) -> list[str]:
    """A path, a comma-separated string, the ``[a, b]`` form of unquoted paths, or a list: the items as strings."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [p.strip().strip("'\"") for p in text.split(",") if p.strip()]


_SECTION = re.compile(r"^(Args|Arguments|Returns|Yields|Raises|Example|Examples|Note|Notes|Warning):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\w+)*)\s*(?:\([^)]*\))?:\s*(.*)$")
_ROLE = re.compile(r":\w+:`(~?)([^`]+)`")


def _plain_text(text: str) -> str:
    """Docstring markup as a terminal shows it: ``x`` -> x, :func:`~a.b` -> b; ``%`` escaped for argparse."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "").replace("%", "%%")


def docstring_parts(func: Callable[..., Any]) -> tuple[str, dict[str, str], str]:
    """(description, {parameter: help}, examples) of a Google-style docstring."""
    lines = (inspect.getdoc(func) or "").splitlines()
    desc: list[str] = []
    args: dict[str, str] = {}
    example: list[str] = []
    section, current = None, None
    for line in lines:
        head = _SECTION.match(line)
        if head:
            section, current = head.group(1), None
            continue
        if section is None:
            desc.append(line)
        elif section in ("Args", "Arguments"):
            entry = _ENTRY.match(line[4:]) if line.startswith("    ") and not line.startswith("     ") else None
            if entry:
                names = [n.strip().lstrip("*") for n in entry.group(1).split(",")]
                current = names
                for n in names:
                    args[n] = entry.group(2).strip()
            elif current and line.strip():
                for n in current:
                    args[n] += " " + line.strip()
        elif section in ("Example", "Examples"):
            example.append(line)
    description = _plain_text("\n".join(desc).strip())
    epilog = ("examples:\n" + "\n".join(example).rstrip()) if any(x.strip() for x in example) else ""
    return description, {k: _plain_text(v) for k, v in args.items()}, epilog.replace("%", "%%")


def _annotation_kind(annotation: Any) -> str:
    """``bool``, ``int``, ``float``, ``int_or_str``, ``str``, ``list``, ``dict`` or ``any`` for an annotation (a string
    under ``from __future__ import annotations``)."""
    if annotation is inspect.Parameter.empty:
        return "any"
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {re.sub(r"\[.*", "", t.strip()).split(".")[-1] for t in text.split("|")} - {"None"}
    if "bool" in parts:
        return "bool"
    if parts & {"dict", "Mapping"}:
        return "dict"
    if parts & {"list", "Sequence", "tuple"}:
        return "list"
    if {"int", "str"} <= parts:
        return "int_or_str"
    for kind in ("int", "float", "str"):
        if kind in parts:
            return kind
    return "any"


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_or_str(text: str) -> int | str:
    """An output channel (integer) or a name."""
    try:
        return int(text)
    except ValueError:
        return text


def json_dict(text: str, flag: str = "the value") -> dict:
    """A dict from a JSON object, a Python dict literal (``{'a': 1}``, as python-fire read it) or the path of a JSON
    file holding an object; a ``ValueError`` naming the flag and JSON's complaint otherwise."""
    source = text
    if not text.lstrip().startswith("{") and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{flag} is not valid JSON ({err.msg} at character {err.pos}): {source!r}; "
                             """write an object with double quotes, e.g. '{"key": 1}'""") from None  # fmt: skip
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object {{...}}, got {type(value).__name__}: {source!r}")
    return value


def _dict_type(flag: str) -> Callable[[str], dict]:
    def convert(text: str) -> dict:
        try:
            return json_dict(text, "the value")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _literal(text: str) -> Any:
    """A value of a parameter without a type: JSON (or a Python literal) for ``{...}``/``[...]``, an int or float when
    it reads as one, else the string."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            try:
                return ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                if stripped.startswith("{"):
                    message = f"not valid JSON ({err.msg} at character {err.pos}): {text!r}"
                    raise argparse.ArgumentTypeError(message) from None
    for convert in (int, float):
        try:
            return convert(stripped)
        except ValueError:
            pass
    return text


def _list_values(values: Sequence[str] | str | None) -> list[Any] | None:
    """The items of a list flag: space-separated values, each also read in the ``'[a, b]'`` or ``a,b`` form (a JSON
    list such as ``'[[0, 10], [5, 20]]'`` is kept as parsed)."""
    if values is None:
        return None
    out: list[Any] = []
    for value in [values] if isinstance(values, str) else values:
        text = str(value).strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                out.extend(parsed)
                continue
        out.extend(as_list(text))
    return out


def _flag_help(doc: str, default: Any, kind: str) -> str:
    text = doc or ""
    if kind == "list" and "space-separated" not in text:
        text += " (space-separated)"
    if default not in (None, inspect.Parameter.empty, (), [], ""):
        shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        text += f" (default: {shown})".replace("%", "%%")
    return text.strip() or " "


def add_function_flags(
    parser: argparse.ArgumentParser, name: str, func: Callable[..., Any], also_positional: Sequence[str] = ()
) -> None:
    """The flags of ``func``'s keyword parameters on ``parser``; positional ones also without their flag."""
    description, docs, epilog = docstring_parts(func)
    parser.description = description
    parser.epilog = epilog or None
    params = list(inspect.signature(func).parameters.values())
    positional = [
        p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    positional += [n for n in also_positional if n not in positional]
    specs = []
    for param in params:
        if param.kind is param.VAR_KEYWORD:
            parser.set_defaults(_extra=True)
            extra = docs.get(param.name) or f"passed on to {name}"
            parser.epilog = ((parser.epilog or "") + f"\n\nfurther --key value options: {extra}").strip()
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        kind = _annotation_kind(param.annotation)
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        help_text = _flag_help(docs.get(param.name, ""), default, kind)
        flag = f"--{param.name}"
        options: dict[str, Any] = {"dest": param.name, "default": default, "help": help_text}
        if kind == "bool":
            options.update(nargs="?", const=True, type=_bool, metavar="true|false")
        elif kind == "list":
            options.update(nargs="+", metavar=param.name.upper())
        elif kind == "dict":
            options.update(type=_dict_type(flag), metavar="JSON")
        elif kind == "int_or_str":
            options.update(type=_int_or_str)
        elif kind in ("int", "float"):
            options.update(type={"int": int, "float": float}[kind])
        elif kind == "any":
            options.update(type=_literal)
        if param.name in positional:
            options["help"] = help_text + f" (or give {param.name.upper()} without the flag)"
            parser.add_argument(
                f"_pos_{param.name}",
                nargs="*" if kind == "list" else "?",
                metavar=param.name.upper(),
                type=options.get("type"),
                default=None,
                help=f"same as --{param.name}",
            )
        parser.add_argument(flag, **options)
        specs.append((param.name, kind, required, param.name in positional))
    parser.set_defaults(_func=func, _specs=specs, _parser=parser)


def command_summary(func: Callable[..., Any]) -> str:
    """The first sentence of a command's description (its line in ``gamverify --help``)."""
    first = docstring_parts(func)[0].split("\n\n")[0].replace("\n", " ")
    sentence = re.split(r"(?<=[.?!])\s", first, maxsplit=1)[0]
    return textwrap.shorten(sentence, 110, placeholder=" ...")


def split_unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> tuple[list[str], list[str]]:
    """For a command that takes ``**kwargs``: (its own arguments, the ``--key value`` pairs it does not define), so
    that an unknown flag's value is never taken for a positional argument."""
    commands = parser.get_default("_commands")
    cmd = commands.get(tuple(args[:2])) or commands.get(tuple(args[:1]))
    if cmd is None or not cmd.get_default("_extra"):
        return args, []
    known = {o for action in cmd._actions for o in action.option_strings}
    own, extra, i = [], [], 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and token.split("=", 1)[0] not in known:
            takes_value = "=" not in token and i + 1 < len(args) and not args[i + 1].startswith("--")
            extra += args[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            own.append(token)
            i += 1
    return own, extra


def call_command(ns: argparse.Namespace, extra: list[str]) -> Any:
    """Call the chosen command with the parsed flags (``extra``: ``--key value`` pairs of a ``**kwargs`` command)."""
    parser: argparse.ArgumentParser = ns._parser
    func = getattr(ns, "_func", None)
    if func is None:  # "gamverify screen" alone
        parser.error("choose a command")
    if extra and not getattr(ns, "_extra", False):
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        close = [m for x in extra if x.startswith("--") for m in difflib.get_close_matches(x.split("=")[0], flags, 1)]
        parser.error(
            f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    kwargs: dict[str, Any] = {}
    for name, kind, required, positional in ns._specs:
        value = getattr(ns, name)
        if positional:
            pos = getattr(ns, f"_pos_{name}")
            if pos not in (None, []):
                if value is not None:
                    parser.error(f"{name} given twice: {pos!r} and --{name} {value!r}")
                value = pos
        if required and value is None:
            parser.error(f"missing {name.upper()} (give it, or --{name} VALUE)")
        if kind == "list":
            value = _list_values(value)
        kwargs[name] = value
    if extra:
        i = 0
        while i < len(extra):
            key = extra[i]
            if not key.startswith("--") or len(key) < 3:
                parser.error(f"unrecognized argument: {key}")
            key, _, inline = key[2:].partition("=")
            if inline or (i + 1 < len(extra) and not extra[i + 1].startswith("--")):
                raw = inline or extra[i + 1]
                i += 1 if inline else 2
                try:
                    kwargs[key] = _literal(raw)
                except argparse.ArgumentTypeError as err:
                    parser.error(f"argument --{key}: {err}")
            else:
                kwargs[key], i = True, i + 1
    return func(**kwargs)


def show_result(result: Any) -> None:
    """Print what a command returned: a string as is, a dict or list as JSON, nothing for ``None``."""
    if result is None:
        return
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)
