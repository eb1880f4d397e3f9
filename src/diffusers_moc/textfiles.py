"""Reading user-written text files within bounds: storyboards, training configs and `--set` values.

- the file size is capped before anything is parsed;
- bytes that are not UTF-8 are an error naming the file and the offset;
- YAML is read with PyYAML's safe loader plus limits: an alias bomb ("billion laughs") or a very deep document is
  rejected while it is composed, in milliseconds, before any Python object is built; a key given twice in one
  mapping is an error (PyYAML would silently keep the last one);
- values echoed in error messages go through `short_repr`, so an error never prints a huge value.
"""

from __future__ import annotations

import os
import reprlib
from typing import Any

from .errors import InputError

__all__ = ["MAX_FILE_BYTES", "MAX_YAML_NODES", "MAX_YAML_DEPTH", "read_text", "parse_yaml", "load_yaml", "short_repr"]

#: Largest storyboard / config file read (bytes). Real ones are a few kB.
MAX_FILE_BYTES = 1 << 20
#: Largest YAML document, in nodes after expanding aliases (a scalar, list or mapping is one node).
MAX_YAML_NODES = 100_000
#: Deepest nesting of lists and mappings in a YAML document.
MAX_YAML_DEPTH = 64

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def short_repr(value: Any) -> str:
    """`repr(value)`, cut short (long strings, big or nested containers), for error messages."""
    return _repr.repr(value)


def read_text(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_FILE_BYTES) -> str:
    r"""
    Read a UTF-8 text file of at most `max_bytes` bytes.

    Args:
        path (`str` or `os.PathLike`): the file.
        what (`str`): what the file is, for error messages (`"storyboard"`, `"training config"`).
        max_bytes (`int`): size limit.

    Raises:
        [`InputError`]: the file is missing, a folder, too large or not UTF-8 (the message names it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not a {what} file")
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise InputError(f"{path}: the {what} is {size} bytes, more than the {max_bytes}-byte limit")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except PermissionError:
        raise InputError(f"{path}: the {what} file is not readable (permission denied)") from None
    if len(data) > max_bytes:  # grew while being read (e.g. a pipe or a file being written)
        raise InputError(f"{path}: the {what} is more than {max_bytes} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: the {what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None


def _loader_class():
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    class BoundedSafeLoader(yaml.SafeLoader):
        """`yaml.SafeLoader` that counts nodes with aliases expanded, bounds depth and refuses duplicate keys."""

        def __init__(self, stream):
            super().__init__(stream)
            self._sizes: dict[int, int] = {}  # id(node) -> nodes under it, aliases expanded
            self._depth = 0

        def compose_document(self):
            self._sizes = {}
            return super().compose_document()

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                node = self.anchors.get(self.peek_event().anchor)
                if node is not None and id(node) not in self._sizes:
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        "found a recursive alias (an anchor used inside itself)",
                        self.peek_event().start_mark,
                    )
                return super().compose_node(parent, index)
            self._depth += 1
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark
                )
            node = super().compose_node(parent, index)
            self._depth -= 1
            if isinstance(node, ScalarNode):
                size = 1
            elif isinstance(node, SequenceNode):
                size = 1 + sum(self._sizes[id(c)] for c in node.value)
            elif isinstance(node, MappingNode):
                size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
            else:  # pragma: no cover - PyYAML has no other node kinds
                size = 1
            if size > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"the document expands to more than {MAX_YAML_NODES} values (aliases expanded); "
                    "is it an alias bomb?",
                    node.start_mark,
                )
            self._sizes[id(node)] = size
            return node

        def construct_mapping(self, node, deep=False):
            if isinstance(node, MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        key = (key_node.tag, key_node.value)
                        if key in seen:
                            raise yaml.constructor.ConstructorError(
                                None,
                                None,
                                f"key {short_repr(key_node.value)} is given twice in one mapping (first at line "
                                f"{seen[key].line + 1})",
                                key_node.start_mark,
                            )
                        seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return BoundedSafeLoader


_LOADER = None


def parse_yaml(text: str) -> Any:
    r"""
    Parse one YAML document with the bounded safe loader.

    Raises:
        `yaml.YAMLError`: on syntax errors, alias bombs, too deep documents and duplicate keys.
    """
    import yaml

    global _LOADER
    if _LOADER is None:
        _LOADER = _loader_class()
    loader = _LOADER(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise yaml.YAMLError("the document is nested too deeply") from None
    finally:
        loader.dispose()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def load_yaml(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_FILE_BYTES) -> Any:
    r"""
    Read and parse a YAML file within the bounds above.

    Raises:
        [`InputError`]: naming the file, for every reason it cannot be read or parsed.
    """
    import yaml

    text = read_text(path, what, max_bytes)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise InputError(f"{os.fspath(path)}: cannot parse the {what} as YAML: {_one_line(e)}") from None
