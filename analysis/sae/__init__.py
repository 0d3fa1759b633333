"""SAEs trained from the store through sae-lens, committed into it with lineage and held-out
evaluation.

    from strata.analysis import sae
    spec = sae.SAETrainSpec.model_validate(yaml.safe_load(open("sae.yaml")))
    result = sae.run_job(spec)                 # plan, lease, train, evaluate, commit: `strata sae train`
    s.sae(result.outcomes[0].name).load()      # the committed SAE, through sae-lens

    results = sae.train(spec)                  # or in memory, nothing committed
    metrics = sae.evaluate(results[0].sae, ds, results[0].hook, results[0].lineage["holdout_units"])
"""

from strata.analysis.sae.config import (
    DataSpec,
    EvalSpec,
    Run,
    SAECompute,
    SAETrainSpec,
    TrainSpec,
    architectures,
    expand_runs,
    resolve_hooks,
    sae_options,
)
from strata.analysis.sae.evaluate import evaluate, next_token_ce, reconstruction_metrics, splice, spliced_ce
from strata.analysis.sae.job import JobResult, SAEOutcome, run_job
from strata.analysis.sae.plan import Plan, config_hash, plan, resolved_config, split_units
from strata.analysis.sae.save import SavedSAE, commit_sae, load_sae, save_sae
from strata.analysis.sae.train import TrainedSAE, build_sae, train

__all__ = [
    "SAETrainSpec",
    "TrainSpec",
    "DataSpec",
    "EvalSpec",
    "SAECompute",
    "Run",
    "architectures",
    "sae_options",
    "expand_runs",
    "resolve_hooks",
    "plan",
    "Plan",
    "resolved_config",
    "config_hash",
    "split_units",
    "run_job",
    "JobResult",
    "SAEOutcome",
    "train",
    "build_sae",
    "TrainedSAE",
    "evaluate",
    "reconstruction_metrics",
    "spliced_ce",
    "next_token_ce",
    "splice",
    "save_sae",
    "commit_sae",
    "load_sae",
    "SavedSAE",
]
