"""Fair turns under random sequences of what queues, starts, ends, cancels and retries jobs,
and of the previous release's CREATE beside today's (tests/fair_model.py): a tenant's new job
never goes before (or ties) its own older jobs that wait; a tenant with nothing waiting goes
behind at most two of each other tenant's; waiting sets hold no ended job; turns stay below
LINES; turns of cancelled jobs are given back. A failure prints its shrunk sequence."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from tests.fair_model import gen_ops, run, shrink

pytestmark = pytest.mark.redis
SEEDS = int(os.environ.get("FAIR_SEEDS", "6"))
STEPS = int(os.environ.get("FAIR_STEPS", "300"))


@pytest.mark.parametrize("realistic", [True, False], ids=["realistic", "chaotic"])
@pytest.mark.parametrize("old_rate", [0.0, 0.15], ids=["new-only", "mixed"])
async def test_fair_model(real_stack: Any, realistic: bool, old_rate: float) -> None:
    stack, _ = await real_stack()
    redis = stack.redis
    found: dict[str, tuple[int, list]] = {}
    total = 0
    for seed in range(SEEDS):
        ops = gen_ops(random.Random(seed), STEPS, old_rate, realistic)
        w = await run(redis, ops, realistic, stop_first=False)
        total += len(ops)
        for v in w.violations:
            key = " ".join(v.split(" ")[:2])
            found.setdefault(key, (seed, ops))
        print(f"seed {seed}: {len(w.violations)} violations, jobs {len(w.jobs)}")
    report = []
    for key, (seed, ops) in found.items():
        small = await shrink(redis, ops, realistic, key)
        w = await run(redis, small, realistic, stop_first=False)
        report.append(
            f"== {key} (seed {seed}): {len(small)} ops\n"
            + "\n".join(w.log)
            + "\n"
            + "\n".join([v for v in w.violations if v.startswith(key)][:3])
        )
    print(f"steps {total}")
    print("\n".join(report))
    assert not found, "\n".join(report)
