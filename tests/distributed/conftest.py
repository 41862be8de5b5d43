"""The spawned rank groups of tests/distributed: one per (group size, backend) and session.

``rank_results(world, backend="gloo")`` runs every check registered for ``world`` ranks
(``distributed_testing.register_checks``) in one spawned group, the first time a test asks, and
returns their :class:`distributed_testing.RankResults`.
"""

from __future__ import annotations

import pytest
from distributed_testing import RankResults, registered_checks, run_ranks


@pytest.fixture(scope="session")
def rank_results():
    cache: dict[tuple[int, str], RankResults] = {}

    def get(world: int, backend: str = "gloo") -> RankResults:
        if (world, backend) not in cache:
            cache[world, backend] = run_ranks(world, registered_checks(world), backend=backend)
        return cache[world, backend]

    return get
