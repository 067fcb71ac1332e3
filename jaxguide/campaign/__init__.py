"""Campaigns: many analysis times in one resumable store, over one or several processes.

Imports only from lower layers (assimilation and below).
"""

# the public names of the former module jaxguide.campaign
from jaxguide.campaign.run import (  # noqa: F401
    ANALYSED,
    CampaignProgress,
    SKIPPED,
    assimilate_campaign,
    campaign_settings,
)
