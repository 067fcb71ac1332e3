"""Convert cBottle PyTorch checkpoints into jaxguide model directories (needs the `convert` extra: torch).

Imported on demand (`jaxguide convert`, `import jaxguide.model.convert`): `import jaxguide` never imports torch.
"""

from jaxguide.model.convert.checkpoint import (
    CheckpointError,
    ExpertMismatchError,
    LegacyCheckpointError,
    MissingMemberError,
    NotAZipError,
    OutputExistsError,
    StateDictMismatchError,
    TruncatedCheckpointError,
    UnknownArchitectureError,
    convert_checkpoints,
    read_checkpoint,
    write_cbottle_checkpoint,
)

__all__ = [
    "CheckpointError",
    "ExpertMismatchError",
    "LegacyCheckpointError",
    "MissingMemberError",
    "NotAZipError",
    "OutputExistsError",
    "StateDictMismatchError",
    "TruncatedCheckpointError",
    "UnknownArchitectureError",
    "convert_checkpoints",
    "read_checkpoint",
    "write_cbottle_checkpoint",
]
