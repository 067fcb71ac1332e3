"""The demos: observing-system experiments on an exact Gaussian prior (image and video window).

Imports only from lower layers (verification and below).
"""

# the public names of the former module jaxguide.demo
from jaxguide.demo.experiment import (  # noqa: F401
    CBOTTLE_CENTER,
    CBOTTLE_SCALE,
    DemoConfig,
    METHODS,
    STAGES,
    at_observations,
    build_prior,
    climatology_k,
    model_of,
    observation_scores,
    posterior_scores,
    prepare_out_dir,
    prior_sha256,
    regression_scale,
    run_demo,
    sample_method,
    stage_clock,
    summary_rows,
    truth_scores,
)
