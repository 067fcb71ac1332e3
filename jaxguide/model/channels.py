"""cBottle's variable catalogue: each channel's units, CF standard name, long name and
vertical level (``T850`` -> K, ``air_temperature``, 850 hPa; ``tas`` -> K at 2 m).

Used to write CF attributes (:mod:`jaxguide.assimilation.dataset`) and to word unit
hints (:func:`jaxguide.observations.validation.check_plausible`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChannelInfo:
    """Metadata of one cBottle channel: ``level`` in hPa for pressure-level fields,
    ``height`` in m for near-surface (2 m / 10 m) fields."""

    name: str
    units: str | None
    long_name: str
    standard_name: str | None = None
    level: float | None = None
    height: float | None = None

    @property
    def vertical(self) -> tuple[str, float, dict[str, Any]] | None:
        """(name, value, attrs) of the channel's scalar vertical coordinate, or None."""
        if self.level is not None:
            return (f"plev{self.level:g}", self.level * 100.0,
                    {"standard_name": "air_pressure", "long_name": "pressure", "units": "Pa", "positive": "down",
                     "axis": "Z"})
        if self.height is not None:
            return (f"height{self.height:g}m", self.height,
                    {"standard_name": "height", "long_name": "height above the surface", "units": "m",
                     "positive": "up", "axis": "Z"})
        return None


# variable -> (units, CF standard_name or None, long name)
_SURFACE: dict[str, tuple[str, str | None, str]] = {
    "tas": ("K", "air_temperature", "near-surface (2 m) air temperature"),
    "uas": ("m s-1", "eastward_wind", "eastward near-surface (10 m) wind"),
    "vas": ("m s-1", "northward_wind", "northward near-surface (10 m) wind"),
    "pres_msl": ("Pa", "air_pressure_at_mean_sea_level", "mean sea level pressure"),
    "rlut": ("W m-2", "toa_outgoing_longwave_flux", "top-of-atmosphere outgoing longwave radiation"),
    "rsut": ("W m-2", "toa_outgoing_shortwave_flux", "top-of-atmosphere outgoing shortwave radiation"),
    "rsds": ("W m-2", "surface_downwelling_shortwave_flux_in_air", "surface downwelling shortwave radiation"),
    "pr": ("kg m-2 s-1", "precipitation_flux", "precipitation"),
    "sst": ("K", "sea_surface_temperature", "sea surface temperature"),
    "sic": ("1", "sea_ice_area_fraction", "sea ice concentration"),
    "cllvi": ("kg m-2", "atmosphere_mass_content_of_cloud_liquid_water", "liquid water path"),
    "clivi": ("kg m-2", "atmosphere_mass_content_of_cloud_ice", "ice water path"),
    "tcwv": ("kg m-2", "atmosphere_mass_content_of_water_vapor", "total column water vapour"),
    "skt": ("K", "surface_temperature", "skin temperature"),
    "sp": ("Pa", "surface_air_pressure", "surface pressure"),
    "2d": ("K", "dew_point_temperature", "2 m dew point temperature"),
}
# near-surface fields at a fixed height above the surface (m)
_HEIGHTS: dict[str, float] = {"tas": 2.0, "2d": 2.0, "uas": 10.0, "vas": 10.0}
_LEVELS: dict[str, tuple[str, str | None, str]] = {
    "T": ("K", "air_temperature", "air temperature"),
    "U": ("m s-1", "eastward_wind", "eastward wind"),
    "V": ("m s-1", "northward_wind", "northward wind"),
    "Z": ("m2 s-2", "geopotential", "geopotential"),
    "Q": ("kg kg-1", "specific_humidity", "specific humidity"),
}


def channel_info(name: str) -> ChannelInfo:
    """Units / standard_name of a cBottle channel name (``"T850"``, ``"tas"``, ...).

    Unknown names get ``units=None`` (reported by :func:`check_cf`)."""
    if name in _SURFACE:
        units, std, long = _SURFACE[name]
        return ChannelInfo(name, units, long, std, height=_HEIGHTS.get(name))
    m = re.fullmatch(r"([TUVZQ])(\d+)", name)
    if m and m.group(1) in _LEVELS:
        units, std, long = _LEVELS[m.group(1)]
        lev = float(m.group(2))
        return ChannelInfo(name, units, f"{long} at {m.group(2)} hPa", std, lev)
    return ChannelInfo(name, None, name)
