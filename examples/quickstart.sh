#!/usr/bin/env bash
# Strata quickstart: set up, build a tiny seeded model (no download), extract activations of the
# shipped corpus into ./acts, and show how to open them from a notebook. Runs offline.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
build_tiny_gpt2

strata extract examples/quickstart.yaml "$@"
# Verify what the job wrote: the spec's store and name, with any --set overrides applied.
read -r STORE NAME < <(python - "$@" <<'PY'
import sys
from strata.jobs.spec import read_raw
args, sets = sys.argv[1:], []
for i, a in enumerate(args):
    if a == "--set" and i + 1 < len(args):
        sets.append(args[i + 1])
    elif a.startswith("--set="):
        sets.append(a[len("--set="):])
raw = read_raw("examples/quickstart.yaml", sets)
print(raw.get("store", "./acts"), raw["name"])
PY
)
strata verify "$STORE" "$NAME"
cat <<'TXT'

Open it from a notebook:

    import strata
    ds = strata.open("./acts", create=False).dataset("tiny-gpt2-quickstart")
    ds.info                                   # model, revision, tokenizer, corpus fingerprint, hooks, units
    x = ds.read("blocks.3.hook_resid_post", rows=slice(0, 4096), as_="torch")
    toks = ds.tokens()                        # token_id, doc_id, special, ... row-aligned with x
    with ds.iter_batches("blocks.3.hook_resid_post", batch_size=4096, shuffle=True, seed=0) as batches:
        for batch in batches:
            ...

Run it again: it is a no-op. Add a hook: strata extract examples/quickstart.yaml --set 'hooks=[blocks.*.hook_mlp_out]'
TXT
