"""The production preset: token counts that grow with the parent, and a plan that fits 8xH100 for 8B and 70B."""

from __future__ import annotations

import pytest

from puzzle.search import SearchConfig, resolve

@pytest.mark.parametrize("model, bld_millions, gkd_billions", [("llama-3.1-8b", (110, 120), (4.9, 5.4)),
                                                               ("llama-3.1-70b", (990, 1020), (44.5, 46))])
def test_the_production_preset_grows_with_the_parent_and_fits_8xh100(model, bld_millions, gkd_billions):
    from puzzle.search.settings import BLD_PER_BILLION, CHILD_BLD_PER_BILLION, GKD_PER_BILLION
    from puzzle.summary import totals

    plan = resolve(SearchConfig(model=model, cluster="8xH100", preset="production"))
    params = totals(plan.parent_config).params
    assert plan.value("bld_tokens") == BLD_PER_BILLION.of(params)
    assert bld_millions[0] <= plan.value("bld_tokens") / 1e6 <= bld_millions[1]  # about 1B tokens for a 70B parent
    assert plan.value("child_bld_tokens") == CHILD_BLD_PER_BILLION.of(params)
    assert plan.value("gkd_steps") == GKD_PER_BILLION.of(params)
    gkd_tokens = plan.value("gkd_steps") * plan.value("gkd_batch") * plan.value("quality_context")
    assert gkd_billions[0] <= gkd_tokens / 1e9 <= gkd_billions[1]  # 45B tokens for a 70B parent (Nemotron-51B)
    assert (plan.value("finalists"), plan.value("child_refit"), plan.value("gkd_top_k")) == (8, True, 0)
    assert plan.notes == ()  # nothing switched off
    assert plan.resources.fits, plan.resources.problem
    for stage in plan.resources.stages:
        assert all(r.device_bytes <= 80e9 for r in stage.ranks), stage.stage
    assert plan.resources.seconds > 24 * 3600  # days of GKD, not the 6 minutes of the full preset
