#!/usr/bin/env bash
# guidellm and `python -m jds.bench serve` against one server, on one workload: 256-token prompts,
# 64 generated tokens, 0.3 requests a second (constant rate: below the 2-core CPU's saturation),
# 24 requests per run, the two tools alternating for three rounds, so that a slow minute of the
# machine shows as one run out of line.
#
# Needs: a server on the default config with its HTTP API on :8011
#   python -m jds.server --config configs/smollm2-135m.yaml --http-port 8011
# guidellm in a virtual environment of its own (`pip install guidellm`, 0.8.1 here), and a
# folder named SmolLM2-135M-Instruct in the working directory holding the model's Hugging Face
# tokenizer (../lm-eval-local-completions/make_hf_model.py writes one): guidellm loads the
# tokenizer named by the model, and the model name must be the served one.
set -euo pipefail
OUT=${OUT:-$(pwd)}
GUIDELLM=${GUIDELLM:-guidellm}
REQUESTS=24
RATE=0.3
python - "$OUT/trace.jsonl" "$REQUESTS" "$RATE" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"timestamp": 1000 * i / float(sys.argv[3]), "input_length": 256, "output_length": 64}) + "\n")
PY
for round in 1 2 3; do
  HF_HUB_OFFLINE=1 "$GUIDELLM" run \
    --backend kind=openai_http,target=http://127.0.0.1:8011,model=SmolLM2-135M-Instruct,request_format=/v1/completions \
    --profile kind=constant,rate=$RATE --constraint kind=max_requests,count=$REQUESTS \
    --data kind=synthetic_text,prompt_tokens=256,output_tokens=64 \
    --output kind=json,path="$OUT/guidellm-$round.json" --disable-console-interactive > "$OUT/guidellm-$round.txt" 2>&1
  python -m jds.bench serve --api openai --server 127.0.0.1:8011 --trace "$OUT/trace.jsonl" \
    --label "jds.bench round $round" --out "$OUT/bench-$round" > "$OUT/bench-$round.txt" 2>&1
done
python "$(dirname "$0")/summarize.py" "$OUT"
