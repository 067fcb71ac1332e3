"""The cBottle model: config, the U-Net in Flax (layers, embedding, unet, precond, and inputs:
the conditioning pytree a forward takes), loading converted checkpoints (checkpoint),
conditioning inputs (calendar, labels, sst, and conditioning: video frames and the assembled
pytree), the denoiser contract (denoiser), the exact Gaussian model of tests and the demo
(gaussian), the converter (convert).

Imports only from jaxguide.grid and jaxguide.io.
"""

# the public names of the former module jaxguide.model
from jaxguide.model.checkpoint import (  # noqa: F401
    CBottleModel,
    FORMAT_VERSION,
    METADATA_FILE,
    ModelLoadError,
    PARAMS_DIR,
    count_params,
    expert_index,
    graphdef_and_shapes,
    init_params,
    load_model,
    make_apply,
    sha256_file,
)
