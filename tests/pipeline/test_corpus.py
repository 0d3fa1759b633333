from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from strata.pipeline.config import CorpusSpec
from strata.pipeline.corpus import read_corpus
from strata.pipeline.errors import CorpusError


def CorpusSource(path, **kw) -> CorpusSpec:  # noqa: N802 - reads like the spec section it builds
    return CorpusSpec(path=str(path), **kw)


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_jsonl_ids_are_ordinals_and_empty_docs_are_skipped_and_counted(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "a b"}, {"text": "  "}, {"text": "c"}, {"text": ""}, {"text": "d"}])
    c = read_corpus(CorpusSource(p))
    assert c.texts == ["a b", "c", "d"]
    assert c.doc_ids.tolist() == [0, 2, 4]  # record ordinals: stable when documents are appended
    assert c.skipped_empty == 2
    assert c.stats["docs"] == 3


def test_id_field_ints_as_is_strings_hashed_stably(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "x", "id": 42}, {"text": "y", "id": 7}])
    assert read_corpus(CorpusSource(p, id_field="id")).doc_ids.tolist() == [42, 7]
    q = _jsonl(tmp_path / "d.jsonl", [{"text": "x", "id": "doc-a"}, {"text": "y", "id": "doc-b"}])
    a = read_corpus(CorpusSource(q, id_field="id")).doc_ids
    b = read_corpus(CorpusSource(q, id_field="id")).doc_ids
    assert a.tolist() == b.tolist() and a[0] != a[1] and (a >= 0).all()
    dup = _jsonl(tmp_path / "e.jsonl", [{"text": "x", "id": 1}, {"text": "y", "id": 1}])
    with pytest.raises(CorpusError, match="not unique"):
        read_corpus(CorpusSource(dup, id_field="id"))


def test_fingerprint_changes_with_any_text_and_prefix_is_stable(tmp_path):
    base = [{"text": f"doc {i}"} for i in range(5)]
    c1 = read_corpus(CorpusSource(_jsonl(tmp_path / "a.jsonl", base)))
    c2 = read_corpus(CorpusSource(_jsonl(tmp_path / "b.jsonl", base[:3] + [{"text": "doc 3!"}] + base[4:])))
    c3 = read_corpus(CorpusSource(_jsonl(tmp_path / "c.jsonl", base + [{"text": "new"}])))
    assert c1.fingerprint() != c2.fingerprint()
    assert c1.fingerprint() != c3.fingerprint()
    assert c3.fingerprint(5) == c1.fingerprint()
    assert c2.fingerprint(3) == c1.fingerprint(3)


def test_missing_text_field_lists_the_fields(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"body": "x", "title": "t"}])
    with pytest.raises(CorpusError, match=r"`corpus.text_field` 'text'.*fields are: body, title"):
        read_corpus(CorpusSource(p))


def test_empty_corpus_and_missing_path(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(CorpusError, match="is empty"):
        read_corpus(CorpusSource(p))
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(CorpusSource(str(tmp_path / "nope.jsonl")))


def test_parquet_folder_glob_and_max_docs(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"content": ["a", "b"], "n": [1, 2]}), d / "part-0.parquet")
    pq.write_table(pa.table({"content": ["c", None], "n": [3, 4]}), d / "part-1.parquet")
    c = read_corpus(CorpusSource(str(d), format="parquet", text_field="content"))
    assert c.texts == ["a", "b", "c"] and c.skipped_empty == 1
    g = read_corpus(CorpusSource(str(d / "*.parquet"), format="parquet", text_field="content", id_field="n", max_docs=2))
    assert g.texts == ["a", "b"] and g.doc_ids.tolist() == [1, 2]
    with pytest.raises(CorpusError, match="fields are: content, n"):
        read_corpus(CorpusSource(str(d), format="parquet"))


def test_text_files_per_file_and_per_line(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "t" / "b.txt").write_text("three\n")
    per_file = read_corpus(CorpusSource(str(tmp_path / "t"), format="text"))
    assert per_file.texts == ["one\ntwo\n", "three\n"]
    per_line = read_corpus(CorpusSource(str(tmp_path / "t"), format="text", text_unit="line"))
    assert per_line.texts == ["one", "two", "three"]
    assert np.array_equal(per_line.doc_ids, [0, 1, 2])


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x y", "", "z"], "meta": [1, 2, 3]}).save_to_disk(str(tmp_path / "hf"))
    c = read_corpus(CorpusSource(str(tmp_path / "hf"), format="hf"))
    assert c.texts == ["x y", "z"] and c.doc_ids.tolist() == [0, 2]
    with pytest.raises(CorpusError, match="fields are: text, meta"):
        read_corpus(CorpusSource(str(tmp_path / "hf"), format="hf", text_field="body"))


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_bytes_that_are_not_utf8_are_one_line_errors(tmp_path, fmt):
    p = tmp_path / ("c.jsonl" if fmt == "jsonl" else "c.txt")
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(CorpusError, match=r"c\.(jsonl|txt):2: not UTF-8 text \(byte 0xe9 at offset 30\)") as info:
        read_corpus(CorpusSource(p, format=fmt))
    assert "\n" not in str(info.value)


def test_a_format_that_does_not_match_the_file_is_one_line(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "a"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl: not a Parquet file .*is it jsonl or text\?") as info:
        read_corpus(CorpusSource(p, format="parquet"))
    assert "\n" not in str(info.value)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(CorpusError, match=r"t\.parquet:1: not (valid JSON|UTF-8 text)"):
        read_corpus(CorpusSource(tmp_path / "t.parquet", format="jsonl"))
