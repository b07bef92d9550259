"""The two runs' per-choice log-likelihoods side by side: the largest difference, and whether
each question was decided alike."""

import json
import sys


def load(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {d["doc_id"]: d for d in map(json.loads, f)}


def main(a: str = "samples-transformers.jsonl", b: str = "samples-jds.jsonl") -> None:
    ref, got = load(a), load(b)
    diffs = [abs(float(x[0][0]) - float(y[0][0])) for i in ref for x, y in zip(ref[i]["resps"], got[i]["resps"])]
    same = sum(ref[i]["acc"] == got[i]["acc"] for i in ref)
    print(f"{len(diffs)} choices: largest log-likelihood difference {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}")
    print(f"{same} of {len(ref)} questions scored alike")


if __name__ == "__main__":
    main(*sys.argv[1:])
