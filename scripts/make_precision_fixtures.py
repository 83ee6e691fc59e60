#!/usr/bin/env python3
"""Generate tests/fixtures/precision.json: transformers under torch.autocast (bf16 and f16) on the
committed tiny models and stories260K, for sepo's mixed-precision parity tests.

Standalone (it imports nothing from make_fixtures.py). The Rust tests read the file it writes and
never run Python.

    source /root/.cache/sepo-ci/venv-torch-2.9.0/bin/activate      # or make_fixtures.py's .venv
    python scripts/make_precision_fixtures.py                       # writes tests/fixtures/precision.json
    python scripts/make_precision_fixtures.py --out /tmp/fx         # same, elsewhere

What mixed precision means here is what a user gets from transformers + torch.autocast on CPU:
each model is loaded in float32 (the master weights), with SDPA attention, and run inside
`torch.autocast("cpu", dtype=...)`: linear layers, the attention product and the LM head run in the
low precision; embeddings, norms, rotary embeddings and the residual stream stay float32. The
log-softmax is taken on `logits.float()`, as transformers' loss does.

Everything is computed twice, with transformers' SDPA attention (the reference) and with its eager
attention (`*_eager`): two implementations of the same precision, whose spread is the yardstick for
how closely a third one can be expected to agree (bf16 keeps 8 bits of mantissa, so summation
order alone moves log-probs by a few hundredths on these models).

For each model: two right-padded sequences (seeded random ids after BOS, lengths 40 and 29) and,
for every precision (f32, bf16, f16), the log-prob of each next token at each real position, plus
one SFT-style training step's loss (mean next-token NLL over both sequences) and the global norm of
its gradient with respect to the float32 parameters (autocast's backward). The f32 values are there
so a test can state its tolerance against the gap between f32 and the low precision.
Seeded and deterministic: two runs give byte-identical files.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    ("tiny-llama", ROOT / "tests/fixtures/hf/tiny-llama"),
    ("tiny-llama-tied-bf16", ROOT / "tests/fixtures/hf/tiny-llama-tied-bf16"),
    ("tiny-mistral", ROOT / "tests/fixtures/hf/tiny-mistral"),
    ("tiny-qwen2", ROOT / "tests/fixtures/hf/tiny-qwen2"),
    ("tiny-neox", ROOT / "tests/fixtures/hf/tiny-neox"),
    ("stories260K", ROOT / "models/stories260K"),
]
LENGTHS = [40, 29]
BOS = 1
PRECISIONS = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}


def inputs(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        ids[0] = BOS
        seqs.append(ids)
    return seqs


def run(model, seqs, dtype):
    """Per-sequence next-token log-probs, the mean NLL and its gradient norm."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_seq, nll = [], []
    for b, s in enumerate(seqs):
        lp = logp[b, torch.arange(len(s) - 1), torch.tensor(s[1:])]
        per_seq.append(lp)
        nll.append(-lp)
    loss = torch.cat(nll).mean()
    loss.backward()
    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return [[float(x) for x in lp.detach()] for lp in per_seq], float(loss.detach()), math.sqrt(sq)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic reductions
    out = {
        "_about": __doc__.strip().splitlines()[0],
        "torch": torch.__version__,
        "models": {},
    }
    for i, (name, d) in enumerate(MODELS):
        entry = {"path": str(d.relative_to(ROOT))}
        for impl, suffix in (("sdpa", ""), ("eager", "_eager")):
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation=impl)
            model.train(False)
            seqs = inputs(model.config.vocab_size, 1000 + i)
            entry["ids"] = seqs
            for pname, dtype in PRECISIONS.items():
                lps, loss, gnorm = run(model, seqs, dtype)
                entry[pname + suffix] = {"logprobs": lps, "loss": loss, "grad_norm": gnorm}
        gap = max(abs(a - b) for s16, s32 in zip(entry["bf16"]["logprobs"], entry["f32"]["logprobs"]) for a, b in zip(s16, s32))
        print(f"{name}: bf16 vs f32 max |dlogp| {gap:.4f}, loss f32 {entry['f32']['loss']:.5f} bf16 {entry['bf16']['loss']:.5f} f16 {entry['f16']['loss']:.5f}")
        out["models"][name] = entry
    path = Path(args.out) / "precision.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
