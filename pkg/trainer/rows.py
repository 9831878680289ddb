"""A dataset row as what is trained on: a prompt and a completion, or a conversation (messages).

Formats (`dataset_format`, or detected from the columns, after renaming them by `column_map`): alpaca
(instruction/input/output), messages (role/content, or ShareGPT's from/value), prompt_completion, text,
input_output (a user turn and an assistant reply, rendered like messages). `system_prompt` becomes the first
message of chat formats and the first paragraph of the others; `prompt_template` wraps the user's words.
"""

from __future__ import annotations

from pkg.trainer.errors import RowError, TrainerError

FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "input_output": ("input", "output"),
}
CHAT_FORMATS = ("messages", "input_output")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
# The Stanford Alpaca preamble (alpaca_preamble), word for word as torchtune 0.6.1's AlpacaToMessages writes
# it; keyed by whether the row has an input.
ALPACA_PREAMBLE = {
    True: "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n",
    False: "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n",
}
# torchtune 0.6.1's fixed PromptTemplates (torchtune/data/_prompt_templates.py): user message prefix, suffix.
PROMPT_TEMPLATES = {
    "grammar": ("Correct this to standard English: ", "\n---\nCorrected: "),
    "summarize": ("Summarize this dialogue:\n", "\n---\nSummary:\n"),
}


def rename_columns(ds, column_map: dict[str, str]):
    """Give the dataset's columns the names the format expects ({format column: dataset column})."""
    for wanted, actual in column_map.items():
        if actual not in ds.column_names:
            raise TrainerError(
                f"column_map: the dataset has no column {actual!r} (for {wanted!r}); "
                f"its columns are {', '.join(ds.column_names)}"
            )
    sources = set(column_map.values())
    present = [w for w, a in column_map.items() if w != a and w in ds.column_names and w not in sources]
    if present:  # a column already named like the target steps aside
        ds = ds.remove_columns(present)
    return ds.rename_columns({actual: wanted for wanted, actual in column_map.items() if wanted != actual})


def detect_format(columns: list[str], forced: str) -> str:
    if forced != "auto":
        missing = [c for c in FORMAT_FIELDS[forced] if c not in columns]
        if missing:
            raise TrainerError(
                f"dataset_format {forced} needs columns {', '.join(FORMAT_FIELDS[forced])}; "
                f"the dataset has {', '.join(columns)}"
            )
        return forced
    for fmt, needed in FORMAT_FIELDS.items():
        if all(c in columns for c in needed):
            return fmt
    raise TrainerError(
        f"cannot tell the dataset format from its columns ({', '.join(columns)}): expected "
        "instruction/input/output, messages, prompt/completion, text or input/output (or set dataset_format, "
        "or column_map to rename columns)"
    )


def _text(row: dict, key: str, i: int, fmt: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (required and isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        raise RowError(i, f" has no '{key}' (format {fmt} needs {', '.join(FORMAT_FIELDS[fmt])})")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # CSV and parquet columns of numbers
    if not isinstance(value, str):
        raise RowError(i, f": '{key}' must be a string, got {type(value).__name__}")
    return value


def prompt_and_completion(row: dict, fmt: str, i: int, preamble: bool = False) -> tuple[str, str]:
    """The untrained prefix and the trained continuation of one non-chat row."""
    if fmt == "alpaca":
        extra = _text(row, "input", i, fmt, required=False)
        prompt = ALPACA_PROMPT.format(
            instruction=_text(row, "instruction", i, fmt), input=f"### Input:\n{extra}\n\n" if extra else ""
        )
        return (ALPACA_PREAMBLE[bool(extra)] if preamble else "") + prompt, _text(row, "output", i, fmt)
    if fmt == "prompt_completion":
        return _text(row, "prompt", i, fmt), _text(row, "completion", i, fmt)
    return "", _text(row, "text", i, fmt)


def with_system(msgs: list[dict], system: str | None) -> list[dict]:
    """The conversation with `system` as its system message (replacing its own) unless it is None (an
    empty one too, as torchtune's new_system_prompt: ''); marked `masked`: never a target."""
    if system is None:
        return msgs
    added = {"role": "system", "content": system, "masked": True}
    return [added, *(m for m in msgs if m["role"] != "system")]


def with_system_text(prompt: str, system: str | None) -> str:
    """A plain-text prompt with `system` as its first paragraph, if it has words."""
    return f"{system}\n\n{prompt}" if system else prompt


def wrapped(text: str, template: str) -> str:
    """A user message in `prompt_template`'s words (unchanged without one)."""
    prefix, suffix = PROMPT_TEMPLATES.get(template, ("", ""))
    return f"{prefix}{text}{suffix}"


def conversation(
    row: dict, fmt: str, i: int, system: str | None = None, template: str = "", validate: bool = False
) -> list[dict]:
    """A chat-format row as messages: `messages` as it is, input_output as a user and an assistant turn;
    `validate`: torchtune's validate_messages on the result."""
    if fmt == "input_output":
        msgs = [
            {"role": "user", "content": _text(row, "input", i, fmt)},
            {"role": "assistant", "content": _text(row, "output", i, fmt)},
        ]
    else:
        msgs = _messages(row, i)
    if template:
        msgs = [{**m, "content": wrapped(m["content"], template)} if m["role"] == "user" else m for m in msgs]
    msgs = with_system(msgs, system)
    if validate:
        check_turns(msgs, i)
    return msgs


def check_turns(msgs: list[dict], i: int) -> None:
    """torchtune 0.6.1's validate_messages, which its SFT datasets run on every conversation: at least two
    messages, a system message only first, no assistant message but right after a user one, no two user
    messages in a row."""
    problem = ""
    if len(msgs) < 2:
        problem = f"{len(msgs)} message, a conversation needs a user and an assistant message"
    last = "assistant"
    for k, m in enumerate(msgs):
        if problem:
            break
        if m["role"] == "assistant" and last != "user":
            problem = f"message {k} is an assistant message that does not follow a user message"
        elif m["role"] == "user" and last == "user":
            problem = f"messages {k - 1} and {k} are both user messages"
        elif m["role"] == "system" and k > 0:
            problem = f"message {k} is a system message, which only the first message may be"
        last = m["role"]
    if problem:
        raise RowError(
            i, f": {problem} (torchtune's validate_messages, which tune run applies); fix or drop the row"
        )


def _messages(row: dict, i: int) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError(i, " has no 'messages' list")
    msgs = plain_messages(msgs, i)
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError(i, ": no 'assistant' message to train on")
    return msgs


SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def plain_messages(msgs: list, i: int, which: str = "every message") -> list[dict]:
    """`msgs` (of row `i`) as {role, content} dicts (extra keys dropped); `which` names them in the error,
    which says what is wrong with them ("row 3: every message of 'chosen'"). ShareGPT's {from:
    human|gpt|system, value} messages (torchtune's chat_dataset with conversation_style sharegpt) become the
    same."""
    msgs = [
        {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        if isinstance(m, dict) and "from" in m and m.get("role") is None  # role: None where rows mix styles
        else m
        for m in msgs
    ]
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise RowError(i, f": {which} needs a string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]
