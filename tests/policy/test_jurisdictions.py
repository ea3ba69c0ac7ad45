from datetime import date

import pytest

from agent.errors import UserError
from agent.policy.jurisdictions import ISO3166, Jurisdictions

J = Jurisdictions.load()


def members(group, at):
    return {cc for cc in ISO3166 if (m := J.membership(group, cc, at)) and m.condition is None}


def test_eu_has_27_members_today_and_28_before_brexit():
    assert len(members("EU", date(2025, 1, 1))) == 27
    assert len(members("EU", date(2019, 1, 1))) == 28
    assert len(members("EU", date(2013, 6, 30))) == 27  # before Croatia


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
    (tmp_path / "X.yaml").write_text("name: X\nmembers:\n  - {country: ZZ, from: 2020-01-01, source: s}\n")
    with pytest.raises(UserError) as e:
        Jurisdictions.load([tmp_path])
    assert "members[0].country: 'ZZ'" in str(e.value)
