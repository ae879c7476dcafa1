"""Exceptions of the rank_store package: one base, mixed with the builtin that fits."""


class RankStoreError(Exception):
    """Base of every error raised by rank_store."""
