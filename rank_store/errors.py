"""Exceptions of the rank_store package: one base, mixed with the builtin that fits."""
from tensorslm.errors import TensorSLMError


class RankStoreError(TensorSLMError):
    """Base of every error raised by rank_store."""


class TensorShapeError(RankStoreError, ValueError):
    """A tensorization shape, a TT core or a rank list does not fit the data."""


class RungSpecError(RankStoreError, ValueError):
    """A rung specification (``6x8``, ``ratio 2``, ``eps 0.1``) cannot be parsed or reached."""


class RungFormatError(RankStoreError, ValueError):
    """The tensors of a rung are inconsistent (shapes, dtypes, index maps)."""


class UnknownRungError(RankStoreError, KeyError):
    """A rung name that the store or the embedding does not hold."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class StoreNotFoundError(RankStoreError, FileNotFoundError):
    """The store directory, its manifest or one of its rung files is missing."""


class StoreExistsError(RankStoreError, FileExistsError):
    """Creating a store where one already exists, without ``overwrite=True``."""


class StoreCorruptError(RankStoreError, ValueError):
    """A store file does not match its manifest (hash, size) or cannot be parsed."""


class StoreVersionError(RankStoreError, ValueError):
    """The manifest was written in another format version."""


class StoreSourceMismatchError(RankStoreError, ValueError):
    """The store was built from another model than the one expected."""


class ModelLoadError(RankStoreError, OSError):
    """A model reference (alias, directory, GGUF file, hub id) cannot be found or loaded."""


class EvaluationError(RankStoreError, ValueError):
    """Evaluation input that cannot work: a text too short, an unknown head mode or baseline."""


class TokenIndexError(RankStoreError, IndexError):
    """A token id outside the vocabulary of a rung."""


class ResultsFormatError(RankStoreError, TypeError):
    """Evaluation results that cannot be written into the manifest as JSON."""


class InstallError(RankStoreError, ValueError):
    """An embedding that does not fit the model it is installed into, or an unknown head mode."""


class TokenizerError(RankStoreError, ValueError):
    """A tokenizer asked for what it cannot do (a chat template it does not have)."""
