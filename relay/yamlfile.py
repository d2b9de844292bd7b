"""Reading the YAML configuration with the line of every key, and `${...}` substitution.

Every error the configuration can produce names the YAML line, so the loader keeps a map from key path
to line. Substitution runs on string values after parsing (never on the YAML text), so an environment
value can never inject YAML structure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay.errors import ConfigError, ConfigIssue

Path_ = tuple[str | int, ...]

MAX_VALUES = 100_000
"""Far more keys and values than any configuration has: YAML aliases that expand exponentially (a
"billion laughs" file) are refused here instead of exhausting memory."""

__all__ = ["LoadedYaml", "dotted", "load_yaml", "read_env_file", "substitute"]


@dataclass
class LoadedYaml:
    data: Any
    file: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """Line of the key at `path`, or of its nearest enclosing key that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def issue(self, path: Path_, message: str) -> ConfigIssue:
        return ConfigIssue(dotted(path), message, self.file, self.line_of(path))


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml(text: str, file: str) -> LoadedYaml:
    """Parse one YAML document, recording the line of every key; duplicate keys are errors."""
    loaded = LoadedYaml(None, file)
    issues: list[ConfigIssue] = []
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            loaded.data = {}
            return loaded
        loaded.lines[()] = node.start_mark.line + 1
        loaded.data = _convert(loader, node, (), loaded, issues, _Budget())
    except RecursionError:
        raise ConfigError([ConfigIssue("", "invalid YAML: nested too deeply", file, loader.line + 1)]) from None
    except _TooLarge as exc:
        raise ConfigError([ConfigIssue("", f"the configuration expands to more than {MAX_VALUES:,} keys and "
                                           "values (aliases that refer to aliases?)", file, exc.line)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([ConfigIssue("", f"invalid YAML: {problem}", file, line)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"invalid YAML: {exc}", file)]) from None
    finally:
        loader.dispose()
    if issues:
        raise ConfigError(issues)
    return loaded


class _TooLarge(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _Budget:
    """Counts the nodes `_convert` visits (an alias is visited again each time it is used)."""

    def __init__(self) -> None:
        self.left = MAX_VALUES

    def spend(self, node: yaml.Node) -> None:
        self.left -= 1
        if self.left < 0:
            raise _TooLarge(node.start_mark.line + 1)


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, out: LoadedYaml,
             issues: list[ConfigIssue], budget: _Budget) -> Any:
    budget.spend(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                issues.append(ConfigIssue(dotted(path), "keys must be plain strings",
                                          out.file, key_node.start_mark.line + 1))
                continue
            key = str(key) if not isinstance(key, str) else key
            child = (*path, key)
            if key in result:
                issues.append(ConfigIssue(dotted(child), f"duplicate key (first set on line {out.lines[child]})",
                                          out.file, key_node.start_mark.line + 1))
                continue
            out.lines[child] = key_node.start_mark.line + 1
            result[key] = _convert(loader, value_node, child, out, issues, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            child = (*path, index)
            out.lines[child] = item.start_mark.line + 1
            items.append(_convert(loader, item, child, out, issues, budget))
        return items
    return loader.construct_object(node, deep=True)


_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def substitute(loaded: LoadedYaml, env: Mapping[str, str], base_dir: Path) -> list[ConfigIssue]:
    """Replace `${VAR}`, `${VAR:-default}` and `${file:PATH}` in every string value, in place.

    `$${` writes a literal `${`. Relative `${file:...}` paths resolve against `$CREDENTIALS_DIRECTORY`
    when it is set (systemd `LoadCredential=`), else against the config file's folder.
    """
    issues: list[ConfigIssue] = []
    credentials = env.get("CREDENTIALS_DIRECTORY")

    def expand(text: str, path: Path_) -> str:
        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            ref = match.group(1)
            if ref.startswith("file:"):
                name = ref[5:].strip()
                target = Path(name)
                if not target.is_absolute():
                    target = Path(credentials) / target if credentials else base_dir / target
                try:
                    return target.read_text(encoding="utf-8").rstrip("\n")
                except OSError as exc:
                    issues.append(loaded.issue(path, f"cannot read ${{file:{name}}}: {exc.strerror}"))
                    return ""
                except UnicodeDecodeError:
                    issues.append(loaded.issue(path, f"cannot read ${{file:{name}}}: it is not UTF-8 text"))
                    return ""
            name, sep, default = ref.partition(":-")
            if not _VAR_NAME.match(name):
                issues.append(loaded.issue(path, f"invalid reference ${{{ref}}} (use ${{VAR}}, "
                                                 "${VAR:-default} or ${file:PATH})"))
                return ""
            if name in env:
                return env[name]
            if sep:
                return default
            issues.append(loaded.issue(path, f"environment variable {name} is not set"))
            return ""

        return _REF.sub(one, text)

    def walk(value: Any, path: Path_) -> Any:
        if isinstance(value, str):
            return expand(value, path) if "$" in value else value
        if isinstance(value, dict):
            for key in list(value):
                value[key] = walk(value[key], (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                value[index] = walk(item, (*path, index))
        return value

    loaded.data = walk(loaded.data, ())
    return issues


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a systemd `EnvironmentFile=`: `KEY=VALUE` lines, `#`/`;` comments, optional quotes."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the environment file: {exc.strerror}", str(path))]) from None
    except UnicodeDecodeError as exc:
        at = Path(path).read_bytes().count(b"\n", 0, exc.start) + 1
        raise ConfigError([ConfigIssue("", "the environment file is not UTF-8 text", str(path), at)]) from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _VAR_NAME.match(key):
            raise ConfigError([ConfigIssue("", "expected KEY=VALUE", str(path), number)])
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values
