"""PyTorch (eager) counterpart of examples/bench.rs: the same 4-layer, 256-wide Llama with the
Llama-2 vocabulary, batch 8 x 256, same modes, one JSON line per run.

    python scripts/bench_torch.py forward|sft|dpo|dpo-inline|sepo [--reps 3]

dpo uses precomputed reference sums (like sepo's cached reference log-probs); dpo-inline runs a
reference forward each step, as TRL does without precompute_ref_log_probs.
"""
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, SEQ, PROMPT = 8, 256, 64


def ids(n, salt):
    g = torch.Generator().manual_seed(salt)
    return torch.randint(0, 32000, (n,), generator=g)


def model(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=688, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).float()


def response_logps(m, seqs):
    """Per-token log-probs of the response part (positions PROMPT..SEQ-1) of each sequence."""
    logits = m(seqs[:, :-1]).logits[:, PROMPT - 1:]
    return torch.gather(F.log_softmax(logits.float(), -1), 2, seqs[:, PROMPT:].unsqueeze(-1)).squeeze(-1)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "forward"
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 3
    torch.set_num_threads(torch.get_num_threads())
    m = model(0)
    chosen = torch.stack([torch.cat([ids(PROMPT, i), ids(SEQ - PROMPT, 100 + i)]) for i in range(BATCH)])
    rejected = torch.stack([torch.cat([ids(PROMPT, i), ids(SEQ - PROMPT, 200 + i)]) for i in range(BATCH)])
    if mode == "forward":
        m.eval()
        x = chosen
        def step():
            with torch.no_grad():
                logits = m(x).logits
                torch.gather(F.log_softmax(logits, -1), 2, x.unsqueeze(-1)).sum().item()
        tokens = BATCH * SEQ
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
        ref = model(1).eval() if mode == "dpo-inline" else None
        mask = (torch.arange(SEQ - PROMPT) % 10 < 3).float().expand(BATCH, -1)
        def step():
            opt.zero_grad()
            if mode == "sft":
                loss = -response_logps(m, chosen).mean()
            else:
                both = response_logps(m, torch.cat([chosen, rejected]))
                lc, lr = both[:BATCH], both[BATCH:]
                if mode == "sepo":
                    u = lambda lp: (lp * mask).sum(-1) / mask.sum(-1)
                    loss = -F.logsigmoid(u(lc) - u(lr)).mean()
                else:
                    if ref is not None:
                        with torch.no_grad():
                            rb = response_logps(ref, torch.cat([chosen, rejected])).sum(-1)
                        rc, rr = rb[:BATCH], rb[BATCH:]
                    else:
                        rc, rr = torch.full((BATCH,), -100.0), torch.full((BATCH,), -110.0)
                    loss = -F.logsigmoid(0.1 * ((lc.sum(-1) - rc) - (lr.sum(-1) - rr))).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            loss.item()
        tokens = BATCH * SEQ if mode == "sft" else 2 * BATCH * SEQ
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    secs = (time.perf_counter() - t0) / reps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": f"pytorch {torch.__version__} eager", "device": f"cpu ({torch.get_num_threads()} threads)",
                      "mode": mode, "seconds": round(secs, 4), "tokens": tokens,
                      "tokens_per_s": round(tokens / secs, 1), "peak_rss_mb": round(rss, 1)}))


if __name__ == "__main__":
    main()
