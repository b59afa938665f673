"""Data cleaning: duplicates, empty, over-long and non-finite rows are dropped and counted."""

from __future__ import annotations

import numpy as np

from hpo.workers import cleaning


def test_clean_texts_drops_and_counts_duplicates_empty_and_over_long_rows() -> None:
    texts = [
        "Shares rose on Monday.",
        "shares  rose on MONDAY. ",  # a duplicate up to case and whitespace
        "",
        "   \n",
        None,
        "x" * 50,  # over-long
        "The striker scored twice.",
        "The striker scored twice.",  # a duplicate with another label
        "Parliament votes today.",
        "Unknown topic here.",
    ]
    labels = ["biz", "biz", "biz", "sport", "biz", "sport", "sport", "biz", "politics", "weather"]
    texts, labels = [*texts, "No label.", "Blank label."], [*labels, None, " "]
    keep, report = cleaning.clean_texts(
        texts, labels, max_chars=40, known_labels={"biz", "sport", "politics"}
    )
    assert keep.tolist() == [0, 6, 8]  # the first copy of each duplicate is kept
    assert report.rows == 12 and report.kept == 3 and report.removed == 9
    assert (report.duplicates, report.conflicting) == (2, 1)
    assert (report.empty, report.too_long, report.unknown_label) == (3, 1, 1)
    assert report.missing_label == 2
    assert report.as_metrics()["data_duplicates"] == 2.0
    assert str(report) == (
        "kept 3 of 12 rows (removed: duplicates 2, conflicting 1, empty 3, too_long 1, "
        "missing_label 2, unknown_label 1)"
    )


def test_clean_arrays_drops_identical_blank_and_non_finite_images() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8))
    x[2] = x[0]  # duplicate
    x[3] = 0.0  # blank
    x[4, 1, 1] = np.nan  # broken
    y = np.array([1, 2, 1, 3, 4, 5])
    keep, report = cleaning.clean_arrays(x, y)
    assert keep.tolist() == [0, 1, 5]
    assert (report.duplicates, report.empty, report.kept) == (1, 2, 3)
