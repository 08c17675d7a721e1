"""The one YAML loader for cloakbeam's own documents: policies, config files and role policies.

PyYAML's `safe_load` builds no objects, but it still expands aliases (a few hundred bytes of `&a [*a, *a, ...]`
become gigabytes once something walks the result), lets a repeated key silently replace the first one
(`income: keep` then `income: drop` gives `drop`), and recurses once per nesting level. `load_yaml` refuses all
of that with a sentence naming the document and the line:

- anchors and aliases (`&name`, `*name`, and so merge keys `<<: *name`): a policy is short, write it out;
- a key repeated in one mapping, at any depth;
- a document larger than `limits.MAX_YAML_BYTES` or nested deeper than `limits.MAX_YAML_DEPTH`;
- more than one document in the stream.

Messages name keys and lines, never a scalar value (a config file could hold something sensitive).
"""

from __future__ import annotations

from typing import Any

import yaml

from cloakbeam.core.limits import MAX_YAML_BYTES, MAX_YAML_DEPTH
from cloakbeam.errors import ConfigError


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _line(node_or_event: Any) -> int:
    mark = getattr(node_or_event, "start_mark", None)
    return mark.line + 1 if mark is not None else 0


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases, duplicate keys and deep nesting while composing."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"uses an alias (*{event.anchor}) at line {_line(event)}; aliases and anchors are not allowed, write the value out")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(f"defines an anchor (&{anchor}) at line {_line(event)}; aliases and anchors are not allowed, write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"is nested more than {MAX_YAML_DEPTH} levels deep at line {_line(event)}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise _Refused(f"has a mapping key that is not a plain value at line {_line(key_node)}") from None
                if key in seen:
                    raise _Refused(f"repeats the key '{key}' at line {_line(key_node)} (first at line {seen[key]}); each key may appear once per mapping")
                seen[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes, source: str, *, what: str = "YAML file", error: type[ConfigError] = ConfigError, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse one YAML document strictly; raise `error` with a sentence naming `what`, `source` and the line."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > max_bytes:
        raise error(f"{what} {source} is {size:,} bytes, over the {max_bytes:,}-byte limit for cloakbeam documents")
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader checks for unprintable characters right here
        if not loader.check_node():
            return None
        node = loader.get_node()
        if loader.check_node():
            raise _Refused(f"holds more than one YAML document (second at line {_line(loader.peek_event())})")
        return loader.construct_document(node)
    except _Refused as exc:
        raise error(f"{what} {source} {exc.message}") from None
    except yaml.reader.ReaderError as exc:
        raise error(f"{what} {source} holds a character YAML does not allow (a control character) at character offset {exc.position}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{what} {source} is not valid YAML{where}") from None
    except RecursionError:
        raise error(f"{what} {source} is nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: Any, *, what: str = "YAML file", error: type[ConfigError] = ConfigError, max_bytes: int = MAX_YAML_BYTES) -> tuple[str, Any]:
    """(text, parsed document) of a YAML file, reading at most `max_bytes` + 1 bytes of it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path} is over the {max_bytes:,}-byte limit for cloakbeam documents")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte offset {exc.start})") from None
    return text, load_yaml(text, str(path), what=what, error=error, max_bytes=max_bytes)
