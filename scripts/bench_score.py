"""The official SePO token scorer's loop (SteveKGYang/SePO, token_score.py), timed: for each pair,
one forward of prompt+chosen and one of prompt+rejected through the oracle and through the
reference, log_softmax over the whole sequence, the response tokens' log-probs gathered, and their
difference. Per example (no batching), torch eager, float32, CPU, no_grad, transformers'
AutoModelForCausalLM with its default attention (sdpa).

    python scripts/bench_score.py ORACLE_DIR REFERENCE_DIR ROWS.json [--threads 2] [--scores S.json]

ROWS.json is `sepo show PIPELINE TOKENS --json --rows N` (the token ids sepo scored), so both sides
score the same rows with the same models (`sepo export` folders). With --scores (`sepo show
PIPELINE SCORE --json --rows N`), the largest difference from sepo's token scores is printed too.
Prints one JSON line: pairs, response tokens, seconds, response tokens/s, threads.

The token counted and scored is every response token (EOS included), predicted from the position
before it, as sepo does (the official script drops the first response token: its `[len(context):]`
slice is applied after the one-position shift).
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def load(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.eval()


def token_logps(model, ids):
    logits = model(ids)["logits"].detach()[:, :-1, :]
    return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:].unsqueeze(2)).squeeze(2)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("oracle")
    ap.add_argument("reference")
    ap.add_argument("rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scores")
    ap.add_argument("--limit", type=int)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = json.load(open(a.rows))["head"][: a.limit]
    oracle, reference = load(a.oracle), load(a.reference)
    # One untimed warm-up forward (first-call allocations and kernel selection).
    with torch.no_grad():
        token_logps(oracle, torch.tensor([rows[0]["prompt_ids"] + rows[0]["chosen_ids"]]))
    scores = []
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in rows:
            p = r["prompt_ids"]
            pair = []
            for resp in (r["chosen_ids"], r["rejected_ids"]):
                ids = torch.tensor([p + resp])
                adv = token_logps(oracle, ids) - token_logps(reference, ids)
                pair.append(adv[len(p) - 1:])
                tokens += len(resp)
            scores.append(pair)
    secs = time.perf_counter() - t0
    out = {
        "impl": "pytorch-per-example",
        "pairs": len(rows),
        "response_tokens": tokens,
        "seconds": round(secs, 3),
        "tokens_per_s": round(tokens / secs, 1),
        "threads": torch.get_num_threads(),
        "attention": oracle.config._attn_implementation,
    }
    if a.scores:
        theirs = json.load(open(a.scores))["head"][: a.limit]
        worst = 0.0
        for (c, rj), s in zip(scores, theirs):
            for mine, key in ((c, "chosen_scores"), (rj, "rejected_scores")):
                worst = max(worst, (mine - torch.tensor(s[key])).abs().max().item())
        out["max_abs_diff_vs_sepo"] = worst
    print(json.dumps(out))


if __name__ == "__main__":
    main()
