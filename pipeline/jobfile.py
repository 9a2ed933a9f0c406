"""Reading job YAML: yaml.safe_load, except that label lists keep the words the user typed.

YAML 1.1 reads unquoted yes/no, on/off, true/false as booleans and digits as numbers, so `labels: [yes, no]` (as
the README writes it) would reach the job schema as two booleans. Knows nothing of the schema itself.
"""

from __future__ import annotations

from typing import Any

import yaml


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
