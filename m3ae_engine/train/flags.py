"""Command-line helpers shared by train.py's parser: typed values from dataclass annotations, on/off flags,
negative numbers, "did you mean" suggestions and one-line errors for broken YAML/JSON files."""
from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Callable, Iterable, List

from ..model.config import ConfigError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(s: str) -> bool:
    if s.lower() in TRUE:
        return True
    if s.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _none_or(fn):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else fn(s)
    parse.__name__ = fn.__name__  # argparse says "invalid int value"
    return parse


def _float_tuple(s: str):
    return tuple(float(v) for v in s.replace("(", "").replace(")", "").split(",") if v.strip())


def _yaml_value(s: str):
    import yaml
    return yaml.safe_load(s)


def parser_for(type_name: str) -> Callable[[str], object]:
    """str -> value for a dataclass field annotated `type_name` (a string: the modules use postponed
    annotations). Unknown annotations read the text as a YAML value, so a field added later still works."""
    t = type_name.replace("typing.", "").replace(" ", "")
    simple = {"int": int, "float": float, "str": str, "bool": parse_bool}
    if t in simple:
        return simple[t]
    if t.startswith("Optional[") and t[9:-1] in simple:
        inner = t[9:-1]
        return str if inner == "str" else _none_or(simple[inner])
    if t.startswith(("Tuple[float", "tuple[float")):
        return _float_tuple
    return _yaml_value


def is_bool(type_name: str) -> bool:
    return type_name.replace(" ", "") == "bool"


def check_type(name: str, value, type_name: str) -> None:
    """A one-line ConfigError when a value (from a file or a constructor) has the wrong basic type."""
    t = type_name.replace("typing.", "").replace(" ", "")
    optional = t.startswith("Optional[")
    if optional:
        if value is None:
            return
        t = t[9:-1]
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}.get(t)
    if ok is not None and not ok(value):
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[t]
        raise ConfigError(f"{name} must be {want}{' or null' if optional else ''}, got {value!r}")


def coerce(name: str, value, type_name: str):
    """A file value written as text ('1e-3': YAML 1.1 reads it as a string) gets the field's type; an int for
    a float field becomes a float. A value that does not convert is reported with the field's name."""
    t = type_name.replace(" ", "")
    if isinstance(value, str) and t not in ("str", "Optional[str]"):
        try:
            return parser_for(type_name)(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"{name}: expected {type_name}, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and t in ("float", "Optional[float]"):
        return float(value)
    if isinstance(value, list) and t.startswith(("Tuple", "tuple")):
        return tuple(value)
    return value


def unknown_key_error(key: str, valid: Iterable[str], where: str, flag: bool = False) -> ConfigError:
    """'unknown option X in FILE; did you mean Y?' (difflib) instead of a list of every valid key."""
    valid = sorted(valid)
    shown = key.lstrip("-").replace("-", "_")
    match = difflib.get_close_matches(shown, valid, n=1, cutoff=0.6)
    spell = (lambda k: "--" + k.replace("_", "-")) if flag else (lambda k: k)
    hint = f"; did you mean {spell(match[0])}?" if match else "; `python train.py --help` lists the options"
    return ConfigError(f"unknown option {key if flag else shown!r}{where}{hint}")


def join_negative_values(argv: List[str]) -> List[str]:
    """['--base-lr', '-1e-3'] -> ['--base-lr=-1e-3']: argparse takes '-1e-3' (not '-1' or '-0.5') for a flag."""
    out: List[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if prev.startswith("--") and "=" not in prev and tok.startswith("-") and _is_number(tok):
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_mapping(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON file holding a mapping; a syntax error is one line naming file, line and
    column (1-based)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ConfigError(f"{where}: invalid YAML: {' '.join(what.split())}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(d).__name__}")
    return d


class BoolFlag(argparse.Action):
    """--x / --no-x. `--x true|false` (an explicit value) is still accepted for scripts written that way."""

    def __init__(self, option_strings, dest, default=None, help=None, **kw):
        name = option_strings[0][2:]
        super().__init__(option_strings + [f"--no-{name}"], dest, nargs="?", default=default, help=help,
                         metavar="BOOL")

    def __call__(self, parser, namespace, value, option_string=None):
        negative = option_string.startswith("--no-")
        if value is None:
            setattr(namespace, self.dest, not negative)
            return
        if negative:
            parser.error(f"{option_string} takes no value")
        try:
            setattr(namespace, self.dest, parse_bool(value))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")


class HelpFormatter(argparse.HelpFormatter):
    """Shows an on/off flag as `--x, --no-x` (not `--x [BOOL]`)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=110)

    def _format_action_invocation(self, action):
        if isinstance(action, BoolFlag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


class ErrorParser(argparse.ArgumentParser):
    """argparse errors become ConfigError: the caller prints one line (once, on rank 0)."""

    def error(self, message):
        raise ConfigError(message)
