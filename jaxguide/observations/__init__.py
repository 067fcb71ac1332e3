"""Observations: tables and their validation, the point operator, padding and
preparation for the sampler, observation sources (files, partitions), ERA5, sampling strategies.

Imports only from lower layers (diffusion, model, grid, io).
"""

# the public names of the former module jaxguide.observations
from jaxguide.observations.table import (  # noqa: F401
    BadObservationsError,
    COLUMNS,
    EmptyTableError,
    ISO_FORMAT,
    ImplausibleObservationsError,
    MissingColumnsError,
    ObservationError,
    ObservationFileError,
    ObservationTimeError,
    PointObservationOperator,
    PreparedObservations,
    REASONS,
    TimeFormatError,
    UnknownVariableError,
    bucket_size,
    build_operator,
    channel_index,
    check_plausible,
    make_table,
    normalise,
    override_sigma,
    pad,
    parse_time,
    prepare,
    read_observations,
    table_format,
    time_stencil,
    to_utc_naive,
    validate_observations,
    write_observations,
)
