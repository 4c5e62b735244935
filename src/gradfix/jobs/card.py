"""The model card of an output folder: ``README.md``, generated from its ``gradfix.json`` record.

A Hugging Face model card is Markdown after YAML front matter. :func:`model_card` writes it from
the record alone (it reads no file), so the same record gives the same card, byte for byte: front
matter with ``base_model`` (the target B), ``tags`` and ``library_name``; then what the model is,
its source models, the method, the verdict of the pre-flight check (when the transport stated
one), the chosen threshold and α with every candidate's score, the kept
share of ``τ_A``, the first-order descent certificate, the sha256 of every input and how to replay
the job. It covers the records of ``transport`` (every method, the aligned ones included) and of
``merge``. The choice and result sections are written by :mod:`gradfix.jobs.card_result`, single
values (numbers, shares, table cells) by :mod:`gradfix.jobs.card_format`.

The card is plain text with the front matter dumped by PyYAML, not built with huggingface_hub's
``ModelCard``: gradfix's core does not depend on huggingface_hub (it comes with transformers, in the
``hf`` extra), every output gets a card (a transport of bare safetensors files through the Python
API too), and ``ModelCard`` would only wrap the same ``yaml.safe_dump`` of the metadata. The tests
check that huggingface_hub reads the card's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import yaml

from gradfix.jobs.card_format import cell, file_name, num, threshold_text
from gradfix.jobs.card_result import choice_section, result_section
from gradfix.jobs.check_votes import card_section
from gradfix.jobs.replay import REPLAY_FILE
from gradfix.merge import MERGE_METHODS, TRIM_SCOPES
from gradfix.methods import METHODS
from gradfix.ops.masks import MASKS

CARD_FILE = "README.md"
TAGS = ("gradfix", "task-vector-transport")
MERGE_TAG = "merge"


def model_card(record: Mapping[str, Any]) -> str:
    """``README.md`` for the output folder that ``record`` (its ``gradfix.json``) describes."""
    merge = record.get("command") == "merge"
    sections = [
        _merge_intro(record) if merge else _transport_intro(record),
        _merge_sources(record) if merge else _transport_sources(record),
        _merge_method(record) if merge else _transport_method(record),
        card_section(record.get("check")),
        choice_section(record.get("choice")),
        result_section(record),
        _inputs(record),
        _replay(record),
    ]
    front = yaml.safe_dump(card_metadata(record), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def card_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """The card's front matter: ``base_model``, ``tags`` and (when something loads it) ``library_name``."""
    meta: dict[str, Any] = {"base_model": model_name(_target(record))}
    meta["tags"] = [*TAGS, MERGE_TAG] if record.get("command") == "merge" else list(TAGS)
    library = library_name(record)
    if library is not None:
        meta["library_name"] = library
    return meta


def model_name(entry: Mapping[str, Any]) -> str:
    """How the card names an input: its Hub id when it has one, else its path's last part.

    The Hub id is the entry's ``repo_id`` when the input was resolved from the Hub, or read off a
    path inside the Hugging Face cache (``models--org--name/snapshots/<revision>``).
    """
    if entry.get("repo_id"):
        return str(entry["repo_id"])
    path = str(entry.get("path", ""))
    parts = PurePath(path).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return PurePath(path).name or path


def library_name(record: Mapping[str, Any]) -> str | None:
    """The library that loads the output: ``peft`` for an adapter, ``sentence-transformers`` for a
    sentence-transformers folder (``modules.json``), ``transformers`` with a ``config.json``, else none
    (bare weights: no library loads the folder as it is)."""
    if "adapter_model.safetensors" in record.get("files", []):
        return "peft"
    files = _target(record).get("sha256", {})
    if "modules.json" in files:
        return "sentence-transformers"
    if "config.json" in files:
        return "transformers"
    return None


def _transport_intro(record: Mapping[str, Any]) -> str:
    inputs = record.get("inputs", {})
    b, a = model_name(_target(record)), model_name(inputs.get("source_base", {}))
    method = str(record.get("method"))
    return (
        f"# {b} + the transported fine-tune of {a}\n\n"
        f"This model is **{b}** (B) with the task vector `τ_A = θ_A^ft − θ_A` of a fine-tune of "
        f"**{a}** (A) carried onto it by `gradfix transport --method {method}`, with `m` the mask "
        "(below):\n\n"
        "```\nθ = θ_B + α · (m ⊙ τ_A)\n```"
    )


def _merge_intro(record: Mapping[str, Any]) -> str:
    b, count = model_name(_target(record)), len(record.get("tasks", []))
    return (
        f"# {b} + {count} merged fine-tune(s)\n\n"
        f"This model is **{b}** (B) with the merge of {count} task vector(s) "
        "`τ^t = θ^t_ft − θ^t_base`, made by `gradfix merge`:\n\n"
        "```\nθ = θ_B + α · τ_merged\n```"
    )


def _transport_sources(record: Mapping[str, Any]) -> str:
    inputs = record.get("inputs", {})
    finetuned = inputs.get("source_finetuned", {})
    adapter = "adapter_config.json" in finetuned.get("sha256", {})
    rows = [
        ("A, source base", inputs.get("source_base", {})),
        ("A fine-tuned (a LoRA adapter)" if adapter else "A fine-tuned", finetuned),
        ("B, target base", inputs.get("target_base", {})),
    ]
    lines = ["## Source models", "", "| role | model | path |", "|---|---|---|"]
    lines += [f"| {role} | {cell(model_name(e))} | `{cell(e.get('path', ''))}` |" for role, e in rows]
    return "\n".join(lines)


def _merge_sources(record: Mapping[str, Any]) -> str:
    lines = ["## Source models", "", "| task | base | fine-tuned | data |", "|---|---|---|---|"]
    for i, task in enumerate(record.get("tasks", []), 1):
        data = task.get("data")
        cells = [model_name(task.get(k, {})) for k in ("source_base", "source_finetuned")]
        cells.append(model_name(data) if data else "-")
        lines.append(f"| {i} | " + " | ".join(cell(c) for c in cells) + " |")
    lines.append(f"\nTarget base B: `{cell(_target(record).get('path', ''))}`.")
    return "\n".join(lines)


def _transport_method(record: Mapping[str, Any]) -> str:
    method, mask = str(record.get("method")), str(record.get("mask"))
    lines = ["## Method", ""]
    lines.append(f"- method `{method}`{_described(METHODS, method)}")
    lines += _alignment_lines(record.get(method))
    lines.append(f"- mask `{mask}`{_described(MASKS, mask)}{_threshold(record)}")
    lines.append(f"- α = {num(record.get('alpha'))}")
    lines += _votes_lines(record, record.get("data"))
    lines += _tensor_lines(record)
    return "\n".join(lines)


def _alignment_lines(alignment: Any) -> list[str]:
    """Where an aligned method's maps came from: the activations on examples, or the weights."""
    if not isinstance(alignment, Mapping):
        return []
    if alignment.get("from") != "activations":
        return ["- maps from the two bases' weights (data-free)"]
    data = alignment.get("data") or {}
    centring = "on" if alignment.get("center") else "off"
    line = (
        f"- maps from the activations of A and B on {alignment.get('examples')} examples "
        f"({alignment.get('tokens')} tokens) of `{file_name(data)}`; centring {centring}, whitening "
        f"p = {num(alignment.get('whiten'))}"
    )
    short = alignment.get("underdetermined") or {}
    if short:
        line += f"; {len(short)} space(s) had fewer independent directions than their width"
    return [line]


def _merge_method(record: Mapping[str, Any]) -> str:
    method, pipeline = str(record.get("method")), str(record.get("pipeline"))
    lines = ["## Method", "", f"- merge `{method}`: {MERGE_METHODS.get(method, '')}".rstrip(": ")]
    if method == "ties":
        scope = str(record.get("trim_scope"))
        lines.append(
            f"- density {num(record.get('density'))}, sign election by `{record.get('elect')}`, "
            f"trimmed per `{scope}`: {TRIM_SCOPES.get(scope, '')}"
        )
    if record.get("weights") is not None:
        lines.append(f"- task weights {', '.join(num(w) for w in record['weights'])}")
    if pipeline == "plain":
        lines.append("- pipeline `plain`: merged without a mask")
    else:
        mask = str(record.get("mask"))
        lines.append(f"- pipeline `{pipeline}`, mask `{mask}`{_described(MASKS, mask)}{_threshold(record)}")
        for i, task in enumerate(record.get("tasks", []), 1):
            lines += [f"- task {i}: {line[2:]}" for line in _votes_lines(record, task.get("data"))]
    lines.append(f"- α = {num(record.get('alpha'))}")
    lines += _tensor_lines(record)
    return "\n".join(lines)


def _votes_lines(record: Mapping[str, Any], data: Mapping[str, Any] | None) -> list[str]:
    """Where the votes came from: the shots drawn from a data file, saved votes files, or none."""
    lines = []
    if data:
        shots = record.get("shots")
        drawn = "every example" if shots == "all" else f"{shots} per class, seed {record.get('seed')}"
        labels = ", ".join(str(label) for label in data.get("labels", []))
        lines.append(
            f"- votes of B on {data.get('num_samples')} examples ({drawn}) of `{file_name(data)}` "
            f"({data.get('num_examples')} examples; labels {labels}); recipe `{record.get('recipe')}`, "
            f"estimator `{record.get('estimator')}`{_placement(data)}"
        )
    votes_in = record.get("votes_in") or []
    if votes_in:
        files = ", ".join(f"`{file_name(v)}`" for v in votes_in)
        lines.append(f"- votes of B read from {len(votes_in)} votes file(s): {files}")
    if not lines and record.get("command") != "merge":
        lines.append("- no votes: the mask needs none")
    return lines


def _placement(data: Mapping[str, Any]) -> str:
    """``, on `cpu` in float32``: where B's votes were computed (older records do not say)."""
    if not data.get("device"):
        return ""
    return f", on `{data['device']}` in {data.get('dtype')}"


def _tensor_lines(record: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in ("include", "exclude"):
        if record.get(key):
            lines.append(f"- {key} " + ", ".join(f"`{p}`" for p in record[key]))
    return lines


def _threshold(record: Mapping[str, Any]) -> str:
    if record.get("mask") != "gate" or record.get("threshold") is None:
        return ""
    return f", threshold t = {threshold_text(float(record['threshold']))}"


def _inputs(record: Mapping[str, Any]) -> str:
    """Every input file with its sha256."""
    entries: list[tuple[str, Mapping[str, Any]]] = []
    inputs = record.get("inputs", {})
    for role in ("source_base", "source_finetuned", "target_base"):
        if role in inputs:
            entries.append((role.replace("_", " "), inputs[role]))
    for i, task in enumerate(record.get("tasks", []), 1):
        entries += [
            (f"task {i} {k.replace('_', ' ')}", task[k])
            for k in ("source_base", "source_finetuned", "data")
            if task.get(k)
        ]
    for key in ("data", "validation"):
        if record.get(key):
            entries.append((key, record[key]))
    entries += [("votes file", v) for v in record.get("votes_in") or []]
    lines = ["## Inputs", "", "| input | file | sha256 |", "|---|---|---|"]
    for role, entry in entries:
        for name, digest in entry.get("sha256", {}).items():
            lines.append(f"| {role} | `{cell(name)}` | `{digest}` |")
    return "\n".join(lines)


def _replay(record: Mapping[str, Any]) -> str:
    command = record.get("command", "transport")
    versions = (
        f"gradfix {record.get('gradfix_version')}, torch {record.get('torch_version')}, "
        f"Python {record.get('python_version')}"
    )
    lines = ["## Reproduce", "", f"Made with {versions}. `gradfix.json` beside this card is the full record."]
    if "options" in record:
        lines += [
            f"`{REPLAY_FILE}` holds the job's options; with the same inputs",
            "",
            f"```bash\ngradfix {command} --config {REPLAY_FILE} --out OTHER_FOLDER/\n```",
            "",
            "writes the same weight files, byte for byte.",
        ]
    return "\n".join(lines)


def _target(record: Mapping[str, Any]) -> Mapping[str, Any]:
    target: Mapping[str, Any] = record.get("inputs", {}).get("target_base", {})
    return target


def _described(registry: Mapping[str, Any], name: str) -> str:
    item = registry.get(name)
    summary = getattr(item, "summary", None)
    return f": {summary}" if summary else ""
