"""Language-model data in TRL's conventions, and the characters of it that the loss scores.

A JSON-lines file holds one format throughout (CSV/TSV: a ``text`` column, or ``prompt`` and
``completion`` columns):

- ``{"text": ...}``: every token is scored;
- ``{"prompt": ..., "completion": ...}``: strings, only the completion is scored; or lists of
  messages (conversational), only the completion's turns are scored;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered by the tokenizer's chat
  template, only the assistant turns are scored.

A ``label`` (or any other key) is ignored: the loss does not read it, so every example gets
:data:`gradfix.data.UNLABELLED` and ``shots`` draws that many examples in all. The scored part
of a conversation is located by rendering its prefixes: turn ``i`` spans the characters between
the rendering of the turns before it (with the generation prompt when ``i`` is an assistant
turn) and the rendering up to and including it, so it covers the turn's content and the
template's end-of-turn markup, as the ``{% generation %}`` markers of a template would.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from gradfix.data import CSV_DELIMITERS, UNLABELLED, Example, data_file, jsonl_records
from gradfix.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
"""The message roles a conversation may hold."""

Messages = tuple[tuple[str, str], ...]
"""A conversation as ``(role, content)`` pairs (hashable, so that examples stay hashable)."""

_FORMAT_KEYS = ("text", "prompt", "completion", "messages")
_EXPECTED = "expected {'text'}, {'prompt', 'completion'} or {'messages'}"


def read_lm_examples(path: str | Path) -> list[Example]:
    """The examples of a language-model data file (see the module docstring), all unlabelled.

    Raises :class:`DataError` naming the file and line for a missing, empty or malformed file, an
    example in none of the formats or in another format than the file's first example, a bad
    role, a missing or non-string content, and a conversation with nothing to score.
    """
    p = data_file(path)
    suffix = p.suffix.lower()
    try:
        rows = _csv_rows(p, CSV_DELIMITERS[suffix]) if suffix in CSV_DELIMITERS else jsonl_records(p)
        examples: list[Example] = []
        first: tuple[str, int] | None = None
        for line, record in rows:
            kind, example = _example(record, p, line)
            first = first or (kind, line)
            if kind != first[0]:
                raise DataError(
                    f"{p}, line {line}: a {kind} example, but line {first[1]} is a {first[0]} example; "
                    "give one format per file"
                )
            examples.append(example)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not examples:
        raise DataError(f"{p}: file is empty (no examples)")
    return examples


def _csv_rows(path: Path, delimiter: str) -> Any:
    """``(line, row)`` for each row of a CSV/TSV file with a header row."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None and v is not None}
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.reader.line_num}: malformed row ({exc})") from exc


def _example(record: dict[str, Any], path: Path, line: int) -> tuple[str, Example]:
    """The format of one record and its example; :class:`DataError` at ``path, line`` otherwise."""
    where = f"{path}, line {line}"
    keys = [k for k in _FORMAT_KEYS if k in record and record[k] is not None]
    if "messages" in keys:
        if keys != ["messages"]:
            raise DataError(f"{where}: both 'messages' and {keys[:-1]}; {_EXPECTED}")
        messages = _messages(record["messages"], where, "messages")
        scored = tuple(i for i, (role, _) in enumerate(messages) if role == "assistant")
        if not scored:
            raise DataError(f"{where}: 'messages' has no assistant turn, so no token would be scored")
        return "{'messages'}", _chat_example(messages, scored, path, line)
    if "prompt" in keys or "completion" in keys:
        if set(keys) != {"prompt", "completion"}:
            raise DataError(f"{where}: has {keys}; {_EXPECTED}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            asked = _messages(prompt, where, "prompt")
            answer = _messages(completion, where, "completion")
            scored = tuple(range(len(asked), len(asked) + len(answer)))
            return "conversational {'prompt', 'completion'}", _chat_example(
                asked + answer, scored, path, line
            )
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise DataError(
                f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages"
            )
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not value.strip():
                raise DataError(f"{where}: empty {key!r}")
        fields = (("completion", completion), ("file", str(path)), ("prompt", prompt))
        return "{'prompt', 'completion'}", Example(prompt + completion, UNLABELLED, line, fields)
    if keys == ["text"]:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "{'text'}", Example(text, UNLABELLED, line)
    raise DataError(f"{where}: {_EXPECTED}; got keys {sorted(map(str, record))}")


def _messages(value: Any, where: str, key: str) -> Messages:
    """``value`` checked as a list of ``{"role", "content"}`` objects, as ``(role, content)`` pairs."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} objects")
    pairs = []
    for i, message in enumerate(value):
        turn = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: {turn} must be a {{'role', 'content'}} object, got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {turn} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            got = "no 'content'" if content is None else f"a {type(content).__name__} 'content'"
            raise DataError(f"{where}: {turn} ({role}) has {got}; expected a string")
        pairs.append((str(role), content))
    return tuple(pairs)


def _chat_example(messages: Messages, scored: tuple[int, ...], path: Path, line: int) -> Example:
    """An example holding a conversation and the indices of its scored turns."""
    text = "\n".join(content for _, content in messages)
    fields = (("file", str(path)), ("messages", messages), ("scored", scored))
    return Example(text, UNLABELLED, line, fields)


def where(example: Example, position: int) -> str:
    """``"file, line N"`` for an example read from a file, else ``"example N"``."""
    source = example.get("file")
    return f"{source}, line {example.line}" if source and example.line else f"example {position}"


def chat_text(
    tokenizer: Any, messages: Messages, scored: tuple[int, ...], at: str
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by ``tokenizer``'s chat template and the character spans of its
    ``scored`` turns (see the module docstring); :class:`DataError` at ``at`` when the tokenizer has
    no chat template, the template refuses the conversation or does not render it turn by turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{at}: conversations need the tokenizer's chat template, but the model's tokenizer has "
            "none; add one (chat_template in tokenizer_config.json) or give {'text'} or "
            "{'prompt', 'completion'} data"
        )
    turns = [{"role": role, "content": content} for role, content in messages]
    full = _render(tokenizer, turns, False, at)
    spans = []
    for i in scored:
        before = _render(tokenizer, turns[:i], turns[i]["role"] == "assistant", at) if i else ""
        through = _render(tokenizer, turns[: i + 1], False, at)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{at}: the chat template renders turn {i} differently once later turns follow, so its "
                "tokens cannot be located; give {'prompt', 'completion'} data instead"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _render(tokenizer: Any, turns: list[dict[str, str]], generation: bool, at: str) -> str:
    """The chat template's text of ``turns`` (``generation``: with the assistant's header after)."""
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # a template is user code: it raises what it likes (jinja errors, ...)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{at}: the tokenizer's chat template refused the conversation: {reason}") from exc
    if not isinstance(text, str):
        raise DataError(f"{at}: the tokenizer's chat template did not render text")
    return text


def scored_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token (its character ``offsets``) overlaps a scored span; tokens without
    characters (special tokens the tokenizer adds) are not scored."""
    return [end > start and any(end > lo and start < hi for lo, hi in spans) for start, end in offsets]
