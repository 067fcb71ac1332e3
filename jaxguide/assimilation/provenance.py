"""Provenance of an analysis: the attributes that say how it was made (method and its
options, sampler, seed, the model's checksum, the command).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxguide.assimilation.dataset import describe_sigma_y
from jaxguide.assimilation.settings import SEED_RULE, AssimilationSettings


def run_provenance(settings: AssimilationSettings, model, command: str, **specific) -> dict[str, Any]:
    """The provenance attributes of an analysis (method and its options, sigma_y, sampler,
    seed and the rule that turns it into keys, model checksum, command), plus the run's ``specific`` entries."""
    method = settings.guidance_method()
    prov = {
        "method": settings.method_name,
        "sigma_y": describe_sigma_y(settings.sigma_y),
        "guidance_scale": float(np.asarray(getattr(method, "scale", 1.0))),
        "steps": settings.steps,
        "seed": settings.seed,
        "seed_rule": SEED_RULE,
        "model_sha256": model_sha256(model),
        "command": command,
        "sigma_min": settings.sigma_min,
        "sigma_max": settings.sigma_max,
        "label": settings.label,
        "observation_window_hours": settings.window_hours,
        "observation_operator": settings.interpolation,  # jaxguide evaluate samples with the same scheme
        **specific,
    }
    for k, v in method.options().items():
        if k != "scale":
            prov[k] = str(v).lower() if isinstance(v, bool) else v
    if settings.bf16:
        prov["network_dtype"] = "bfloat16"
    return prov


def model_sha256(model) -> str:
    """sha256 of the source checkpoint(s) the model was converted from (comma separated)."""
    sources = (getattr(model, "metadata", None) or {}).get("sources", [])
    return ",".join(s["sha256"] for s in sources) if sources else "unknown"
