"""Splitwiser: batch offline LLM inference over a dataset, written to Parquet."""

# What the fork server that starts worker processes imports before the first worker (splitwiser.workers): the job,
# which imports every worker's code and what it uses (torch, transformers, datasets), so that no worker repeats it.
WORKER_PRELOAD = ["splitwiser.job"]
