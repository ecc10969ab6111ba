"""Conversations as data: a row's list of {role, content} messages (data.messages_column, or an OpenAI batch
request's body.messages), checked once as it is read and then carried as canonical JSON text, so that it travels
through Arrow, the shards and a nightly partition's input.parquet as one string column like any other.

What is refused, with the reason (the row goes to errors.parquet): a value that is not a list (or the JSON text of
one), an empty list, a message that is not an object or has no role or no content, a role other than system,
developer, user or assistant, a content that is not text (a list of text parts is joined; an image part is
refused), and a conversation whose last message is not the user's (the model answers the user).

The JSON text of a string (`"Say this is a test"`) stands for a prompt used as it is, without a chat template: an
OpenAI batch request to /v1/completions. Only splitwiser.openai_batch makes one: a string in a messages column is
refused as read.
"""

import json

ROLES = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = ("system", "developer")  # developer: OpenAI's newer name for the system message; templates know system


def _text(content) -> str | None:
    """A message's content as text: a string, or a list of text parts joined (OpenAI's content-part form)."""
    if type(content) is str:  # not a subclass: data.py reads JSON numbers as str subclasses
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and type(p.get("text")) is str
                                         for p in content):
        return "".join(p["text"] for p in content)
    return None


def _message(number: int, message) -> tuple[dict | None, str | None]:
    """(role, content) of message `number` (from 1), or why it is not a message."""
    if not isinstance(message, dict):
        return None, f"message {number} is not an object with role and content"
    for key in ("role", "content"):
        if message.get(key) is None:
            return None, f"message {number} has no {key}"
    role, content = message["role"], _text(message["content"])
    if role not in ROLES:
        return None, f"message {number} has the role {role!r}; the roles are {', '.join(ROLES)}"
    if content is None:
        return None, f"message {number}'s content is not text"
    return {"role": role, "content": content}, None


def conversation(value, column: str) -> tuple[str | None, str | None]:
    """(the conversation as canonical JSON text, None), or (None, why `value` is not one). `value`: a list of
    messages, or its JSON text (a CSV cell, a nightly partition's input.parquet)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return None, f"{column} is not a list of messages (nor its JSON text: {e.msg})"
    if not isinstance(value, list):
        return None, f"{column} is not a list of {{role, content}} messages"
    if not value:
        return None, f"{column} is an empty conversation"
    messages = []
    for number, item in enumerate(value, 1):
        message, why = _message(number, item)
        if why:
            return None, f"{column}: {why}"
        messages.append(message)
    if messages[-1]["role"] != "user":
        return None, f"{column}: the last message is the {messages[-1]['role']}'s, not the user's: nothing to answer"
    return json.dumps(messages, ensure_ascii=False), None


def raw_prompt(text: str) -> str:
    """A prompt to use as it is, without a chat template, in a messages column's form."""
    return json.dumps(text, ensure_ascii=False)


def parse(text: str) -> list[dict] | str:
    """A messages column's value as made by conversation() (a list of messages) or raw_prompt() (a string)."""
    return json.loads(text)


def has_system(messages: list[dict]) -> bool:
    return any(m["role"] in SYSTEM_ROLES for m in messages)
