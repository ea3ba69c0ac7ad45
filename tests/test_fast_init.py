"""`flow.fast_init`: the cheaper __init__ builds the same frozen records as the generated one."""

from __future__ import annotations

import dataclasses

import pytest

from agent.flow import Flow, Location, Verdict, Who, fast_init


def _generated(cls):
    """The class as `@dataclass(frozen=True, slots=True)` alone would make it (generated __init__)."""
    ns = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    ns["__annotations__"] = {f.name: f.type for f in dataclasses.fields(cls)}
    return dataclasses.dataclass(frozen=True, slots=True)(type(cls.__name__, (), ns))


@pytest.mark.parametrize("cls", [Flow, Location, Verdict, Who])
def test_same_fields_as_the_generated_init(cls):
    plain = _generated(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    args = {n: f"v-{n}" for n in required}
    for kwargs in (args, {n: i for i, n in enumerate(names)}):
        ours, theirs = cls(**kwargs), plain(**kwargs)
        assert type(ours) is cls
        assert [getattr(ours, n) for n in names] == [getattr(theirs, n) for n in names]
    positional = list(range(len(names)))
    assert [getattr(cls(*positional), n) for n in names] == positional
    with pytest.raises(TypeError):
        cls(*positional, "one too many")
    if required:
        with pytest.raises(TypeError):
            cls()


def test_records_stay_frozen_hashable_and_replaceable():
    f = Flow(17, "192.0.2.1", 5000, "198.51.100.7", 443, bytes=80)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.dport = 80
    assert f == Flow(17, "192.0.2.1", 5000, "198.51.100.7", 443, bytes=80)
    assert hash(f) == hash(Flow(17, "192.0.2.1", 5000, "198.51.100.7", 443, bytes=80))
    g = dataclasses.replace(f, hostname="example.org")
    assert (type(g), g.hostname, g.bytes, f.hostname) == (Flow, "example.org", 80, None)


def test_default_factories_are_refused():
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="default_factory"):
        fast_init(WithFactory)
