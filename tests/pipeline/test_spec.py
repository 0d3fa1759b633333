"""The one spec vocabulary (``pipeline.spec``): every job spec on the JobSpec base, one compute section
narrowed per kind (a key of another kind refused as an unknown key, dumps holding only the kind's
keys), validated copies, storage options never recorded nor printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from strata.analysis.sae.config import SAECompute, SAETrainSpec
from strata.analysis.similarity.spec import AnalyzeCompute, AnalyzeSpec
from strata.jobs.spec import load_spec
from strata.pipeline.config import ExtractCompute, ExtractSpec
from strata.pipeline.encode import EncodeCompute, EncodeSpec
from strata.pipeline.errors import SpecError
from strata.pipeline.spec import ComputeSpec, JobSpec

SECRETS = {"key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9000"}
EXTRACT = {"name": "ex", "model": {"id": "gpt2"}, "corpus": {"path": "c.jsonl"}, "hooks": ["blocks.0.hook_resid_post"]}
SAE = {"dataset": "d", "hooks": ["blocks.0.hook_resid_post"], "name": "s", "sae": {"d_sae": 16, "k": 4},
       "train": {"total_training_samples": 64, "batch_size": 16}}
ANALYZE = {"analyses": [{"kind": "compare", "name": "c", "a": {"dataset": "d", "hook": "h"}, "b": {"dataset": "d", "hook": "h"}}]}
KINDS = [(ExtractSpec, ExtractCompute, EXTRACT), (EncodeSpec, EncodeCompute, {"sae": "s"}), (SAETrainSpec, SAECompute, SAE),
         (AnalyzeSpec, AnalyzeCompute, ANALYZE)]


@pytest.mark.parametrize(("spec_type", "compute_type", "raw"), KINDS, ids=lambda x: getattr(x, "__name__", ""))
def test_every_job_spec_is_on_the_base_and_dumps_only_its_compute_keys(spec_type, compute_type, raw):
    assert issubclass(spec_type, JobSpec) and issubclass(compute_type, ComputeSpec)
    assert spec_type.model_fields["compute"].annotation is compute_type
    assert set(compute_type.keys) <= set(ComputeSpec.model_fields) and len(set(compute_type.keys)) == len(compute_type.keys)
    spec = spec_type.model_validate(raw)
    assert list(spec.model_dump()["compute"]) == list(compute_type.keys)
    assert list(spec.recorded()["compute"]) == list(compute_type.keys)
    # A dump validates back to the same spec: what sweeps, reprocess and `updated` rely on.
    assert spec_type.model_validate(spec.model_dump()) == spec


def test_each_kind_keeps_its_defaults():
    assert ExtractSpec.model_validate(EXTRACT).compute.batch_tokens == 8192
    assert ExtractSpec.model_validate(EXTRACT).compute.unit_contexts == 256
    assert EncodeSpec(sae="s").compute.batch_rows == 4096 and EncodeSpec(sae="s").compute.merge_memory_gb == 4.0
    sae = SAETrainSpec.model_validate(SAE).compute
    assert (sae.device, sae.ray, sae.cpus_per_task, sae.threads, sae.lease_stale_s) == ("auto", "auto", 1, None, 60.0)
    an = AnalyzeSpec.model_validate(ANALYZE).compute
    assert (an.tasks, an.chunk_rows, an.memory_budget_mb) == (None, 16384, 4096.0)


@pytest.mark.parametrize(("spec_type", "raw", "key", "listed"), [
    (ExtractSpec, EXTRACT, "batch_rows", "address, executor, batch_tokens, unit_contexts"),
    (EncodeSpec, {"sae": "s"}, "batch_tokens", "address, executor, device, num_workers"),
    (SAETrainSpec, SAE, "chunk_rows", "address, device, ray, cpus_per_task, threads, lease_stale_s"),
    (AnalyzeSpec, ANALYZE, "lease_stale_s", "address, executor, tasks, chunk_rows, memory_budget_mb"),
])
def test_a_compute_key_of_another_kind_is_refused_as_an_unknown_key(tmp_path, spec_type, raw, key, listed):
    with pytest.raises(ValidationError):
        spec_type.model_validate({**raw, "compute": {key: 1}})
    path = Path(tmp_path, "spec.yaml")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        load_spec(spec_type, path, [f"compute.{key}=1"])
    assert f"`compute.{key}` is not a spec key (valid keys here: {listed}" in str(e.value)
    # a key that no kind has reads the same
    with pytest.raises(SpecError, match=rf"`compute.bogus` is not a spec key \(valid keys here: {listed}"):
        load_spec(spec_type, path, ["compute.bogus=1"])


def test_job_keys_are_listed_in_the_order_the_specs_had():
    assert EncodeSpec.spec_keys()[:4] == ("store", "sae", "name", "top_k")
    assert EncodeSpec.spec_keys()[-2:] == ("compute", "storage_options")
    assert set(ExtractSpec.spec_keys()) == set(ExtractSpec.model_fields)


def test_device_values_are_each_kinds_own():
    with pytest.raises(ValidationError, match="Input should be 'auto', 'cpu' or 'cuda'"):
        EncodeSpec(sae="s", compute={"device": "cuda:1"})
    assert SAETrainSpec.model_validate({**SAE, "compute": {"device": "cuda:1"}}).compute.device == "cuda:1"
    with pytest.raises(ValidationError, match="String should match pattern"):
        SAETrainSpec.model_validate({**SAE, "compute": {"device": "tpu"}})


def test_updated_is_a_validated_copy():
    spec = ExtractSpec.model_validate({**EXTRACT, "storage_options": SECRETS, "compute": {"batch_tokens": 64}})
    new = spec.updated(name="ex2", version_of="ex")
    assert (new.name, new.version_of, new.compute.batch_tokens, new.storage_options) == ("ex2", "ex", 64, SECRETS)
    assert spec.name == "ex"  # the original is untouched (frozen)
    assert "dtype" not in new.model_fields_set  # defaults stay defaults
    with pytest.raises(ValidationError, match="invalid dataset name"):
        spec.updated(name="../escape")
    with pytest.raises(ValidationError, match="batch_rows"):
        spec.updated(compute={"batch_rows": 3})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        spec.updated(bogus=1)
    # a section's copy is validated too
    assert spec.compute.updated(batch_tokens=128).batch_tokens == 128
    with pytest.raises(ValidationError):
        spec.compute.updated(batch_tokens=0)


@pytest.mark.parametrize(("spec_type", "raw"), [(k[0], k[2]) for k in KINDS], ids=lambda x: getattr(x, "__name__", ""))
def test_storage_options_are_used_but_never_recorded_nor_printed(spec_type, raw):
    spec = spec_type.model_validate({**raw, "storage_options": SECRETS})
    assert spec.storage_options == SECRETS  # used as given
    for shown in (repr(spec), str(spec)):
        assert "s3cr3t-value" not in shown and "AKIAEXAMPLEKEY" not in shown
    assert spec.recorded()["storage_options"] == {"endpoint_url": "http://127.0.0.1:9000"}
