"""A reasoning model's thinking, kept apart from its answer (prompt.thinking=true).

Such a model (Qwen3, the DeepSeek-R1 distills) writes `<think> ... </think>` and then its answer, where `</think>` is
one token of its vocabulary. The tokens before that token are the row's `reasoning`, the tokens after it its answer
(`generation`): the part that a constraint (sampling.json_schema, regex, choice) applies to, that `parsed` reads and
that ROUGE scores. A generation without the token (cut short while thinking) is all reasoning, with an empty answer.
"""

from splitwiser.errors import UserError

START, END = "<think>", "</think>"


def end_token(tokenizer) -> int:
    """The id of the tokenizer's `</think>` token. Raises UserError where it has none: the model's thinking cannot be
    told from its answer."""
    token = tokenizer.get_vocab().get(END)
    if token is None:
        raise UserError(f"prompt.thinking=true: the model's tokenizer has no {END} token, so its thinking cannot be "
                        "told from its answer; leave prompt.thinking unset")
    return token


def parts(token_ids: list[int], end: int) -> tuple[list[int], list[int]]:
    """(thinking, answer): the tokens before the first `end` and after it (all thinking where there is none)."""
    if end not in token_ids:
        return token_ids, []
    at = token_ids.index(end)
    return token_ids[:at], token_ids[at + 1:]


def thinking_text(text: str) -> str:
    """The text of the thinking tokens, without the `<think>` the model (or its template) opened it with."""
    return text.strip().removeprefix(START).strip()
