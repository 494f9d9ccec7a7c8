"""Routing rules as data: matching, every kind of broken file, and live reload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from saf.routing import (
    DEFAULT_RULES_TOML,
    CaseFacts,
    Priority,
    Rule,
    RulesError,
    RuleSet,
    RulesHolder,
    describe,
    load_rules,
    parse_rules,
)

EXAMPLE = """\
# First match wins; the rule without conditions at the end catches the rest.
[[rule]]
name = "stat-anything-to-er-radiology"
priority = ["stat"]
worklist = "emergency-radiology"

[[rule]]
name = "derm-photos"
modality = ["XC", "OT"]
worklist = "dermatology"

[[rule]]
name = "chest-ct"
modality = ["CT"]
body_part = ["CHEST", "THORAX"]
clinic = ["Clinic A", "Clinic B"]
worklist = "thoracic-radiology"

[[rule]]
name = "requested-cardiology"
requested_specialty = ["cardiology"]
worklist = "cardiology"

[[rule]]
name = "default"
worklist = "general-radiology"
"""

GOOD = """\
[[rule]]
name = "ct"
modality = ["CT"]
worklist = "ct-reading"

[[rule]]
name = "default"
worklist = "general"
"""


def facts(
    modalities: tuple[str, ...] = ("CT",),
    body_parts: tuple[str, ...] = ("CHEST",),
    clinic: str = "Clinic A",
    requested_specialty: str | None = None,
    priority: Priority = "routine",
) -> CaseFacts:
    return CaseFacts(
        modalities=frozenset(modalities),
        body_parts=frozenset(body_parts),
        clinic=clinic,
        requested_specialty=requested_specialty,
        priority=priority,
    )


def broken(text: str) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse_rules(text, source="routing.toml")
    return info.value


# --- routing the example -------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "worklist"),
    [
        # stat beats every other rule, even a perfect chest-CT match
        (facts(priority="stat"), "emergency-radiology"),
        (facts(modalities=("XC",), priority="stat"), "emergency-radiology"),
        # urgent is not stat
        (facts(priority="urgent"), "thoracic-radiology"),
        # a multi-modality study matches on any of its modalities
        (facts(modalities=("MR", "OT"), body_parts=()), "dermatology"),
        (facts(modalities=("PT", "CT")), "thoracic-radiology"),
        # body-part alias: THORAX is listed next to CHEST
        (facts(body_parts=("THORAX",)), "thoracic-radiology"),
        (facts(body_parts=("ABDOMEN",)), "general-radiology"),
        # clinic condition
        (facts(clinic="Clinic B"), "thoracic-radiology"),
        (facts(clinic="Clinic C"), "general-radiology"),
        # requested specialty
        (facts(modalities=("US",), requested_specialty="cardiology"), "cardiology"),
        (facts(modalities=("US",), requested_specialty="neurology"), "general-radiology"),
        # earlier rule wins over requested specialty
        (facts(requested_specialty="cardiology"), "thoracic-radiology"),
        # nothing else matches: default
        (facts(modalities=("MR",), body_parts=("HEAD",), clinic="Clinic Z"), "general-radiology"),
        (facts(modalities=(), body_parts=()), "general-radiology"),
    ],
)
def test_example_routes_each_kind_of_case(case: CaseFacts, worklist: str) -> None:
    assert parse_rules(EXAMPLE).route(case).worklist == worklist


def test_values_are_case_insensitive_on_both_sides() -> None:
    rules = parse_rules(
        """\
[[rule]]
name = "chest"
modality = ["ct"]
body_part = [" thorax "]
clinic = ["clinic  a"]
requested_specialty = ["Cardiology"]
priority = ["URGENT"]
worklist = "chest"

[[rule]]
name = "default"
worklist = "general"
"""
    )
    chest = rules.rules[0]
    assert chest.modality == frozenset({"CT"})
    assert chest.body_part == frozenset({"THORAX"})
    assert chest.requested_specialty == frozenset({"cardiology"})
    assert chest.priority == frozenset({"urgent"})
    case = CaseFacts(
        modalities=frozenset({"Ct"}),
        body_parts=frozenset({"Thorax"}),
        clinic="CLINIC A",
        requested_specialty="CARDIOLOGY",
        priority="Urgent",  # type: ignore[arg-type]  # an upstream system's spelling
    )
    assert rules.route(case).name == "chest"


def test_rule_in_code_validates_like_the_file() -> None:
    rule = Rule(name="ct", worklist="ct", modality=frozenset({"ct"}))
    assert rule.modality == frozenset({"CT"}) and not rule.is_catch_all
    assert Rule(name="x", worklist="x").is_catch_all
    with pytest.raises(RulesError, match="priority"):
        Rule(name="x", worklist="x", priority=frozenset({"asap"}))  # type: ignore[arg-type]
    with pytest.raises(RulesError, match=r'rule "x".*not a valid worklist'):
        Rule(name="x", worklist="X Ray")
    with pytest.raises(RulesError, match="catch-all"):
        RuleSet((rule,))
    with pytest.raises(ValueError, match="priority"):
        facts(priority="soon")  # type: ignore[arg-type]


def test_load_rules_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    rules = load_rules(path)
    assert rules.source == str(path)
    assert [r.name for r in rules.rules][-1] == "default"
    path.write_text(EXAMPLE.replace('["stat"]', '["now"]'), encoding="utf-8")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value).startswith(f'{path} line 4 (rule "stat-anything-to-er-radiology")')


def test_describe_lists_rules_in_order() -> None:
    rows = describe(parse_rules(EXAMPLE))
    assert [r["name"] for r in rows] == [
        "stat-anything-to-er-radiology",
        "derm-photos",
        "chest-ct",
        "requested-cardiology",
        "default",
    ]
    assert rows[2] == {
        "position": 3,
        "name": "chest-ct",
        "modality": ["CT"],
        "body_part": ["CHEST", "THORAX"],
        "clinic": ["Clinic A", "Clinic B"],
        "requested_specialty": [],
        "priority": [],
        "worklist": "thoracic-radiology",
        "catch_all": False,
    }
    assert rows[-1]["catch_all"] is True


# --- broken files: each error names the file, the line and the rule ------------------


def test_toml_syntax_error_names_file_and_line() -> None:
    err = broken(EXAMPLE.replace('modality = ["CT"]', 'modality = ["CT"'))
    assert err.line == 15
    assert str(err).startswith("routing.toml line 15")
    assert "not valid TOML" in str(err)


def test_toml_syntax_error_at_end_of_document() -> None:
    err = broken('[[rule]]\nname = "default"\nworklist = "general\n')
    assert err.line == 3 and str(err).startswith("routing.toml line 3")


def test_unknown_key_names_its_line_and_the_expected_keys() -> None:
    err = broken(EXAMPLE.replace("body_part =", "bodypart ="))
    assert str(err) == (
        'routing.toml line 15 (rule "chest-ct"): unknown key "bodypart" (expected one of: '
        "body_part, clinic, modality, name, priority, requested_specialty, worklist); "
        'did you mean "body_part"?'
    )


def test_unknown_top_level_key() -> None:
    err = broken('routes = 1\n\n[[rule]]\nname = "default"\nworklist = "general"\n')
    assert err.line == 1 and 'unknown top-level key "routes"' in str(err)


def test_string_instead_of_list() -> None:
    err = broken(EXAMPLE.replace('modality = ["XC", "OT"]', 'modality = "XC"'))
    assert str(err) == (
        'routing.toml line 9 (rule "derm-photos"): modality must be a list of strings, '
        'e.g. modality = ["XC"], not "XC"'
    )


def test_number_as_worklist() -> None:
    err = broken(EXAMPLE.replace('worklist = "cardiology"', "worklist = 7"))
    assert err.line == 22 and err.rule == "requested-cardiology"
    assert "worklist must be a string in quotes" in str(err)


def test_number_in_a_condition_list() -> None:
    err = broken(EXAMPLE.replace('["CT"]', '["CT", 3]'))
    assert err.line == 14 and err.rule == "chest-ct" and "not 3" in str(err)


def test_invalid_priority_value() -> None:
    err = broken(EXAMPLE.replace('["stat"]', '["STAT", "asap"]'))
    assert str(err) == (
        'routing.toml line 4 (rule "stat-anything-to-er-radiology"): '
        'priority "asap" is not one of: stat, urgent, routine'
    )


def test_bad_worklist_name() -> None:
    err = broken(EXAMPLE.replace('"dermatology"', '"Dermatology Team"'))
    assert err.line == 10 and err.rule == "derm-photos"
    assert 'worklist "Dermatology Team" is not a valid worklist name' in str(err)


def test_duplicate_rule_names_point_at_the_second() -> None:
    err = broken(EXAMPLE.replace('"requested-cardiology"', '"chest-ct"'))
    assert err.line == 20 and err.rule == "chest-ct" and "duplicate rule name" in str(err)


def test_missing_worklist_points_at_the_rule_header() -> None:
    err = broken(EXAMPLE.replace('worklist = "dermatology"\n', ""))
    assert str(err).startswith('routing.toml line 7 (rule "derm-photos"): missing worklist')


def test_missing_name_uses_the_rule_position() -> None:
    err = broken(EXAMPLE.replace('name = "derm-photos"\n', ""))
    assert str(err).startswith("routing.toml line 7 (rule #2): missing name")


def test_no_final_catch_all() -> None:
    text = EXAMPLE[: EXAMPLE.index('[[rule]]\nname = "default"')]
    err = broken(text)
    assert err.line == 19 and err.rule == "requested-cardiology"
    assert "last rule must be a catch-all" in str(err)


def test_catch_all_before_the_end() -> None:
    err = broken(EXAMPLE.replace('name = "derm-photos"\nmodality = ["XC", "OT"]\n', 'name = "x"\n'))
    assert err.line == 7 and err.rule == "x" and "can never match" in str(err)


def test_empty_condition_list() -> None:
    err = broken(EXAMPLE.replace('["cardiology"]', "[]"))
    assert err.line == 21 and "never matches" in str(err)


@pytest.mark.parametrize("text", ["", "# nothing yet\n\n"])
def test_empty_file(text: str) -> None:
    err = broken(text)
    assert str(err).startswith("routing.toml line 1: no rules")


def test_single_bracket_table() -> None:
    err = broken('[rule]\nname = "default"\nworklist = "general"\n')
    assert err.line == 1 and "[[rule]]" in str(err)


def test_line_scan_skips_comments_and_multiline_strings() -> None:
    text = '''\
# [[rule]] in a comment is not a header
[[rule]]   # chest
name = "chest"
note = """
[[rule]]
worklist = "x"
"""
worklist = "chest"
'''
    err = broken(text)
    # the unknown key is "note", on line 4; the fake header inside the string is ignored
    assert err.line == 4 and 'unknown key "note"' in str(err)


def test_inline_rule_array_reports_the_rule_key_line() -> None:
    text = '# inline form\nrule = [{ name = "d", worklist = "general", modality = "CT" }]\n'
    err = broken(text)
    assert err.line == 2 and err.rule == "d"


# --- RulesHolder: live reload ---------------------------------------------------------


def _write(path: Path, text: str, bump: int) -> None:
    # Bump mtime explicitly: two writes within the filesystem's timestamp granularity
    # (and of equal size) would otherwise look unchanged.
    path.write_text(text, encoding="utf-8")
    stamp = 1_700_000_000 + bump
    os.utime(path, (stamp, stamp))


def test_holder_uses_default_when_file_missing(tmp_path: Path) -> None:
    holder = RulesHolder(tmp_path / "routing.toml")
    assert holder.current == parse_rules(DEFAULT_RULES_TOML, source="<built-in default>")
    assert holder.current.route(facts()).worklist == "general"
    assert holder.last_error is None


def test_holder_picks_up_changes_keeps_last_good_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "routing.toml"
    _write(path, GOOD, 1)
    holder = RulesHolder(path)
    assert holder.current.route(facts()).worklist == "ct-reading"

    _write(path, EXAMPLE, 2)
    assert holder.current.route(facts()).worklist == "thoracic-radiology"
    assert holder.last_error is None

    with caplog.at_level(logging.ERROR, logger="saf.routing"):
        _write(path, EXAMPLE.replace("body_part =", "bodypart ="), 3)
        assert holder.current.route(facts()).worklist == "thoracic-radiology"
    assert holder.last_error is not None
    assert holder.last_error.line == 15 and holder.last_error.source == str(path)
    assert "bodypart" in caplog.text and "keeping the previous" in caplog.text
    # logged once per broken version, not on every look
    caplog.clear()
    assert holder.current.rules[2].name == "chest-ct"
    assert caplog.text == ""

    _write(path, GOOD, 4)
    assert holder.current.route(facts()).worklist == "ct-reading"
    assert holder.last_error is None

    path.unlink()
    assert holder.current.route(facts()).worklist == "general"


def test_holder_goes_from_default_to_file_when_created(tmp_path: Path) -> None:
    path = tmp_path / "routing.toml"
    holder = RulesHolder(path)
    assert holder.current.rules[0].worklist == "general"
    _write(path, GOOD, 1)
    assert holder.current.rules[0].worklist == "ct-reading"


def test_holder_refuses_to_start_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.toml"
    _write(path, "[[rule]\n", 1)
    with pytest.raises(RulesError, match=r"line 1"):
        RulesHolder(path)
