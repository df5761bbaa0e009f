"""The sharded agreement: every value the ranks must agree on, made to
differ on one rank while each rank's own checks pass.

A sharded step computes each rank's pieces locally and then gathers them, so
ranks that differ in the gradient leaves (the layout), the options, the state
dtype, the bucket size (the gathers' sizes), the step count (the bias
correction's t) or the learning rate would hang in a collective or silently
join pieces computed differently. Each such step must fail on every rank with
the same ShardedStepError naming the ranks that disagree, change nothing, and
leave the ranks able to step together again (as the unsharded optimizer).
Launched: 2 and 3 ranks, every case of a rank count in one launch.
"""

from __future__ import annotations

import pytest

from test_distributed import launch

CASES = {  # ranks: [(what differs, on which rank)]
    2: [("leaves", 1), ("options", 1), ("state_dtype", 0), ("bucket_bytes", 1), ("step", 1), ("learning_rate", 0)],
    3: [("leaves", 2), ("options", 0), ("step", 1), ("bucket_bytes", 2)],
}


@pytest.mark.parametrize("n", [2, 3])
def test_a_rank_that_differs_fails_every_rank_and_changes_nothing(tmp_path, n):
    cases = [{"what": what, "bad_rank": bad} for what, bad in CASES[n]]
    for (what, bad), reports in zip(CASES[n], launch(n, "disagree", cases, tmp_path)):
        differ = [bad] if bad else list(range(1, n))
        messages = {r["error"]["message"] if r["error"] else None for r in reports}
        assert len(messages) == 1, (what, messages)  # the same error on every rank
        (message,) = messages
        assert message is not None, f"{what}: no rank raised"
        assert f"rank(s) {differ} disagree with rank 0" in message, (what, message)
        assert message.endswith("nothing changed on any rank"), message
        for rank, report in enumerate(reports):
            assert report["error"]["type"] == "ShardedStepError"
            assert sorted(int(r) for r in report["error"]["rank_errors"]) == differ
            assert report["unchanged"], (what, rank)
            assert report["equal_unsharded_after"], (what, rank)
            assert report["step"] == (2 if what in ("step", "learning_rate") else 1), (what, rank)
