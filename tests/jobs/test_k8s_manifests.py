"""The scheduling examples: a Kubernetes CronJob, a KubeRay RayJob and a crontab line, each with
the fields its scheduler requires, each running `strata reprocess` on the shipped pipeline."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "examples" / "k8s"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute, hour, day of month, month, day of week


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: one resource per file"
    return docs[0]


def _check_cron(schedule: str) -> None:
    fields = schedule.split()
    assert len(fields) == 5, f"{schedule!r}: a cron schedule has 5 fields"
    for text, (lo, hi) in zip(fields, CRON_RANGES):
        for part in text.split(","):
            base, _, step = part.partition("/")
            assert not step or (step.isdigit() and int(step) > 0), schedule
            if base == "*":
                continue
            bounds = base.split("-")
            assert len(bounds) in (1, 2) and all(b.isdigit() and lo <= int(b) <= hi for b in bounds), f"{schedule!r}: {part!r}"


def _check_containers(containers: list, where: str) -> None:
    assert isinstance(containers, list) and containers, f"{where}: containers"
    for c in containers:
        assert DNS_LABEL.match(c["name"]), f"{where}: container name {c.get('name')!r}"
        assert isinstance(c["image"], str) and c["image"].strip(), f"{where}: image"


def _runs_pipeline(words: list[str], where: str) -> str:
    """The pipeline file a `strata reprocess` command line runs (checked to exist and load)."""
    text = " ".join(words)
    m = re.search(r"\bstrata reprocess (\S+\.ya?ml)", text)
    assert m, f"{where}: does not run `strata reprocess PIPELINE.yaml`: {text!r}"
    assert (REPO / m.group(1)).is_file(), f"{where}: {m.group(1)} is not in the repository"
    return m.group(1)


def _store_arg(words: list[str]) -> str | None:
    return words[words.index("--store") + 1] if "--store" in words else None


def test_cronjob_has_what_a_batch_v1_cronjob_requires():
    cj = _load("cronjob.yaml")
    assert cj["apiVersion"] == "batch/v1" and cj["kind"] == "CronJob"
    name = cj["metadata"]["name"]
    assert DNS_LABEL.match(name) and len(name) <= 52  # a CronJob's name leaves room for its Jobs' suffixes
    _check_cron(cj["spec"]["schedule"])
    assert cj["spec"].get("concurrencyPolicy", "Allow") in ("Allow", "Forbid", "Replace")
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")  # a Job's pods may not restart Always
    _check_containers(pod["containers"], "cronjob")
    words = [str(w) for w in pod["containers"][0]["command"] + pod["containers"][0].get("args", [])]
    if words[:2] in (["/bin/sh", "-c"], ["sh", "-c"], ["bash", "-c"]):
        words = shlex.split(words[2])
    _runs_pipeline(words, "cronjob")
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in pod.get("volumes", [])}, "every mounted volume is declared"


def test_rayjob_has_what_kuberay_requires():
    rj = _load("rayjob.yaml")
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    assert DNS_LABEL.match(rj["metadata"]["name"])
    spec = rj["spec"]
    words = shlex.split(spec["entrypoint"])
    assert _runs_pipeline(words, "rayjob") == "examples/pipeline.yaml"
    store = _store_arg(words)  # a Ray job refuses a relative local store: it would land in a temporary folder
    assert store is not None and (store.startswith("s3://") or store.startswith("/")), store
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # KubeRay's CRD types rayStartParams as map[string]string: a bare number or boolean is rejected.
    assert isinstance(head["rayStartParams"], dict) and all(isinstance(v, str) for v in head["rayStartParams"].values())
    _check_containers(head["template"]["spec"]["containers"], "rayjob head")
    workers = cluster["workerGroupSpecs"]
    assert isinstance(workers, list) and workers
    for g in workers:
        assert DNS_LABEL.match(g["groupName"])
        assert isinstance(g["rayStartParams"], dict) and all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_containers(g["template"]["spec"]["containers"], f"rayjob worker group {g['groupName']}")
        mounts = {m["name"] for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in g["template"]["spec"].get("volumes", [])}


def test_crontab_is_one_line_that_runs_reprocess():
    lines = [ln for ln in (REPO / "examples" / "crontab").read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 5)
    _check_cron(" ".join(fields[:5]))
    command = fields[5]
    assert "strata reprocess" in command
    _runs_pipeline(shlex.split(command.split("&&")[-1].replace(".venv/bin/strata", "strata")), "crontab")
    assert "flock" in command or "lease" in (REPO / "examples" / "crontab").read_text()  # overlap handled


@pytest.mark.parametrize("pipeline", ["examples/pipeline.yaml"])
def test_the_shipped_pipeline_loads_in_dependency_order(pipeline, monkeypatch):
    from strata.jobs.reprocess import load_pipeline

    monkeypatch.chdir(REPO)
    p = load_pipeline(pipeline)
    assert [(j.entry, j.kind.name, j.policy) for j in p.jobs] == [
        ("examples/quickstart.yaml", "extract", None),
        ("examples/sae.yaml", "sae", "keep"),
        ("examples/features.yaml", "features", None),
    ]
    sae, features = p.jobs[1].spec, p.jobs[2].spec
    assert sae.dataset == p.jobs[0].spec.name  # the SAE reads the extracted dataset ...
    assert features.sae == sae.name or features.sae.startswith(sae.name + ".")  # ... and the features one of its SAEs
    assert p.store == "./acts" and all(j.spec.store == "./acts" for j in p.jobs)
