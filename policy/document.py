"""Reading a policy file: YAML with line numbers kept, so every error names its line."""

from __future__ import annotations

from pathlib import Path

import yaml


class PolicyError(ValueError):
    """One or more problems, each 'FILE:LINE: message'."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class LineDict(dict):
    line: int = 0
    key_lines: dict | None = None  # key -> the line the key itself is on

    def line_of(self, key) -> int:
        """The line of `key` (where a problem with its value is reported), else the mapping's."""
        return (self.key_lines or {}).get(key, self.line)


class LineList(list):
    line: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    d = LineDict(loader.construct_mapping(node, deep=True))
    d.line = node.start_mark.line + 1
    d.key_lines = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            d.key_lines.setdefault(loader.construct_object(key_node), key_node.start_mark.line + 1)
    return d


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    seq = LineList(loader.construct_sequence(node, deep=True))
    seq.line = node.start_mark.line + 1
    return seq


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def read_text(path: Path | str) -> str:
    """A policy file's text (UTF-8, as YAML 1.2 §5.2 allows); PolicyError naming the line when
    the file cannot be read or is not UTF-8, never an OSError or UnicodeDecodeError."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError([f"{name}: cannot read: {e.strerror}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PolicyError([f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                           "save the policy as UTF-8"]) from None


def read(path: Path | str, text: str | None = None) -> LineDict:
    name = str(path)
    if text is None:
        text = read_text(path)
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 0
        raise PolicyError([f"{name}:{line}: not valid YAML: {e.problem}"]) from None
    if doc is None:
        doc = LineDict()
    if not isinstance(doc, dict):
        raise PolicyError([f"{name}:1: the top level must be a mapping (agents, targets, rules, default)"])
    return doc
