"""Files (atomic writes, JSON, NetCDF/zarr datasets) and ISO 8601 times (:mod:`jaxguide.io.times`).

The bottom layer: imports nothing else from jaxguide.
"""

# the public names of the former module jaxguide.io
from jaxguide.io.files import (  # noqa: F401
    NETCDF_COMPRESSION,
    atomic_write,
    check_writable_dir,
    netcdf_encoding,
    read_analysis,
    remove_stale_temporaries,
    replace_into_place,
    temp_beside,
    write_dataset,
    write_json_atomic,
)
