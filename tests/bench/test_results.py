"""Result files: CSV header union, JSONL, ids stay text."""

import json

import pytest

from optkit.bench.results import append_rows, read_rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_append_and_read_back(tmp_path, suffix):
    path = tmp_path / "sub" / f"rows{suffix}"
    append_rows([{"cfg_id": "123456789012", "x": 1.5, "nested": {"a": 1}}], path)
    append_rows([{"cfg_id": "12e456789012", "x": 2.0}], path)
    append_rows([], path)  # nothing to add, nothing changes
    df = read_rows(path)
    assert list(df["cfg_id"]) == ["123456789012", "12e456789012"]  # not numbers
    assert list(df["x"]) == [1.5, 2.0]
    nested = df["nested"][0]
    assert (json.loads(nested) if isinstance(nested, str) else nested) == {"a": 1}


def test_csv_new_column_rewrites_with_union(tmp_path):
    path = tmp_path / "rows.csv"
    append_rows([{"a": 1, "b": 2}], path)
    append_rows([{"b": 3, "a": 4}], path)          # same columns, any order: appended
    assert path.read_text().splitlines()[0] == "a,b"
    append_rows([{"a": 5, "c": "new"}], path)     # a new column: rewritten
    lines = path.read_text().splitlines()
    assert lines[0] == "a,b,c" and lines[1:] == ["1,2,", "4,3,", "5,,new"]
    assert not (tmp_path / "rows.csv.tmp").exists()


def test_bad_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        append_rows([{"a": 1}], tmp_path / "rows.txt")
    assert read_rows(tmp_path / "none.csv").empty
