"""Library defaults that must not hurt (issue 21, item 7)."""

from __future__ import annotations

import campaign_case as case

from jaxguide.assimilation.session import Session


def test_session_does_not_report_progress_by_default():
    """No host callback in every denoiser call unless asked for (it syncs the host and keeps
    the programs out of the persistent compilation cache)."""
    assert Session(case.model()).report_progress is False
    assert Session(case.model(), report_progress=True).report_progress is True
