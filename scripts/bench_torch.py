"""PyTorch (eager) counterpart of examples/bench.rs: the same model shapes, batches and modes, one
JSON line per run.

    python scripts/bench_torch.py forward|sft|dpo|dpo-inline|sepo [--reps 3]
        [--model small|tinyllama] [--batch 8] [--seq 256] [--data tokens.parquet]
        [--device cpu|cuda] [--bf16] [--phases]

dpo uses precomputed reference sums (like sepo's cached reference log-probs); dpo-inline runs a
reference forward each step, as TRL does without precompute_ref_log_probs. `--bf16` runs the
forward and the loss under torch.autocast(bfloat16) with f32 weights and an f32 AdamW (what mixed
precision training does); log-softmax runs in f32 as autocast decides. `--data` takes real token
rows by examples/bench.rs's rule (see `real_rows`). `--phases` waits for the device after each
phase of a training step and adds each one's mean to the JSON (`phases_ms`), as sepo's
`SEPO_STEP_PHASES=1` does.
"""
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "small": dict(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=688, max_position_embeddings=2048),
    # TinyLlama-1.1B's shape, 1.10B parameters.
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048,
                      rms_norm_eps=1e-5),
    # TinyLlama's depth and head layout with almost no arithmetic: the host's cost per step.
    "overhead": dict(vocab_size=512, hidden_size=64, num_hidden_layers=22, num_attention_heads=8,
                     num_key_value_heads=1, intermediate_size=176, max_position_embeddings=2048,
                     rms_norm_eps=1e-5),
    # stories260K's shape, the main job's model (tied embeddings as in its config.json).
    "stories": dict(vocab_size=512, hidden_size=64, num_hidden_layers=5, num_attention_heads=8,
                    num_key_value_heads=4, intermediate_size=172, max_position_embeddings=512,
                    rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def arg(name, default, cast=str):
    return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def ids(n, salt, vocab=32000):
    g = torch.Generator().manual_seed(salt)
    return torch.randint(0, vocab, (n,), generator=g)


def model(name, seed, device):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**CONFIGS[name])
    # Built on the device itself: initializing 1.1B parameters on the host first took about 25 s
    # of each GPU run (bench/gpu.sh's 5-minute budget), for weights whose values do not matter here.
    with device:
        return LlamaForCausalLM(cfg).float()


def real_rows(path, batch, seq):
    """examples/bench.rs's rule: the first rows whose answers both have at least seq - p tokens,
    p = min(len(prompt), seq // 4); the prompt's last p tokens, each answer's first seq - p."""
    import pyarrow.parquet as pq
    t = pq.read_table(path, columns=["prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()
    out = []
    for r in t:
        p = min(len(r["prompt_ids"]), seq // 4)
        n = seq - p
        if p > 0 and len(r["chosen_ids"]) >= n and len(r["rejected_ids"]) >= n:
            prompt = r["prompt_ids"][len(r["prompt_ids"]) - p:]
            out.append((prompt + r["chosen_ids"][:n], prompt + r["rejected_ids"][:n], p))
        if len(out) == batch:
            break
    if len(out) < batch:
        sys.exit(f"{path}: only {len(out)} rows have answers long enough for {seq}-token sequences")
    return out


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "forward"
    reps = arg("--reps", 3, int)
    name = arg("--model", "small")
    batch, seq = arg("--batch", 8, int), arg("--seq", 256, int)
    data = arg("--data", None)
    device = torch.device(arg("--device", "cpu"))
    bf16 = "--bf16" in sys.argv
    # --phases: wait for the device after forward, backward, clipping and the optimizer, and
    # report each one's mean (sepo's SEPO_STEP_PHASES=1 does the same in its training loop).
    phases = "--phases" in sys.argv
    spent = {k: 0.0 for k in ("forward", "backward", "clip", "optimizer")}
    mark_at = [0.0]

    def mark(name=None):
        if not phases:
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if name:
            spent[name] += now - mark_at[0]
        mark_at[0] = now
    torch.set_num_threads(torch.get_num_threads())
    m = model(name, 0, device)
    params = sum(p.numel() for p in m.parameters())
    if data:
        rows = real_rows(data, batch, seq)
        chosen = torch.tensor([r[0] for r in rows])
        rejected = torch.tensor([r[1] for r in rows])
        prompt_lens = [r[2] for r in rows]
    else:
        p = seq // 4
        v = CONFIGS[name]["vocab_size"]
        chosen = torch.stack([torch.cat([ids(p, i, v), ids(seq - p, 100 + i, v)]) for i in range(batch)])
        rejected = torch.stack([torch.cat([ids(p, i, v), ids(seq - p, 200 + i, v)]) for i in range(batch)])
        prompt_lens = [p] * batch
    chosen, rejected = chosen.to(device), rejected.to(device)
    # 1.0 on each row's response positions (the tokens after its prompt), as sepo's loss sees them.
    resp = torch.zeros(batch, seq - 1, device=device)
    for i, p in enumerate(prompt_lens):
        resp[i, p - 1:] = 1.0

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    # Logits only from the first response position on (the batch's shortest prompt), as sepo
    # computes them only at response positions.
    start = min(prompt_lens) - 1

    def response_logps(mdl, seqs, both=False):
        """Per-token log-probs of the next tokens from `start` on, zeroed outside the responses."""
        with autocast():
            logits = mdl(seqs[:, :-1]).logits[:, start:]
        targets = seqs[:, start + 1:].unsqueeze(-1)
        lp = torch.gather(F.log_softmax(logits.float(), -1), 2, targets).squeeze(-1)
        r = (torch.cat([resp, resp]) if both else resp)[:, start:]
        return lp * r, r

    if mode == "forward":
        m.eval()
        def step():
            with torch.no_grad(), autocast():
                logits = m(chosen).logits
            torch.gather(F.log_softmax(logits.float(), -1), 2, chosen.unsqueeze(-1)).sum().item()
        tokens = batch * seq
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
        ref = model(name, 1, device).eval() if mode == "dpo-inline" else None
        def step():
            opt.zero_grad()
            mark()
            if mode == "sft":
                lp, r = response_logps(m, chosen)
                loss = -lp.sum() / r.sum()
            else:
                lp, r = response_logps(m, torch.cat([chosen, rejected]), both=True)
                lc, lr = lp[:batch], lp[batch:]
                if mode == "sepo":
                    key = (torch.arange(start, seq - 1, device=device) % 10 < 3).float() * r[:batch]
                    u = lambda x: (x * key).sum(-1) / key.sum(-1).clamp_min(1)
                    loss = -F.logsigmoid(u(lc) - u(lr)).mean()
                else:
                    if ref is not None:
                        with torch.no_grad():
                            rb = response_logps(ref, torch.cat([chosen, rejected]), both=True)[0].sum(-1)
                        rc, rr = rb[:batch], rb[batch:]
                    else:
                        rc = torch.full((batch,), -100.0, device=device)
                        rr = torch.full((batch,), -110.0, device=device)
                    loss = -F.logsigmoid(0.1 * ((lc.sum(-1) - rc) - (lr.sum(-1) - rr))).mean()
            if phases:
                loss.item()  # where sepo's loop reads its loss (a device wait): before the backward
            mark("forward")
            loss.backward()
            mark("backward")
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            mark("clip")
            opt.step()
            mark("optimizer")
            loss.item()
        tokens = batch * seq if mode == "sft" else 2 * batch * seq
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    spent.update((k, 0.0) for k in spent)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / reps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f"cpu ({torch.get_num_threads()} threads)")
    out = {"impl": f"pytorch {torch.__version__} eager" + (" bf16 autocast" if bf16 else ""),
           "device": where, "mode": mode, "model": name, "batch": batch, "seq": seq,
           "data": data or "random", "parameters": params, "seconds": round(secs, 4), "tokens": tokens,
           "tokens_per_s": round(tokens / secs, 1),
           "model_flops_per_s": (2.0 if mode == "forward" else 6.0) * params * tokens / secs,
           "peak_rss_mb": round(rss, 1)}
    if phases and mode != "forward":
        out["phases_ms"] = {k: round(1e3 * v / reps, 2) for k, v in spent.items()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
