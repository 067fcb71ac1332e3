"""jaxguide as an earth2studio data-assimilation model (needs the optional
``earth2studio`` package: ``pip install -e '.[earth2studio]'``).

:class:`CBottleDA` satisfies earth2studio's ``AssimilationModel`` protocol
(``earth2studio.models.da.base``, earth2studio 0.19): earth2studio observation frames in,
the analysis ensemble out as an ``xarray.DataArray``, computed by the same function as
``jaxguide assimilate`` (:func:`jaxguide.assimilation.analysis.analysis_dataset`).

``import jaxguide`` never imports this package (nor earth2studio, nor torch).
"""

from jaxguide.earth2studio.model import CBottleDA, jax_devices  # noqa: F401
