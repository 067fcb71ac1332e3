"""Observations: tables and their files (table), why a table is refused (errors), row
validation and plausibility (validation), the point operator (operator), padding and
preparation for the sampler (prepare), observation sources (files, partitions), ERA5,
sampling strategies.

Imports only from lower layers (diffusion, model, grid, io).
"""

# the public names of the former module jaxguide.observations
from jaxguide.io.times import ISO_FORMAT  # noqa: F401
from jaxguide.observations.errors import (  # noqa: F401
    REASONS,
    BadObservationsError,
    EmptyTableError,
    ImplausibleObservationsError,
    MissingColumnsError,
    ObservationError,
    ObservationFileError,
    ObservationTimeError,
    TimeFormatError,
    UnknownVariableError,
)
from jaxguide.observations.operator import (  # noqa: F401
    PointObservationOperator,
    build_operator,
    channel_index,
    normalise,
    time_stencil,
)
from jaxguide.observations.prepare import PreparedObservations, bucket_size, pad, prepare  # noqa: F401
from jaxguide.observations.table import (  # noqa: F401
    COLUMNS,
    coerce_table,
    make_table,
    parse_time,
    read_observations,
    table_format,
    to_utc_naive,
    write_observations,
)
from jaxguide.observations.validation import check_plausible, override_sigma, validate_observations  # noqa: F401
