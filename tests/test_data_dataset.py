"""The JSONL reader names the file, line and column of malformed JSON as an editor counts them."""

import pytest

from so8t.data.dataset import iter_jsonl_objects
from so8t.errors import SO8TError


@pytest.mark.parametrize("bad_row, column", [
    ('{"text": "hello wor",', 22),  # truncated: the error is just past the last character
    ('{"text": "hi" "x"}', 15),
    ('{"text": nope}', 10),
])
def test_malformed_json_is_reported_at_its_line_and_column(tmp_path, bad_row, column):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a good row"}\n' + bad_row + "\n" + '{"text": "another"}\n', encoding="utf-8")
    with pytest.raises(SO8TError, match=rf"rows\.jsonl:2: malformed JSON \(.* at column {column}\)$"):
        list(iter_jsonl_objects(path))
