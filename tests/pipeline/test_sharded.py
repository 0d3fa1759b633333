"""Sharded corpora: shards tokenized as tasks into the store, units from per-shard counts, contexts
that never span shards, ordinal ids over the whole corpus, growth by appended shards and changed
shards recomputed (or refused). Checked against an independent packing of each shard alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.errors import CorpusError, SpecError
from strata.pipeline.extract import run_extract
from strata.pipeline.packing import encode_texts, tokenizer_info
from strata.pipeline.plan import pack
from strata.pipeline.tiny import synthetic_docs, write_jsonl

CTX, UC = 16, 4
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def _spec(root: Path, model: Path, corpus: str, **corpus_keys) -> ExtractSpec:
    return ExtractSpec(store=str(root / "acts"), name="sh", model={"id": str(model)}, corpus={"path": corpus, **corpus_keys},
                       tokenize={"context_size": CTX}, hooks=[H0, H1], dtype="float32",
                       compute={"executor": "local", "unit_contexts": UC, "batch_tokens": UC * CTX})


def _shards(folder: Path, sizes: list[int], seed: int = 0) -> list[list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(sizes):
        docs = synthetic_docs(n, seed=seed + i)
        if i == 1:
            docs.insert(2, "   ")  # an empty record: skipped, but counted by ordinal ids
        write_jsonl(folder / f"part-{i:03d}.jsonl", docs)
        out.append(docs)
    return out


def _expected(model: Path, shards: list[list[str]]):
    """Each shard packed alone, in memory; ids are record ordinals over the whole corpus."""
    tok = AutoTokenizer.from_pretrained(model)
    info = tokenizer_info(tok, str(model))
    units, offset = [], 0
    for docs in shards:
        keep = [(offset + j, d) for j, d in enumerate(docs) if d.strip()]
        ctx = pack(encode_texts(info.backend_json, [t for _, t in keep]), np.array([i for i, _ in keep]), tok=info,
                   context_size=CTX, packing="concat", prepend_bos=True)
        for c0 in range(0, len(ctx), UC):
            units.append(ctx.slice(c0, min(len(ctx), c0 + UC)))
        offset += len(docs)
    return units


def _forward(model: Path, token_id: np.ndarray) -> dict[str, np.ndarray]:
    m = AutoModel.from_pretrained(model, dtype=torch.float32).eval()
    got = {}
    for i, block in enumerate(m.h):
        block.register_forward_hook(lambda mod, a, o, i=i: got.__setitem__(f"blocks.{i}.hook_resid_post", o.reshape(-1, o.shape[-1]).numpy()))
    with torch.no_grad():
        m(input_ids=torch.from_numpy(token_id.astype(np.int64)))
    return got


def test_sharded_units_tokens_activations_and_documents(tmp_path, tiny_gpt2):
    shards = _shards(tmp_path / "corpus", [9, 6, 11])
    res = run_extract(_spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus")), progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("sh")
    assert ds.info.meta["plan_kind"] == "sharded" and res.shards == 3 and res.shards_tokenized == 3
    want = _expected(tiny_gpt2, shards)
    assert ds.info.num_units == len(want) == res.num_units
    for u, ctx in enumerate(want):
        t = ds.unit_tokens(u)
        assert t.column("token_id").to_numpy().tolist() == ctx.token_id.reshape(-1).tolist()
        assert t.column("doc_id").to_numpy().tolist() == ctx.doc_id.reshape(-1).tolist()
        assert t.column("context_id").to_numpy()[0] == u * UC  # row r is context r // CTX, with gaps after a shard's short unit
        ref = _forward(tiny_gpt2, ctx.token_id)
        rows = slice(u * UC * CTX, u * UC * CTX + ctx.token_id.size)
        for h in (H0, H1):
            np.testing.assert_allclose(ds.read(h, rows=rows), ref[h], rtol=1e-5, atol=1e-5)
    # The document index, in parts: every document's rows hold exactly its tokens.
    docs = ds.docs()
    flat = ds.tokens(H0)
    n_docs = sum(1 for s in shards for d in s if d.strip())
    assert docs.num_rows == n_docs
    assert 11 not in docs.column("doc_id").to_pylist()  # shard 1's empty record: its ordinal 2, after shard 0's 9 records
    row_doc = dict(zip(flat.column("row").to_pylist(), flat.column("doc_id").to_pylist()))
    for d, a, b in zip(*(docs.column(c).to_pylist() for c in ("doc_id", "row_start", "row_end"))):
        if a >= 0:
            assert {row_doc[r] for r in range(a, b) if row_doc[r] == d} == {d} and row_doc[a] in (d, row_doc[a])
    some = [0, 12, 25]
    got = ds.read(H0, docs=some)
    spans = {d: (a, b) for d, a, b in zip(*(docs.column(c).to_pylist() for c in ("doc_id", "row_start", "row_end")))}
    np.testing.assert_array_equal(got, np.concatenate([ds.read(H0, rows=slice(*spans[d])) for d in some]))
    from strata.store.errors import UnknownDocumentError

    with pytest.raises(UnknownDocumentError, match=r"no document\(s\) \[11, 999\]; it holds 26 documents with ids from 0 to 26 \(see ds.docs\(\)\)"):
        ds.read(H0, docs=[3, 11, 999])  # 11: shard 1's empty record
    assert [a for _, a, _ in ds._sharded_documents().spans(np.array([25, 0, 12]))] == [spans[25][0], spans[0][0], spans[12][0]]
    # Rerun: a no-op from the listing alone.
    again = run_extract(_spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus")), progress=False)
    assert again.noop and "as listed before" in again.message


def test_ordinal_ids_count_empty_records_across_shards(tmp_path, tiny_gpt2):
    shards = _shards(tmp_path / "corpus", [5, 5, 5])
    run_extract(_spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus")), progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("sh")
    ids = ds.docs().column("doc_id").to_pylist()
    # shard 1 has 6 records (one empty at its ordinal 2): ids 5..10 minus 7; shard 2 starts at 11.
    assert ids == [i for i in range(16) if i != 7]
    assert sum(len(s) for s in shards) == 16


def test_appended_shards_add_units_and_leave_committed_ones(tmp_path, tiny_gpt2):
    folder = tmp_path / "corpus"
    _shards(folder, [9, 6])
    spec = _spec(tmp_path, tiny_gpt2, str(folder))
    run_extract(spec, progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("sh")
    n0 = ds.info.num_units
    before = {u: ds.record(H0, u).committed_at for u in range(n0)}
    write_jsonl(folder / "part-002.jsonl", synthetic_docs(7, seed=50))
    res = run_extract(spec, progress=False)
    ds.refresh()
    assert res.shards_tokenized == 1 and res.units_run == ds.info.num_units - n0 > 0
    assert {u: ds.record(H0, u).committed_at for u in range(n0)} == before


def test_a_changed_shard_recomputes_its_units_or_is_refused(tmp_path, tiny_gpt2):
    folder = tmp_path / "corpus"
    shards = _shards(folder, [9, 6, 11])
    spec = _spec(tmp_path, tiny_gpt2, str(folder))
    run_extract(spec, progress=False)
    ds = store.open(str(tmp_path / "acts")).dataset("sh")
    before = {u: ds.record(H0, u).committed_at for u in range(ds.info.num_units)}
    table = ds.shards()
    first, units = table.column("first_unit").to_pylist(), table.column("units").to_pylist()
    # Shard 2 (the last) changes: one word of one document, same number of records.
    docs = shards[2]
    docs[3] = docs[3].replace(docs[3].split()[0], "zebra", 1)
    write_jsonl(folder / "part-002.jsonl", docs)
    with pytest.raises(CorpusError, match=r"1 shard\(s\) changed .*part-002"):
        run_extract(_spec(tmp_path, tiny_gpt2, str(folder), on_change="refuse"), progress=False)
    res = run_extract(spec, progress=False)
    ds.refresh()
    mine = set(range(first[2], first[2] + units[2]))
    assert set(res.units_recomputed) == mine
    after = {u: ds.record(H0, u).committed_at for u in range(ds.info.num_units)}
    assert {u for u in after if u in before and after[u] != before[u]} <= mine
    assert all(after[u] == before[u] for u in before if u not in mine)
    want = _expected(tiny_gpt2, shards)
    for u in mine:
        assert ds.unit_tokens(u).column("token_id").to_numpy().tolist() == want[u].token_id.reshape(-1).tolist()


def test_one_file_plans_as_documents_and_bad_plans_are_refused(tmp_path, tiny_gpt2):
    f = write_jsonl(tmp_path / "one.jsonl", synthetic_docs(8, seed=1))
    run_extract(_spec(tmp_path, tiny_gpt2, str(f)), progress=False)
    assert store.open(str(tmp_path / "acts")).dataset("sh").info.meta["plan_kind"] == "documents"
    with pytest.raises(SpecError, match="planned as 'documents'"):
        run_extract(_spec(tmp_path, tiny_gpt2, str(f), plan="sharded"), progress=False)
    _shards(tmp_path / "c2", [3, 3])
    spec = ExtractSpec(**{**_spec(tmp_path, tiny_gpt2, str(tmp_path / "c2")).model_dump(), "name": "other",
                          "corpus": {"path": str(tmp_path / "c2"), "max_docs": 2}})
    with pytest.raises(SpecError, match="max_docs"):
        run_extract(spec, progress=False)


def test_bad_shard_content_writes_nothing(tmp_path, tiny_gpt2):
    folder = tmp_path / "corpus"
    _shards(folder, [4, 4])
    (folder / "part-001.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"part-001.jsonl:2"):
        run_extract(_spec(tmp_path, tiny_gpt2, str(folder)), progress=False)
    root = tmp_path / "acts" / "datasets"
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*")), sorted(map(str, root.rglob("*")))


def test_dataset_meta_records_no_corpus_secret(tmp_path, tiny_gpt2):
    _shards(tmp_path / "corpus", [3, 3])
    spec = _spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus"), storage_options={"key": "AKIAXX", "secret": "s3cr3t-value"})
    run_extract(spec, progress=False)
    blob = json.dumps(store.open(str(tmp_path / "acts")).dataset("sh").info.meta)
    assert "s3cr3t-value" not in blob and "AKIAXX" not in blob
    assert os.path.isdir(tmp_path / "acts" / "datasets" / "sh" / "shards")


def test_dry_run_plans_without_a_dataset_and_the_real_run_reuses_its_shards(tmp_path, tiny_gpt2, capsys):
    from strata.jobs.cli import main

    shards = _shards(tmp_path / "corpus", [9, 6, 11])
    spec = _spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus"))
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec.recorded()))
    assert main(["extract", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    s = store.open(str(tmp_path / "acts"))
    assert s.datasets() == []
    want = _expected(tiny_gpt2, shards)
    assert f"{len(want)} of {UC} contexts" in out
    assert "3 shard(s), 3 tokenized by this run" in out
    rows = sum(c.token_id.size for c in want)
    assert f"{rows * 32 * 4:,} bytes" in out  # d_model 32, float32, per hook
    res = run_extract(spec, progress=False)
    assert res.shards == 3 and res.shards_tokenized == 0 and res.num_units == len(want)


def test_reprocess_plans_appended_and_changed_shards(tmp_path, tiny_gpt2, monkeypatch):
    import yaml

    from strata.jobs.reprocess import load_pipeline, plan_pipeline

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "corpus"
    shards = _shards(folder, [9, 6])
    spec = _spec(tmp_path, tiny_gpt2, str(folder))
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump({**spec.recorded(), "store": str(tmp_path / "acts")}))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"store": str(tmp_path / "acts"), "jobs": ["extract.yaml"]}))
    run_extract(spec, progress=False)
    step = plan_pipeline(load_pipeline("pipeline.yaml")).steps[0]
    assert not step.run and step.why == "up to date"
    n0 = store.open(str(tmp_path / "acts")).dataset("sh").info.num_units
    write_jsonl(folder / "part-002.jsonl", synthetic_docs(7, seed=50))
    step = plan_pipeline(load_pipeline("pipeline.yaml")).steps[0]
    want = _expected(tiny_gpt2, [*shards, synthetic_docs(7, seed=50)])
    assert step.run and step.units == list(range(n0, len(want))) and "the corpus grew" in step.why
    run_extract(spec, progress=False)
    docs = shards[0]
    docs[0] = docs[0] + " and more words"
    write_jsonl(folder / "part-000.jsonl", docs)
    before = sorted(p.name for p in (tmp_path / "acts" / "datasets" / "sh" / "shards").iterdir())
    step = plan_pipeline(load_pipeline("pipeline.yaml")).steps[0]
    assert step.run and "corpus shard(s) changed" in step.why and step.units and step.units[0] == 0
    assert sorted(p.name for p in (tmp_path / "acts" / "datasets" / "sh" / "shards").iterdir()) == before  # a plan writes nothing


def test_a_multi_file_dataset_stored_by_the_old_planner_keeps_its_plan_and_reruns_as_a_no_op(tmp_path, tiny_gpt2):
    from strata.store.datasets.writer import dataset_lease

    _shards(tmp_path / "corpus", [5, 4])
    run_extract(_spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus"), plan="documents"), progress=False)
    s = store.open(str(tmp_path / "acts"))
    with dataset_lease(s.storage, "sh") as lease:  # as the planner before sharded plans wrote it: no `plan_kind`
        w = s.writer("sh", fence=lease.token)
        w._publish(w.info.with_changes(meta={k: v for k, v in w.info.meta.items() if k != "plan_kind"}))
    ds = s.dataset("sh")
    assert "plan_kind" not in ds.info.meta and ds.shards() is None and ds.docs().num_rows == 5 + 4
    again = run_extract(_spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus")), progress=False)  # plan: auto
    assert again.noop and again.shards == 0
    with pytest.raises(SpecError, match="planned as 'documents'"):
        run_extract(_spec(tmp_path, tiny_gpt2, str(tmp_path / "corpus"), plan="sharded"), progress=False)
