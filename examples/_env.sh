# Sourced by the quickstart scripts: the repository root, the virtual environment (created by
# .ci/setup when missing), offline Hugging Face settings, and the text quickstart's tiny model.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  bash .ci/setup
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# A tiny GPT-2-shaped model with a tokenizer trained on the shipped corpus (no download).
build_tiny_gpt2() {
  if [ ! -f models/tiny-gpt2/config.json ]; then
    python -m strata.pipeline.tiny models/tiny-gpt2 --family gpt2 --layers 4 --d-model 128 --heads 4 \
      --max-positions 512 --vocab-size 1024 --seed 0 --corpus examples/corpus.jsonl
  fi
}
