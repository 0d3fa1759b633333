#!/usr/bin/env bash
# Diffusion quickstart: a tiny seeded DiT and a tiny seeded DINOv2 (no download), the 48 generated
# shapes extracted through both (the DiT at timesteps 100, 500 and 900), then the REPA-style
# heatmap: CKNNA of every DiT block at every timestep against DINOv2's last block. Runs offline.
set -euo pipefail
. "$(dirname "$0")/_env.sh"

[ -f models/tiny-dit/model_index.json ] || python -m strata.pipeline.tiny models/tiny-dit --family dit --layers 4 --seed 0
[ -f models/tiny-dinov2/config.json ] || python -m strata.pipeline.tiny models/tiny-dinov2 --family dinov2 --layers 4 --d-model 64 --heads 4 --seed 0
[ -f data/shapes/metadata.jsonl ] || python -m strata.pipeline.tiny data/shapes --images 48 --seed 0
strata extract examples/dit.yaml "$@"
strata extract examples/dinov2.yaml
strata verify ./acts tiny-dit-shapes
strata analyze examples/repa.yaml
cat <<'TXT'

The heatmaps: acts/analyses/repa-dit-dinov2/heatmap_cknna.png (images pooled) and
acts/analyses/repa-dit-dinov2-patches/heatmap_cknna.png (patch by patch). From a notebook:

    import strata
    from strata.analysis import similarity
    s = strata.open("./acts", create=False)
    dit, dino = s.dataset("tiny-dit-shapes"), s.dataset("tiny-dinov2-shapes")
    s.analysis("repa-dit-dinov2").table()          # hook, timestep, metric, value, n
    similarity.compare((dit, "blocks.3.hook_resid_post", 100), (dino, "blocks.3.hook_resid_post"),
                       metrics=["cknna", "linear_cka"], align="docs", knn_k=10)
    x = dit.read("blocks.3.hook_resid_post", rows=slice(0, 16))     # image 0's 16 patches at timestep 100
TXT
