"""Class labels for evaluation: the one place where a split's labels become class ids.

A sample's label is a class id (an integer), a class name (a string) or absent (see
``data_pipelines.decode.read_label``); batches carry ids in ``label`` and names in ``label_name``.
Names become ids through a class list: the one the user gave (``--classes``), else ``classes.json``
beside the shards, else the sorted distinct names of the split. The list is then also zero-shot's
class names, and the retrieval rule "a hit carries the query's label" compares the ids.

One split holds one kind: integers and names mixed are an error naming a sample of each.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmssl.eval.embeddings import Embeddings


def _sample(data: Embeddings, i: int) -> str:
    shard = data.shards[i] if data.shards else "?"
    return f"sample {data.keys[i]!r} of {shard}"


def _names(data: Embeddings) -> list[str]:
    return data.label_names or [""] * len(data.keys)


def _first(data: Embeddings) -> tuple[int | None, int | None]:
    """The index of the first sample with an integer label and of the first with a class name."""
    numbered = next((i for i, y in enumerate(data.labels.tolist()) if y >= 0), None)
    named = next((i for i, n in enumerate(_names(data)) if n), None)
    return numbered, named


def _integer(data: Embeddings, i: int) -> str:
    return f"{_sample(data, i)}: {int(data.labels[i])}"


def _name(data: Embeddings, i: int) -> str:
    return f"{_sample(data, i)}: {_names(data)[i]!r}"


def kind(data: Embeddings, what: str) -> str:
    """The kind of label ``data``'s samples carry: "integer", "name" or "none". ``what`` names the split
    in the error raised when it holds both integers and names."""
    numbered, named = _first(data)
    if named is not None and numbered is not None:
        raise ValueError(
            f"{what} mixes integer labels ({_integer(data, numbered)}) and class names "
            f"({_name(data, named)}): give every sample of a split the same kind of label"
        )
    return "name" if named is not None else "integer" if numbered is not None else "none"


def to_ids(data: Embeddings, classes: list[str], source: str) -> Embeddings:
    """``data`` with its class names replaced by their index in ``classes`` (``source`` says where the
    list came from, for the error when a name is not in it)."""
    index = {name: i for i, name in enumerate(classes)}
    ids = []
    for i, name in enumerate(_names(data)):
        if name and name not in index:
            raise ValueError(f"{_sample(data, i)} has the class name {name!r}, which {source} does not list")
        ids.append(index[name] if name else -1)
    return dataclasses.replace(data, labels=torch.tensor(ids, dtype=torch.long))


def resolve(
    test: Embeddings,
    given: list[str] | None,
    *,
    source: str,
    where: str,
    probe: Embeddings | None = None,
    probe_where: str = "",
) -> tuple[Embeddings, Embeddings | None, list[str] | None]:
    """(test, probe, classes): both splits with class ids for labels, and the class names (None when the
    labels are integers and no list was given). ``given`` comes from ``source`` (e.g. "classes.json in
    DIR"); ``where`` / ``probe_where`` name the splits in errors.

    With names and no list, the classes are the sorted distinct names of ``test``; the probe split's
    names that ``test`` lacks are appended (sorted) for the probe only, so that ids agree across splits.
    """
    test_kind = kind(test, where)
    probe_kind = kind(probe, probe_where) if probe is not None else "none"
    if {test_kind, probe_kind} == {"integer", "name"}:
        assert probe is not None
        named, numbered = (test, probe) if test_kind == "name" else (probe, test)
        raise ValueError(
            f"{where} and {probe_where} hold different kinds of label: class names "
            f"({_name(named, _first(named)[1])}) and integers ({_integer(numbered, _first(numbered)[0])}): "
            "give both splits the same kind"
        )
    if "name" not in (test_kind, probe_kind):
        return test, probe, given
    classes = given
    if classes is None:
        classes, source = sorted({n for n in _names(test) if n}), f"the class names of {where}"
    test = to_ids(test, classes, source)
    if probe is not None:
        extra = sorted({n for n in _names(probe) if n} - set(classes)) if given is None else []
        probe = to_ids(probe, classes + extra, source)
    return test, probe, classes or None
