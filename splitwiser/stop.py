"""Stop strings (sampling.stop): a generation ends at the first of them, the string itself left out.

Two halves. On the device, inside the decode step, a request stops once its last token contains a stop string,
or its last tokens are a stop string as the tokenizer writes it: no host synchronisation beyond the step's own,
and its slot is free at once. On the host, where the text is decoded (output.PartWriter), `cut` finds the first
stop string exactly, whatever tokens made it: the text ends before it, the token ids end with the token that
completed it (as transformers' generate(stop_strings=...) keeps them), and finish_reason is "stop".
"""

from dataclasses import dataclass

import torch


@dataclass
class StopTable:
    """The device half: which tokens hold a stop string, and the stop strings' token sequences."""
    token_contains: torch.Tensor  # [vocab] bool
    sequences: torch.Tensor  # [S, L] token ids, right-aligned, -1 where shorter (matches any token)
    lengths: torch.Tensor  # [S]


def stop_table(tokenizer, stop: list[str], vocab: int, device: torch.device) -> StopTable | None:
    """The table of `stop` for a model of `vocab` tokens, or None when there are no stop strings."""
    if not stop:
        return None
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))])
    contains = torch.zeros(vocab, dtype=torch.bool)
    contains[:len(texts)] = torch.tensor([holds_stop(text, stop) for text in texts])
    # A string as it is written alone, and after a space (where BPE tokenizers fold the space into its first token)
    written = {tuple(tokenizer(text, add_special_tokens=False).input_ids) for s in stop for text in (s, " " + s)}
    written = sorted(ids for ids in written if ids and holds_stop(tokenizer.decode(ids), stop))
    width = max(map(len, written), default=1)
    sequences = torch.full((max(1, len(written)), width), -1, dtype=torch.long)
    for row, ids in enumerate(written):
        sequences[row, width - len(ids):] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids in written] or [width + 1])  # none: a length no tail reaches
    return StopTable(contains.to(device), sequences.to(device), lengths.to(device))


def holds_stop(text: str, stop: list[str]) -> bool:
    return any(s in text for s in stop)


def stopped(table: StopTable, output: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """[B] whether each row's output [B, max_new] up to its `generated` [B] tokens ends in a stop string."""
    width = table.sequences.shape[1]
    index = (generated[:, None] - width + torch.arange(width, device=output.device)).clamp(min=0)
    tail = output.gather(1, index)  # [B, width]: the last tokens
    last = output.gather(1, (generated - 1).clamp(min=0)[:, None])[:, 0]
    matches = ((tail[:, None, :] == table.sequences) | (table.sequences < 0)).all(-1)  # [B, S]
    matches &= generated[:, None] >= table.lengths
    return table.token_contains[last] | matches.any(-1)


def cut(text: str, token_ids: list[int], stop: list[str], tokenizer) -> tuple[str, int] | None:
    """Where a stop string is in the decoded `text`: (the text before the first one, how many tokens it took to
    complete it); None where there is none."""
    if not holds_stop(text, stop):
        return None
    low, high = 1, len(token_ids)  # the fewest tokens whose text holds a stop string
    while low < high:
        middle = (low + high) // 2
        if holds_stop(tokenizer.decode(token_ids[:middle], skip_special_tokens=True), stop):
            high = middle
        else:
            low = middle + 1
    reached = tokenizer.decode(token_ids[:low], skip_special_tokens=True)
    return reached[:min(reached.find(s) for s in stop if s in reached)], low
