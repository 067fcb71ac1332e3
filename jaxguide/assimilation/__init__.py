"""One assimilation run: settings, the session of compiled programs, video windows,
provenance and the analysis dataset (CF layout).

Imports only from lower layers (observations, diffusion, model, grid, io).

Modules: :mod:`~jaxguide.assimilation.settings` (options, the run's inputs),
:mod:`~jaxguide.assimilation.session` (a model and its compiled programs),
:mod:`~jaxguide.assimilation.windows` (the window plan and its runs),
:mod:`~jaxguide.assimilation.analysis` (one analysis: checks, summary, file),
:mod:`~jaxguide.assimilation.provenance`, :mod:`~jaxguide.assimilation.pipeline`
(:func:`assimilate`), :mod:`~jaxguide.assimilation.dataset` (the file's layout),
:mod:`~jaxguide.assimilation.known_frames`.
"""

from jaxguide.assimilation.analysis import observation_rmse, output_format, run_analysis  # noqa: F401
from jaxguide.assimilation.pipeline import assimilate  # noqa: F401
from jaxguide.assimilation.provenance import model_sha256, run_provenance  # noqa: F401
from jaxguide.assimilation.session import Session, as_denoiser_model  # noqa: F401
from jaxguide.assimilation.settings import (  # noqa: F401
    CBOTTLE_SAMPLER,
    AnalysisInputs,
    AssimilationSettings,
    denoiser_calls,
)
from jaxguide.assimilation.windows import WindowPlan, plan_windows, run_windows  # noqa: F401
