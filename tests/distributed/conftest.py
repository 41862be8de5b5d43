"""The spawned rank groups of tests/distributed: one per (group size, backend) and session.

``rank_results(world, backend="gloo")`` runs every check registered for ``world`` ranks
(``distributed_testing.register_checks``) in one spawned group, the first time a test asks, and
returns their :class:`distributed_testing.RankResults`.
"""

from __future__ import annotations

import pytest
from distributed_testing import RankResults, registered_checks, run_ranks


@pytest.fixture(scope="session")
def rank_results(request):
    cache: dict[tuple[int, str], RankResults] = {}

    def get(world: int, backend: str = "gloo") -> RankResults:
        if (world, backend) not in cache:
            cache[world, backend] = run_ranks(world, registered_checks(world, backend), backend=backend)
        return cache[world, backend]

    yield get
    if request.config.getoption("verbose") > 0:  # -v: where the time of each spawned group went
        for (world, backend), res in cache.items():
            times = ", ".join(f"{n.split('.check_')[-1]} {s:.1f}" for n, s in res.seconds.items())
            print(f"\n{world} {backend} ranks: {res.wall_s:.1f} s in all; checks (s): {times}")
