"""params files read strictly: a key given twice is an error (PyYAML keeps the last one
silently), and every error says where, as one line with the line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # The mapping's own keys, before merge keys (<<) flatten their entries in.
        own = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        mapping = super().construct_mapping(node, deep=deep)  # refuses unhashable keys
        seen: set[Any] = set()
        for key_node in own:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return mapping


def load(path: Path) -> Any:
    """The YAML document in the file `path` (UTF-8), with safe types only.

    Raises:
        ValueError: `<path>: not a valid YAML file: line L, column C: <problem>` for a syntax
            error or a duplicate key; also for bytes that are not UTF-8 and integers too
            long to convert (over 4300 digits).
    """
    try:
        with path.open(encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark, context = e.problem_mark, f" ({e.context})" if e.context else ""
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{path}: not a valid YAML file: {where}{e.problem}{context}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError covers UnicodeDecodeError
        raise ValueError(f"{path}: not a valid YAML file: {e}") from None
