"""The small campaign shared by tests/test_campaign.py and the processes it starts.

A Gaussian-prior model (the exact denoiser of :mod:`jaxguide.model.gaussian`, nside 8, two
channels with physical center/scale) stands in for cBottle: it satisfies the denoiser
contract and compiles in seconds. Four analysis times 6 h apart; the observations of the
third are all rejected (latitude 100), so every run also records a skipped time.
Everything is deterministic, so separate processes build identical inputs.

Run as a script it is one campaign process:
``python campaign_case.py STORE [--coordinator H:P --process-id I] [--sleep S] [--fail-at TIME]``
(``--fail-at``: an injected fault, a RuntimeError when the model is asked for TIME's
conditioning: an error that is not about the time's data).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NSIDE = 8
CHANNELS = ("T850", "T500")
CENTER = np.array([281.13, 258.50])
SCALE = np.array([12.34, 10.94])
TIMES = pd.date_range("2020-01-01T00", periods=4, freq="6h")


def model():
    from jaxguide.model import gaussian

    prior = gaussian.make_prior(NSIDE, [0.3, -0.2], [0.8, 0.6], [[1.0, 0.6], [0.6, 1.0]], 2500.0, max_modes=48)
    return gaussian.GaussianModel(prior, CHANNELS, CENTER, SCALE, NSIDE)


def table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for k, t in enumerate(TIMES):
        m = 10 * (k + 1)  # 10, 20, 30, 40: padding buckets 32 and 64 (the campaign pads all to 64)
        rows.append(pd.DataFrame({
            "time": t + pd.to_timedelta(rng.integers(-60, 60, m), unit="min"),
            "lat": 100.0 if k == 2 else rng.uniform(-70, 70, m),
            "lon": rng.uniform(0, 360, m), "variable": np.array(CHANNELS)[np.arange(m) % 2],
            "value": rng.normal(270, 8, m), "sigma": 1.0}))
    return pd.concat(rows, ignore_index=True)


def settings(**over):
    from jaxguide.assimilation.settings import AssimilationSettings

    base = dict(method="dps", guidance_scale=0.5, members=2, prior_members=2, steps=3, seed=11, drop_bad=True)
    return AssimilationSettings(**{**base, **over})


def main(argv=None) -> None:
    import argparse
    import time

    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--coordinator")
    p.add_argument("--process-id", type=int)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--fail-at")
    a = p.parse_args(argv)
    from jaxguide.campaign.distributed import ProcessInfo, initialize

    info = ProcessInfo()
    if a.coordinator:
        info = initialize(coordinator=a.coordinator, num_processes=2, process_id=a.process_id)
    from jaxguide.campaign.run import assimilate_campaign

    def slow(p):
        print(f"done {p.done}/{p.total} {p.time}", flush=True)
        time.sleep(a.sleep)

    m = model()
    if a.fail_at:
        fail_at, conditioning = pd.Timestamp(a.fail_at), m.conditioning

        def faulty(t, **kw):
            if t == fail_at:
                raise RuntimeError(f"injected fault at {t}")
            return conditioning(t, **kw)

        object.__setattr__(m, "conditioning", faulty)  # a frozen dataclass: this instance only
    assimilate_campaign(m, table(), a.store, TIMES, settings(), resume=True, process=info, progress=slow)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
