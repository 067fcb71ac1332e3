"""Library defaults that must not hurt (issue 21, item 7)."""

from __future__ import annotations

import campaign_case as case

from jaxguide.assimilation.session import Session


def test_session_does_not_report_progress_by_default():
    """No host callback in every denoiser call unless asked for (it syncs the host and keeps
    the programs out of the persistent compilation cache)."""
    assert Session(case.model()).report_progress is False
    assert Session(case.model(), report_progress=True).report_progress is True


def test_a_diverged_run_is_stopped_and_names_guidance_scale(tmp_path):
    """Uncapped regression at scale 1 diverges to huge but finite values (~1e8 K here):
    the run stops with an error naming --guidance-scale and writes nothing, instead of
    writing a file of garbage (the capped default stays bounded: tests/test_guidance.py)."""
    import pytest

    from jaxguide.assimilation.settings import AssimilationSettings
    from jaxguide.diffusion import guidance

    session = Session(case.model())
    bad = AssimilationSettings(method=guidance.Regression(scale=1.0, cap=False), members=2, prior_members=0, steps=3,
                               drop_bad=True)
    with pytest.raises(FloatingPointError, match="diverged.*--guidance-scale"):
        session.assimilate(case.table(), tmp_path / "a.nc", time=case.TIMES[1], settings=bad)
    assert not (tmp_path / "a.nc").exists()
