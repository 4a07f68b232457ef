"""Safe YAML for every file this project reads, plus the one Python tag real files carry.

The original release's training code saves `output_path` as
`!!python/object/apply:pathlib.PosixPath [/, home, ...]` (its config dataclass types it as a
Path and the YAML is written with PyYAML's full dumper). `yaml.safe_load` refuses any Python
tag; this loader maps exactly the pathlib ones to the joined path string and still refuses
every other tag, so a downloaded folder can never construct arbitrary Python objects.
"""

from __future__ import annotations

import os

import yaml

PATH_TAGS = tuple(f"tag:yaml.org,2002:python/object/apply:pathlib.{name}"
                  for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath",
                               "Path"))


class _Loader(yaml.SafeLoader):
    """SafeLoader + pathlib tags as plain strings."""


def _path_as_str(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        parts = [str(p) for p in loader.construct_sequence(node)]
        return os.path.join(*parts) if parts else "."
    return str(loader.construct_scalar(node))


for _tag in PATH_TAGS:
    _Loader.add_constructor(_tag, _path_as_str)


def safe_load(text: str):
    """yaml.safe_load, except that pathlib Path tags load as path strings."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def error_line(e: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: what and where (line, column are 1-based)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where}{what}"
