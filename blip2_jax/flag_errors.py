"""One-line errors for an absl command line with an ml_collections config flag (no tracebacks).

`parse_flags` is a parser for `absl.app.run(main, flags_parser=parse_flags)`: it parses the flags
as absl does, but a bad command line ends the program before any compute with one line on stderr,
`error: ...`, and exit status 2:
- a `--config.x.y=v` override naming no field of the config (ml_collections raises a bare
  `AttributeError: "'y'"` from inside flag parsing): the dotted field, and the field probably meant
  when one is close (difflib): `--config.train.total_step=3` -> "... did you mean train.total_steps?";
- an override whose value does not parse as the field's type (`--config.train.total_steps=abc`);
- a config file that does not exist or whose `get_config` raises (its last line, not its traceback);
- any other absl flag error (an unknown flag, a bad value), and a missing `--config`.
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Optional, Sequence

import ml_collections
from absl import flags

USAGE_EXIT_CODE = 2


def parse_flags(argv: Sequence[str], config_flag: str = "config",
                example: str = "configs/stage1.py:demo") -> list[str]:
    """`absl.flags.FLAGS(argv)`, exiting with one `error: ...` line on stderr when it fails (`example`:
    a config file to name when `--config` is missing)."""
    try:
        rest = flags.FLAGS(list(argv))
        config = flags.FLAGS[config_flag].value
        if config is None:
            raise flags.Error(f"--{config_flag} is required (a config file, e.g. --{config_flag}={example})")
        _touch(config)
    except (flags.Error, AttributeError, KeyError, OSError) as e:
        message = flag_error_message(argv, e, config_flag)
        if message is None:  # not a command-line mistake (e.g. a bug in get_config): keep the traceback
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT_CODE)
    return rest


def flag_error_message(argv: Sequence[str], error: BaseException,
                       config_flag: str = "config") -> Optional[str]:
    """One line saying what is wrong with the command line `argv` that raised `error`; None for an
    AttributeError or KeyError that no override in `argv` explains."""
    if _config_spec(argv, config_flag) is None and any(
            re.match(rf"^--?(no)?{re.escape(config_flag)}\.", a) for a in argv):
        return f"--{config_flag}.x=y overrides need a config file: --{config_flag}=FILE[:variant]"
    if isinstance(error, (AttributeError, KeyError)):
        return _unknown_override(argv, config_flag)
    if isinstance(error, OSError):
        return f"--{config_flag}={_config_spec(argv, config_flag)}: cannot load the config file " \
               f"({_last_line(str(error))})"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:  # a traceback inside the message (get_config raised): its first and last line
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    text = lines[0] if lines else type(error).__name__
    typed = re.match(rf"flag --(?:no)?{re.escape(config_flag)}\.([^=\s]+)=(.*?): (.*)$", text)
    if typed:
        field, value, why = typed.groups()
        config = _load_config(argv, config_flag)
        found, current = _lookup(config, field) if config is not None else (False, None)
        if found and isinstance(current, (ml_collections.ConfigDict, dict)):
            return (f"--{config_flag}.{field}={value}: {field} is a section; override its fields "
                    f"(--{config_flag}.{field}.NAME=VALUE)")
        if found and current is not None:
            now = repr(current)
            now = now if len(now) <= 60 else now[:57] + "..."
            return (f"--{config_flag}.{field}={value}: expected {type(current).__name__} for {field} "
                    f"(now {now}): {why}")
        return f"--{config_flag}.{field}={value}: {why}"
    return text.removeprefix("flag ")


def unknown_field_message(config: Any, path: str) -> Optional[str]:
    """None when `path` (dotted) names a field of `config`; else what is wrong, with a close match."""
    parts = path.split(".")
    node = config
    for i, part in enumerate(parts):
        name = ".".join(parts[:i + 1])
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"{'.'.join(parts[:i])} is a field ({type(node).__name__}), not a section: no field {name}"
        if part in node:
            node = node[part]
            continue
        message = f"no field {name} in the config"
        guess = _closest(config, parts, i, node)
        if guess:
            return f"{message}; did you mean {guess}?"
        return f"{message} (fields{' of ' + '.'.join(parts[:i]) if i else ''}: {', '.join(sorted(node))})"
    return None


# ------------------------------------------------------------------------------------------------


def _closest(config, parts: list[str], i: int, parent) -> Optional[str]:
    """The field probably meant by `parts`, whose part `i` is not a key of `parent`."""
    # a misspelt name in the right section: train.total_step -> train.total_steps
    close = difflib.get_close_matches(parts[i], list(parent.keys()), n=1, cutoff=0.75)
    if close:
        return ".".join(parts[:i] + close[0:1] + parts[i + 1:])
    # the right name in another section: total_steps, optimizer.total_steps -> train.total_steps
    paths = _paths(config)
    rest = ".".join(parts[i:])
    same = [p for p in paths if p == rest or p.endswith("." + rest)]
    if same:
        return same[0]
    close = difflib.get_close_matches(".".join(parts), paths, n=1, cutoff=0.85)
    return close[0] if close else None


def _paths(node, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys():
        out.append(prefix + key)
        if isinstance(node[key], (ml_collections.ConfigDict, dict)):
            out.extend(_paths(node[key], f"{prefix}{key}."))
    return out


def _lookup(config, path: str) -> tuple[bool, Any]:
    node = config
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _config_spec(argv: Sequence[str], config_flag: str) -> Optional[str]:
    """The value given to `--config` in `argv` (the last one), or None."""
    spec = None
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{re.escape(config_flag)}(=(.*))?$", arg)
        if m:
            spec = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return spec


def _load_config(argv: Sequence[str], config_flag: str):
    """The config `argv`'s `--config` names, without its overrides (None if it does not load)."""
    spec = _config_spec(argv, config_flag)
    if spec is None:
        return None
    try:
        config = _touch(flags.FLAGS[config_flag].parser.parse(spec))
    except Exception:  # the error being reported is about something else; report it as it is
        return None
    return config


def _unknown_override(argv: Sequence[str], config_flag: str) -> Optional[str]:
    """`--config.a.b: no field a.b ...` for the first override in `argv` naming no config field."""
    config = _load_config(argv, config_flag)
    if config is None:
        return None
    for arg in argv:
        m = re.match(rf"^--?(?:no)?{re.escape(config_flag)}\.([^=\s]+)", arg)
        if m:
            path = re.sub(r"\[[^\]]*\]", "", m.group(1))  # tuple items: a.b[0] -> a.b
            message = unknown_field_message(config, path)
            if message:
                return f"--{config_flag}.{m.group(1)}: {message}"
    return None


def _touch(config):
    """`config`; raises the OSError of a config file that did not load (ml_collections defers it to
    the config's first use)."""
    getattr(config, "keys", None)
    return config


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text
