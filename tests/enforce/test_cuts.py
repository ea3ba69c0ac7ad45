"""Cuts of the embedded registration data (no listing: probed), and the refuse sets built on the
embedded default, against the engine."""

import ipaddress
import random
from bisect import bisect_right

import iptocc
import pytest

from agent.config import Config
from agent.enforce.compile import compile_plan
from agent.enforce.cuts import embedded_v4_cuts, location_cuts
from agent.flow import Flow, Outcome
from agent.judge.build import build_pipeline


@pytest.fixture(scope="module")
def cuts():
    return embedded_v4_cuts()


def _sample(n, seed):
    rnd = random.Random(seed)
    return [rnd.getrandbits(32) for _ in range(n)]


def test_every_piece_has_one_registration_country(cuts):
    xs = _sample(300_000, 11)
    starts = [cuts[bisect_right(cuts, x) - 1] for x in xs]
    text = lambda n: str(ipaddress.IPv4Address(n))  # noqa: E731
    here = iptocc.country_code([text(x) for x in xs])
    there = iptocc.country_code([text(s) for s in starts])
    wrong = [(text(x), a, b) for x, a, b in zip(xs, here, there, strict=True) if a != b]
    assert not wrong, wrong[:5]
    assert len(cuts) > 50_000  # the registries' runs, not a handful of /8s


def test_refuse_sets_on_the_embedded_default(tmp_path, cuts):
    (tmp_path / "p.yaml").write_text("version: 1\nname: reg\nhome: [EU]\nenforce: refuse\n"
                                     "registration_as_location: true\nallow: {jurisdictions: [EEA, EU-ADEQUATE]}\n")
    pipe = build_pipeline(Config(policies=str(tmp_path), local_nets=("192.0.2.0/24",)))
    c = location_cuts(pipe.locator)
    assert c.listable == frozenset({4})
    plan = compile_plan(pipe, pipe.policies, [], c)
    assert plan.warnings and "IPv6" in plan.warnings[0] and plan.policies[0].dst[6] == []
    spans = plan.policies[0].dst[4]
    for x in _sample(3000, 5):
        dst = str(ipaddress.IPv4Address(x))
        v = pipe.judge(Flow(6, "192.0.2.1", 40000, dst, 443, first_seen=1.8e9)).verdicts[0]
        i = bisect_right(spans, (x, 1 << 33)) - 1
        assert (i >= 0 and spans[i][0] <= x <= spans[i][1]) == (v.outcome == Outcome.VIOLATION), (dst, v)
