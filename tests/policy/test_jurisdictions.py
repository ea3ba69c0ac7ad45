from datetime import date

import pytest

from agent.errors import UserError
from agent.policy.jurisdictions import ISO3166, Jurisdictions

J = Jurisdictions.load()


def members(group, at):
    return {cc for cc in ISO3166 if (m := J.membership(group, cc, at)) and m.condition is None}


# Parts of member states with their own ISO code (outermost regions, Åland, Gibraltar until Brexit)
TERRITORIES_2025 = {"GP", "MQ", "GF", "RE", "MF", "YT", "AX"}


def test_eu_has_27_members_today_and_28_before_brexit():
    assert len(members("EU", date(2025, 1, 1)) - TERRITORIES_2025) == 27
    assert len(members("EU", date(2019, 1, 1)) - TERRITORIES_2025 - {"GI"}) == 28
    assert len(members("EU", date(2013, 6, 30)) - TERRITORIES_2025 - {"GI"}) == 27  # before Croatia
    assert members("EU", date(2025, 1, 1)) & TERRITORIES_2025 == TERRITORIES_2025
    assert "YT" not in members("EU", date(2013, 12, 31)) and "BL" in members("EU", date(2011, 12, 31))
    assert "BL" not in members("EU", date(2012, 1, 1)) and "PF" not in members("EU", date(2025, 1, 1))


def test_gb_left_the_eu_on_2020_01_31():
    assert J.membership("EU", "GB", date(2020, 1, 31))
    assert J.membership("EU", "GB", date(2020, 2, 1)) is None


def test_eea_is_eu_plus_three():
    today = date(2025, 1, 1)
    assert members("EEA", today) == members("EU", today) | {"IS", "LI", "NO"}


def test_adequacy_dates_and_conditional_entries():
    assert J.membership("EU-ADEQUATE", "JP", date(2018, 12, 31)) is None
    assert J.membership("EU-ADEQUATE", "JP", date(2019, 1, 23)).condition is None
    dpf = J.membership("EU-ADEQUATE", "US", date(2024, 1, 1))
    assert "Data Privacy Framework" in dpf.condition
    assert J.membership("EU-ADEQUATE", "US", date(2021, 1, 1)) is None  # Schrems II to DPF: nothing
    assert "Privacy Shield" in J.membership("EU-ADEQUATE", "US", date(2017, 1, 1)).condition
    assert "US" not in J.groups_of("US", date(2024, 1, 1)) and "EU-ADEQUATE" not in J.groups_of("US", date(2024, 1, 1))


def test_cn_mainland_excludes_hk_mo_tw():
    at = date(2025, 1, 1)
    assert J.membership("CN-MAINLAND", "CN", at)
    assert not any(J.membership("CN-MAINLAND", cc, at) for cc in ("HK", "MO", "TW"))


def test_every_entry_cites_a_source():
    for g in J.groups.values():
        assert g.source
        assert all(m.source for m in g.members)


def test_iso_codes_are_jurisdictions_and_suggestions():
    assert J.known("DE") and J.known("EU") and not J.known("EUU")
    assert J.suggest("EUU") == "EU"


def test_bad_group_file_is_reported(tmp_path):
    (tmp_path / "X.yaml").write_text("name: X\nreviewed: 2026-01-01\nmembers:\n"
                                     "  - {country: ZZ, from: 2020-01-01, source: s}\n")
    with pytest.raises(UserError) as e:
        Jurisdictions.load([tmp_path])
    assert "members[0].country: 'ZZ'" in str(e.value)


def test_uk_transition_bridge_adequacy_and_sunset():
    """Withdrawal Agreement arts. 126-127, TCA art. FINPROV.10A, Decision (EU) 2021/1772 to 2031-12-27."""
    for day in (date(2020, 2, 1), date(2020, 12, 31), date(2021, 1, 1), date(2021, 6, 27), date(2021, 6, 28),
                date(2031, 12, 27)):
        assert "EU-ADEQUATE" in J.groups_of("GB", day), day
    assert "EU-ADEQUATE" not in J.groups_of("GB", date(2031, 12, 28))
    assert "EU" in J.groups_of("GB", date(2020, 1, 31)) and "EU" not in J.groups_of("GB", date(2020, 2, 1))


def test_brazil_adequacy_from_2026_01_26():
    assert J.membership("EU-ADEQUATE", "BR", date(2026, 1, 25)) is None
    assert "2026/179" in J.membership("EU-ADEQUATE", "BR", date(2026, 1, 26)).source


def test_every_group_says_when_it_was_reviewed(tmp_path):
    assert all(g.reviewed for g in J.groups.values())
    (tmp_path / "X.yaml").write_text("name: X\nmembers: []\n")
    with pytest.raises(UserError) as e:
        Jurisdictions.load([tmp_path])
    assert "reviewed:" in str(e.value)


def test_jurisdictions_command(cli):
    import json

    r = cli("jurisdictions", "EU-ADEQUATE", "--at", "2020-06-01", "--format", "json")
    assert r.returncode == 0, r.stderr
    (g,) = json.loads(r.stdout)
    gb = [m for m in g["members"] if m["country"] == "GB"]
    assert g["reviewed"] and len(gb) == 1 and "FINPROV.10A" in gb[0]["source"] and gb[0]["until"] == "2021-06-28"
    assert "BR" not in {m["country"] for m in g["members"]}
    bad = cli("jurisdictions", "EU-ADEQUAT")
    assert bad.returncode == 2 and "did you mean EU-ADEQUATE" in bad.stderr


def test_uk_and_swiss_adequacy_groups():
    def uk(cc, day):
        return "UK-ADEQUATE" in J.groups_of(cc, day)

    assert uk("FR", date(2021, 1, 1)) and not uk("FR", date(2020, 12, 31))
    assert uk("KR", date(2022, 12, 19)) and not uk("KR", date(2022, 12, 18))
    assert "Extension" in J.membership("UK-ADEQUATE", "US", date(2024, 1, 1)).condition
    assert "CH-ADEQUATE" in J.groups_of("GB", date(2023, 9, 1)) and "CH-ADEQUATE" in J.groups_of("DE", date(2024, 1, 1))
    assert "CH-ADEQUATE" not in J.groups_of("JP", date(2025, 1, 1))
    assert J.membership("CH-ADEQUATE", "US", date(2024, 9, 14)) is None
    assert "Swiss-US" in J.membership("CH-ADEQUATE", "US", date(2024, 9, 15)).condition


def test_croatia_is_in_the_data_protection_area_from_its_accession():
    """A transfer to an EU member is inside the Union from its accession (Directive 95/46, then the
    GDPR, applied there); the EEA Agreement's later date for Croatia stays a fact in the data."""
    assert "EEA" not in J.groups_of("HR", date(2013, 6, 30)) and "EU" not in J.groups_of("HR", date(2013, 6, 30))
    assert {"EU", "EEA"} <= set(J.groups_of("HR", date(2013, 7, 1)))
    (fact,) = [f for f in J.groups["EEA"].facts if f[0] == "HR"]
    assert fact[1] == date(2014, 4, 12) and "OJ L 170" in fact[3]


def test_a_policy_allowing_only_the_eea_allows_croatia_on_its_accession_day(tmp_path):
    from agent.commands.policy_tests import run_test_file

    (tmp_path / "eea-only.yaml").write_text("version: 1\nname: eea-only\nhome: [NO]\nallow:\n  jurisdictions: [EEA]\n")
    (tmp_path / "eea-only.test.yaml").write_text(
        "policy: eea-only.yaml\nlocations:\n  203.0.113.12: {country: HR}\ncases:\n"
        "  - {name: accession day, flow: {dst: 203.0.113.12, time: 2013-07-01}, expect: compliant}\n"
        "  - {name: the day before, flow: {dst: 203.0.113.12, time: 2013-06-30}, expect: violation}\n")
    results = run_test_file(tmp_path / "eea-only.test.yaml", J)
    assert len(results) == 2 and all(r.passed for r in results), results


def test_shipped_files_parse_the_same_with_libyaml_and_the_bounded_loader(tmp_path):
    """`load_shipped` (libyaml, for the package's own files) gives the data `load_file` gives, and
    still refuses a duplicate key and reads `NO` as Norway."""
    import pytest

    from agent import yamlio
    from agent.errors import UserError
    from agent.policy.jurisdictions import DATA_DIR

    files = sorted(DATA_DIR.glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert yamlio.load_shipped(path) == yamlio.load_file(path, "jurisdiction group")[0], path
    odd = tmp_path / "odd.yaml"
    odd.write_text("name: X\nmembers: [{country: NO, from: 2020-01-01}]\nreviewed: 2026-01-01\n")
    assert yamlio.load_shipped(odd)["members"][0]["country"] == "NO"
    odd.write_text("name: X\nname: Y\n")
    with pytest.raises(UserError, match="duplicate key"):
        yamlio.load_shipped(odd)


def test_the_embedded_datas_version_is_the_installed_packages():
    from importlib import metadata

    from agent.enrich.geoip import _iptocc_version

    assert _iptocc_version() == metadata.version("iptocc")
