import textwrap

import pytest

from agent.errors import UserError
from agent.policy.jurisdictions import Jurisdictions
from agent.policy.load import load_policies

J = Jurisdictions.load()


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(path):
    with pytest.raises(UserError) as e:
        load_policies(path, J)
    return e.value.problems


def test_every_problem_is_reported_with_file_line_and_path(tmp_path):
    write(tmp_path, "bad.yaml", """\
        version: 1
        name: bad-policy
        home: [EU]
        allow:
          jurisdictions: [EEA, EUU]
          networks: [10.0.0.0/33]
        exceptions:
          - id: x
            basis: scc
            reference: r
            owner: o
            destinations: {jurisdictions: [US]}
            from: 2026-01-01
            expires: 2025-01-01
        """)
    write(tmp_path, "worse.yaml", """\
        version: 2
        name: Worse Name
        home: []
        severity: extreme
        """)
    got = problems(tmp_path)
    text = "\n".join(got)
    assert "bad.yaml:5: allow.jurisdictions[1]: unknown jurisdiction 'EUU' (did you mean 'EU'?)" in text
    assert "bad.yaml:6: allow.networks[0]: '10.0.0.0/33' is not an IP network (CIDR)" in text
    assert "bad.yaml:14: exceptions[0].expires: expires 2025-01-01 is not after from 2026-01-01" in text
    assert "worse.yaml:1: version:" in text and "worse.yaml:4: severity:" in text
    assert "worse.yaml:2: name:" in text and "worse.yaml:3: home:" in text
    assert len(got) == 7


def test_norway_is_not_false(tmp_path):
    p = write(tmp_path, "no.yaml", """\
        version: 1
        name: nordic
        home: [NO]
        allow: {jurisdictions: [NO, IS]}
        """)
    (pol,) = load_policies(p, J)
    assert pol.home == ("NO",) and pol.allow.jurisdictions == ("NO", "IS")


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "broken.yaml", "version: 1\nname: [x\n")
    assert any("broken.yaml:3:1: invalid YAML" in x or "broken.yaml:" in x for x in problems(p))


def test_duplicate_names_and_empty_policy(tmp_path):
    body = "version: 1\nname: same\nhome: [EU]\nallow: {jurisdictions: [EU]}\n"
    write(tmp_path, "a.yaml", body)
    write(tmp_path, "b.yaml", body)
    write(tmp_path, "c.yaml", "version: 1\nname: toothless\nhome: [EU]\n")
    text = "\n".join(problems(tmp_path))
    assert "policy 'same' is already defined" in text
    assert "toothless" not in text or "can never be violated" in text


def test_home_token_and_test_files_skipped(tmp_path):
    write(tmp_path, "h.yaml", "version: 1\nname: h\nhome: [DE]\nallow: {jurisdictions: [HOME, AT]}\n")
    write(tmp_path, "h.test.yaml", "cases: []\n")
    (pol,) = load_policies(tmp_path, J)
    assert pol.allow.jurisdictions == ("DE", "AT")


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such policy file"):
        load_policies(tmp_path / "nope", J)


def test_shipped_policies_load_and_carry_sha256():
    pols = load_policies("policies", J)
    assert {p.name for p in pols} == {"gdpr-personal-data", "pipl-personal-information", "sovereign-operator",
                                      "device-phone-home"}
    assert all(len(p.sha256) == 64 for p in pols)


def test_hostname_patterns(tmp_path):
    p = write(tmp_path, "h.yaml", """\
        version: 1
        name: h
        home: [EU]
        allow:
          hostnames: ["api*.example.eu", "*.*.example", "ok.example", "a..b"]
        """)
    probs = "\n".join(map(str, problems(p)))
    assert "h.yaml:5: allow.hostnames[0]: bad hostname pattern" in probs
    assert "'api*.example.eu': a pattern is an exact name or '*.suffix'" in probs
    assert "'*.*.example': only a leading '*.' is allowed" in probs
    assert "ok.example" not in probs and "a..b" in probs


def test_hostnames_match_in_any_idna_form(tmp_path):
    from agent.names.hostnames import canonical

    p = write(tmp_path, "h.yaml", """\
        version: 1
        name: h
        home: [EU]
        allow:
          hostnames: ["*.BÜCHER.example", "xn--caf-dma.example"]
        """)
    (pol,) = load_policies(p, J)
    star, exact = pol.allow.hostnames
    assert star.matches(canonical("shop.bücher.example")) and star.matches("a.b.xn--bcher-kva.example")
    assert not star.matches("xn--bcher-kva.example")  # *.suffix is what is under it, not the suffix
    assert exact.matches(canonical("Café.example.")) and not exact.matches("www.xn--caf-dma.example")


def test_policy_check_warns_on_look_alike_host_names(cli, tmp_path):
    """`pаypal.example` with a Cyrillic а never matches paypal.example: policy check says so."""
    (tmp_path / "p.yaml").write_text("version: 1\nname: p\nhome: [EU]\nallow:\n  jurisdictions: [EU]\n"
                                     "  hostnames: [\"p\u0430ypal.example\", \"b\u00fccher.example\"]\n"
                                     "deny:\n  hostnames: [\"*.\u0430\u0440\u0440\u04cf\u0435.com\"]\n")
    r = cli("policy", "check", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "allow.hostnames: 'p\u0430ypal.example': label 'p\u0430ypal' mixes scripts (Cyrillic, Latin)" in r.stderr
    assert "deny.hostnames: '*.\u0430\u0440\u0440\u04cf\u0435.com': label" in r.stderr and "look Latin" in r.stderr
    assert "b\u00fccher" not in r.stderr  # one script (Latin with a diacritic): no warning


def test_a_schema_error_does_not_hide_the_semantic_ones(tmp_path):
    """`severity: hgih` (the schema's) and `EU-ADEQATE`, `/33` (the semantic checks') are reported
    together; an unknown key is reported at its own line, not its mapping's."""
    (tmp_path / "p.yaml").write_text(
        "version: 1\nname: p\nhome: [EU]\nseverity: hgih\nallow:\n  jurisdictions: [EU-ADEQATE]\n"
        "  networks: [10.0.0.0/33]\n  colour: red\n")
    with pytest.raises(UserError) as e:
        load_policies(tmp_path / "p.yaml", J)
    text = "\n".join(e.value.problems)
    assert "p.yaml:4: severity:" in text
    assert "p.yaml:6: allow.jurisdictions[0]: unknown jurisdiction 'EU-ADEQATE'" in text
    assert "p.yaml:7: allow.networks[0]: '10.0.0.0/33' is not an IP network" in text
    assert "p.yaml:8: allow.colour: unknown key 'colour'" in text


def test_enforce_modes(tmp_path):
    """`enforce: dry-run` and `refuse` load; refuse with a selector the kernel cannot see (process,
    unit, container) is refused at load with its place."""
    base = "version: 1\nname: {n}\nhome: [EU]\nallow: {{jurisdictions: [EEA]}}\n"
    write(tmp_path, "a.yaml", base.format(n="dry") + "enforce: dry-run\n")
    (p,) = load_policies(tmp_path, J)
    assert p.enforce == "dry-run"
    write(tmp_path, "b.yaml", base.format(n="hard") + "enforce: refuse\napplies_to: {processes: [curl]}\n")
    (msg,) = problems(tmp_path)
    assert "b.yaml:6: applies_to.processes: a policy with enforce: refuse cannot select by processes" in msg
    write(tmp_path, "b.yaml", base.format(n="hard") + "enforce: refuse\napplies_to: {users: [root]}\n")
    assert sorted(p.enforce for p in load_policies(tmp_path, J)) == ["dry-run", "refuse"]
    write(tmp_path, "b.yaml", base.format(n="hard"))
    assert [p.enforce for p in sorted(load_policies(tmp_path, J), key=lambda p: p.name)] == ["dry-run", "observe"]


def test_a_policy_folder_that_cannot_be_read_is_a_clear_error(tmp_path, monkeypatch):
    """Permission denied on the folder itself (a service user, a 0700 folder) is exit 2, not a traceback."""
    from pathlib import Path

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", denied)
    with pytest.raises(UserError, match=r"cannot read the policies \(Permission denied\)"):
        load_policies(tmp_path, J)
