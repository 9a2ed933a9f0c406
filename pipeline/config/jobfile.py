"""Job files as a person writes them: YAML read so that label lists keep the words typed, and validation errors
written back as one line per problem naming the key.

YAML 1.1 reads unquoted yes/no, on/off, true/false as booleans and digits as numbers, so `labels: [yes, no]` (as
the README writes it) would reach the job schema as two booleans. Knows nothing of the schema itself: error
formatting is handed the root section.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


def label_words(value: Any) -> Any:
    """A label list as words: YAML 1.1 reads `[yes, no]` (and on/off, true/false) as booleans and digits as
    numbers. Job files keep the spelling typed (`load_yaml`); values that arrive already parsed (a dict, JSON)
    become `yes` / `no` and the number's digits."""
    if not isinstance(value, list):
        return value
    return [("yes" if v else "no") if isinstance(v, bool) else str(v) if isinstance(v, (int, float)) else v
            for v in value]


def _labels_as_typed(node: yaml.Node, in_labels: bool = False) -> None:
    """Retag every plain scalar of a `labels` list as a string, so it keeps the text the user typed (`yes`, `On`,
    `10`) instead of YAML's boolean or number."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _labels_as_typed(value, in_labels=isinstance(key, yaml.ScalarNode) and key.value == "labels")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if in_labels and isinstance(item, yaml.ScalarNode) and item.style is None:
                item.tag = "tag:yaml.org,2002:str"
            else:
                _labels_as_typed(item)


def load_yaml(text: str, *, labels: bool = False) -> Any:
    """yaml.safe_load, except that label lists keep their words as typed (`labels: [yes, no]` is two words, not
    two booleans). `labels`: the document itself is a label list (a `--set labels=...` value)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _labels_as_typed(node, in_labels=labels)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section an annotation holds: Section, Section | None, list[Section]; None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for a in typing.get_args(annotation) if (s := _section(a)) is not None), None)


def _valid_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the section that holds the field at `loc` (for unknown-key errors)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == str(part)), None)
        model = _section(getattr(field, "annotation", None))
        if model is None:
            return []
    return sorted(f.alias or name for name, f in model.model_fields.items())


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per problem, each naming the field by its dotted path (unknown keys: with the valid keys of their
    section, found from `root`, the job's schema)."""
    lines = [f"{source}: invalid job file"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key; valid keys here: {', '.join(_valid_keys(root, e['loc']))}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # a whole-job check that names its own key (retry.ladder[k]...) needs no "(top level)"
            lines.append(f"  {msg}" if not e["loc"] and re.match(r"[a-z_]+[.\[]", msg) else f"  {loc}: {msg}")
    return "\n".join(lines)
