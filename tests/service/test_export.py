"""Rows for export: each trial once, in its newest version, when pages overlap."""

from __future__ import annotations

from hpo.service.export import csv_cell, newest_versions
from hpo.service.spec import StudySpec
from hpo.service.studies import StudyService
from tests.conftest import simple_spec


def test_a_trial_read_on_two_pages_is_kept_once_as_its_newest_version(
    service: StudyService,
) -> None:
    sid = service.create_study(StudySpec.model_validate(simple_spec("pages"))).id
    changing, other = service.ask(sid), service.ask(sid)
    first_page, _ = service.storage.list_trials(sid)  # both running
    service.tell(changing.id, value=1.0)  # it changes between two page reads...
    second_page, _ = service.storage.list_trials(sid, since=first_page[-1].seq)
    assert [t.id for t in second_page] == [changing.id]  # ...so the next page has it again
    kept = newest_versions([*first_page, *second_page])
    assert [(t.id, t.state) for t in kept] == [(other.id, "running"), (changing.id, "complete")]


def test_json_cells_are_json_text() -> None:
    assert csv_cell({"a": [1, True, None]}) == '{"a": [1, true, null]}'
    assert csv_cell([1, 2]) == "[1, 2]"
    assert csv_cell(1.5) == 1.5 and csv_cell("x") == "x" and csv_cell(None) is None
