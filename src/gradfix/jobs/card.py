"""The model card of an output folder: ``README.md``, generated from its ``gradfix.json`` record.

A Hugging Face model card is Markdown after YAML front matter. :func:`model_card` writes it from
the record alone (it reads no file), so the same record gives the same card, byte for byte: front
matter with ``base_model`` (the target B), ``tags`` and ``library_name``; then what the model is,
its source models, the method, the verdict of the pre-flight check (when the transport stated
one), the chosen threshold and α with every candidate's score, the kept
share of ``τ_A``, the first-order descent certificate, the sha256 of every input and how to replay
the job. It covers the records of ``transport`` (every method, the aligned ones included) and of
``merge``.

The card is plain text with the front matter dumped by PyYAML, not built with huggingface_hub's
``ModelCard``: gradfix's core does not depend on huggingface_hub (it comes with transformers, in the
``hf`` extra), every output gets a card (a transport of bare safetensors files through the Python
API too), and ``ModelCard`` would only wrap the same ``yaml.safe_dump`` of the metadata. The tests
check that huggingface_hub reads the card's metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import yaml

from gradfix.jobs.check_votes import card_section
from gradfix.jobs.replay import REPLAY_FILE
from gradfix.merge import MERGE_METHODS, TRIM_SCOPES
from gradfix.methods import METHODS
from gradfix.methods.autotune import candidate_key
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
        _choice(record.get("choice")),
        _result(record),
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
    lines += [f"| {role} | {_cell(model_name(e))} | `{_cell(e.get('path', ''))}` |" for role, e in rows]
    return "\n".join(lines)


def _merge_sources(record: Mapping[str, Any]) -> str:
    lines = ["## Source models", "", "| task | base | fine-tuned | data |", "|---|---|---|---|"]
    for i, task in enumerate(record.get("tasks", []), 1):
        data = task.get("data")
        cells = [model_name(task.get(k, {})) for k in ("source_base", "source_finetuned")]
        cells.append(model_name(data) if data else "-")
        lines.append(f"| {i} | " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append(f"\nTarget base B: `{_cell(_target(record).get('path', ''))}`.")
    return "\n".join(lines)


def _transport_method(record: Mapping[str, Any]) -> str:
    method, mask = str(record.get("method")), str(record.get("mask"))
    lines = ["## Method", ""]
    lines.append(f"- method `{method}`{_described(METHODS, method)}")
    lines += _alignment_lines(record.get(method))
    lines.append(f"- mask `{mask}`{_described(MASKS, mask)}{_threshold(record)}")
    lines.append(f"- α = {_num(record.get('alpha'))}")
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
        f"({alignment.get('tokens')} tokens) of `{_name(data)}`; centring {centring}, whitening "
        f"p = {_num(alignment.get('whiten'))}"
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
            f"- density {_num(record.get('density'))}, sign election by `{record.get('elect')}`, "
            f"trimmed per `{scope}`: {TRIM_SCOPES.get(scope, '')}"
        )
    if record.get("weights") is not None:
        lines.append(f"- task weights {', '.join(_num(w) for w in record['weights'])}")
    if pipeline == "plain":
        lines.append("- pipeline `plain`: merged without a mask")
    else:
        mask = str(record.get("mask"))
        lines.append(f"- pipeline `{pipeline}`, mask `{mask}`{_described(MASKS, mask)}{_threshold(record)}")
        for i, task in enumerate(record.get("tasks", []), 1):
            lines += [f"- task {i}: {line[2:]}" for line in _votes_lines(record, task.get("data"))]
    lines.append(f"- α = {_num(record.get('alpha'))}")
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
            f"- votes of B on {data.get('num_samples')} examples ({drawn}) of `{_name(data)}` "
            f"({data.get('num_examples')} examples; labels {labels}); recipe `{record.get('recipe')}`, "
            f"estimator `{record.get('estimator')}`{_placement(data)}"
        )
    votes_in = record.get("votes_in") or []
    if votes_in:
        files = ", ".join(f"`{_name(v)}`" for v in votes_in)
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
    return f", threshold t = {_t(float(record['threshold']))}"


def _choice(choice: Mapping[str, Any] | None) -> str:
    """The chosen ``(t, α)`` and every candidate's score, as a table of t (rows) by α (columns)."""
    if not choice:
        return ""
    t, alpha = _t(float(choice["threshold"])), _num(choice["alpha"])
    chosen = candidate_key(float(choice["threshold"]), float(choice["alpha"]))
    cells: dict[tuple[str, str], tuple[Any, bool]] = {}
    for key, value in choice.get("scores", {}).items():
        first, _, second = str(key).partition(",")
        cells[(first.removeprefix("t="), second.removeprefix("a="))] = (value, key == chosen)
    rows = list(dict.fromkeys(k[0] for k in cells))
    columns = list(dict.fromkeys(k[1] for k in cells))
    lines = [
        "## Choice of t and α",
        "",
        f"Chosen on {choice.get('source')}: **t = {t}, α = {alpha}** (score {_num(choice.get('score'))}).",
        "Scores are the accuracy on the validation file when there is one, otherwise minus the mean "
        "loss on the held-out folds of the shots; higher is better. t = 0 is GradFix's agreement mask, "
        "t = naive keeps every coordinate.",
        "",
        "| t \\ α | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row in rows:
        values = [_score(*cells.get((row, c), (None, False))) for c in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _result(record: Mapping[str, Any]) -> str:
    descent, alpha = record.get("descent"), record.get("alpha")
    lines = ["## Result", ""]
    if alpha == 0:
        why = " (no candidate beat B on the evidence)" if record.get("choice") else ""
        lines.append(f"- α = 0: the weights are B's, unchanged{why}")
    lines += _merge_shares(record) if record.get("command") == "merge" else _kept_shares(record)
    if descent:
        lines.append(_certificate(descent))
    else:
        lines.append("- no votes were taken, so there is no first-order descent certificate")
    table = _tensor_table(record)
    if table:
        lines += ["", table]
    return "\n".join(lines)


def _kept_shares(record: Mapping[str, Any]) -> list[str]:
    """How much of ``τ_A`` the mask kept (with its sign) and flipped."""
    descent = record.get("descent")
    if not descent:
        return ["- no mask: every coordinate of `τ_A` is added"] if record.get("mask") == "none" else []
    added = " (none is added at α = 0)" if record.get("alpha") == 0 else ""
    kept = _pct(descent.get("kept_fraction"))
    lines = [f"- kept share: the mask keeps {kept} of `τ_A`'s non-zero coordinates{added}"]
    if descent.get("flipped_fraction"):
        lines.append(f"- flipped share: {_pct(descent['flipped_fraction'])} get the opposite sign")
    return lines


def _merge_shares(record: Mapping[str, Any]) -> list[str]:
    """How much of the merged tensors the merged (and masked) update changes."""
    tensors = (record.get("descent") or {}).get("tensors") or []
    numel = sum(int(t.get("numel", 0)) for t in tensors)
    if numel:
        share = sum(max(int(t.get("nonzero", 0)), 0) for t in tensors) / numel
        return [
            f"- the merged update is non-zero on {_pct(share)} of its {len(tensors)} tensors' coordinates"
        ]
    shares = list((record.get("nonzero_fraction") or {}).values())
    if not shares:
        return []
    return [f"- the merged update is non-zero on {_pct(min(shares))} to {_pct(max(shares))} of each tensor"]


def _certificate(descent: Mapping[str, Any]) -> str:
    inner = float(descent.get("total_inner", 0.0))
    if descent.get("alpha") == 0:
        return "- first-order descent certificate: none needed, nothing is added (`⟨ḡ, Δ⟩ = 0`)"
    sign = "≤ 0: to first order the update lowers" if inner <= 0 else "> 0: to first order the update raises"
    return (
        f"- first-order descent certificate: `⟨ḡ, Δ⟩ = {inner:.4e}` {sign} B's loss on the voting "
        "examples (`ḡ`: B's mean loss gradient on them; `Δ`: the update added to B, α included)"
    )


def _tensor_table(record: Mapping[str, Any]) -> str:
    """Per tensor: the kept share and ``⟨ḡ, Δ⟩`` (or, without votes, the kept or non-zero share)."""
    tensors = (record.get("descent") or {}).get("tensors", [])
    if tensors:
        header = ["tensor", "kept", "⟨ḡ, Δ⟩"]
        rows = [
            [f"`{t['name']}`", _pct(t.get("kept_fraction")), f"{t.get('inner', 0.0):.3e}"] for t in tensors
        ]
    else:
        header = ["tensor", "kept" if "kept_fraction" in record else "non-zero"]
        shares = record.get("kept_fraction") or record.get("nonzero_fraction") or {}
        rows = [[f"`{name}`", _pct(share)] for name, share in shares.items()]
    if not rows:
        return ""
    table = [header, ["---"] * len(header), *rows]
    body = "\n".join("| " + " | ".join(row) + " |" for row in table)
    return f"<details>\n<summary>Per tensor ({len(rows)})</summary>\n\n{body}\n\n</details>"


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
            lines.append(f"| {role} | `{_cell(name)}` | `{digest}` |")
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


def _name(entry: Mapping[str, Any]) -> str:
    return PurePath(str(entry.get("path", ""))).name


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _num(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _t(threshold: float) -> str:
    return "naive" if threshold > 1 else f"{threshold:g}"


def _pct(share: Any) -> str:
    return f"{100 * float(share):.2f} %" if isinstance(share, (int, float)) else "-"


def _score(value: Any, chosen: bool) -> str:
    text = _num(value) if value is not None else "n/a"
    return f"**{text}**" if chosen else text
