"""Errors hpcq raises for problems the user can fix; the CLI turns them into exit status 2."""


class HpcqError(Exception):
    """Base class of hpcq's user-facing errors: the message says what is wrong and how to fix it."""


class ConfigError(HpcqError):
    """A run spec, an override or a command-line argument is invalid."""


class ModelError(HpcqError):
    """A model cannot be loaded or does not fit the checkpoint or artifact given."""


class DataError(HpcqError):
    """A dataset, image folder or shard set cannot be used."""


class ArtifactError(HpcqError):
    """A compressed hpcq file is truncated, corrupted or of an unknown format version."""


class QuantizationError(HpcqError):
    """A codebook cannot be fitted as asked (k out of range, non-finite weights, empty layer)."""
