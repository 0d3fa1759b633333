#!/usr/bin/env bash
# Vision quickstart: a tiny seeded ViT and 48 generated captioned images (no download), extracted
# into ./acts; then the captions through the text quickstart's tiny GPT-2, and a paired
# image-caption comparison. Runs offline.
set -euo pipefail
. "$(dirname "$0")/_env.sh"

[ -f models/tiny-vit/config.json ] || python -m strata.pipeline.tiny models/tiny-vit --family vit --layers 4 --d-model 128 --heads 4 --seed 0
[ -f data/shapes/metadata.jsonl ] || python -m strata.pipeline.tiny data/shapes --images 48 --seed 0
strata extract examples/vision.yaml "$@"
strata verify ./acts tiny-vit-shapes

build_tiny_gpt2
strata extract examples/captions.yaml
strata analyze examples/paired.yaml
cat <<'TXT'

Open it from a notebook:

    import strata
    s = strata.open("./acts", create=False)
    ds = s.dataset("tiny-vit-shapes")
    ds.docs()                                  # image id, size, caption, label, row span
    x = ds.read("blocks.3.hook_resid_post", docs=ds.docs()["doc_id"][:4].to_pylist())   # 4 images x 17 tokens
    import pyarrow.compute as pc
    t = ds.tokens()                            # token_id: -1 CLS (special), 0..15 the patches, row-major
    cls = ds.read("blocks.3.hook_resid_post", rows=t.filter(pc.equal(t["token_id"], -1))["row"].to_numpy())

    from strata.analysis import similarity
    similarity.compare((ds, "blocks.3.hook_resid_post"), (s.dataset("tiny-gpt2-captions"), "blocks.3.hook_resid_post"),
                       metrics=["mutual_knn", "linear_cka"], align="docs", pool=("cls", "last"))
TXT
