"""Splitwiser: batch offline LLM inference over a dataset, written to Parquet."""
