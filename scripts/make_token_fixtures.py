#!/usr/bin/env python3
"""Generate tests/fixtures/token_losses.json: reference values for sepo's token-weighted objectives.

Standalone (it imports nothing from make_fixtures.py; it only needs torch). The Rust tests in
src/train/objectives/tests.rs read the file it writes and never run Python.

    source /root/.cache/sepo-ci/venv-torch-2.9.0/bin/activate      # or make_fixtures.py's .venv
    python scripts/make_token_fixtures.py                           # writes tests/fixtures/token_losses.json
    python scripts/make_token_fixtures.py --out /tmp/fx             # same, elsewhere

Everything is float64 torch, written from the formulas below (the papers' and the reference
implementations'), not from the Rust code. Seeded: two runs give byte-identical files. Every input is
a float32-representable float64 (rounded through float32 once), so a float32 test reads exact inputs.

Formulas (B pairs; a response's per-token policy log-probs lp_t, reference log-probs lr_t, token
weights w_t >= 0; every loss is the mean over the B pairs):

* sepo_weighted (SePO with real-valued token weights):
      u(y, w) = gamma * sum_t w_t lp_t / D,   D = sum_t w_t if that is > 0, else 1 (all-zero side: u = 0)
      loss_i  = -logsigmoid(u_w - u_l - margin)
  run with the real weights and with the 0/1 masks (where D is the key-token count, as before).
* wdpo (DPO on weighted sums: TIS-DPO's / critical-token DPO's form):
      pc = sum_t w_t lp_t (chosen), pr likewise (rejected), rc / rr the same with the reference log-probs
      logits = (pc - pr) - (rc - rr)
      loss_i = -(1 - ls) * logsigmoid(beta * logits) - ls * logsigmoid(-beta * logits)
      rewards: chosen beta * (pc - rc), rejected beta * (pr - rr)
* ipo_sum (IPO on summed log-probs, OpenRLHF DPOLoss(ipo=True), openrlhf/models/loss.py):
      logits = (pc - pr) - (rc - rr)    (pc.. summed over every response token)
      loss_i = (logits - 1/(2 beta))^2; rewards beta * (pc - rc), beta * (pr - rr)
  and, on the same inputs, TRL's IPO on averaged log-probs (the existing `ipo`):
      logits = (pc/nc - pr/nr) - (rc/nc - rr/nr); rewards beta * (pc - rc)/nc, beta * (pr - rr)/nr
* rrhf (Yuan et al. 2023, RRHF; GanjinZero/RRHF train.py, length_penalty 1, two candidates):
      p_c = sum_t lp_t / max(n_c, 1), p_r likewise
      rank_i = (p_r - p_c) if p_c < p_r else 0      (the original's `aval = (rw_diff > 0) & (diff < 0)`)
      sft_i  = -p_c                                 (mean NLL over the chosen response's own tokens)
      loss_i = rank_weight * rank_i + sft_i; rewards p_c, p_r
* tis_weights (the select stage's `mode: weights` rule, TIS-DPO's clipped exponential):
      chosen w = clamp(exp(mu * s), lo, hi), rejected w = clamp(exp(-mu * s), lo, hi), in float64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DT = torch.float64
B = 4


# ----------------------------------------------------------------------------------------------------------------
# JSON helpers (the same output style as make_fixtures.py)
# ----------------------------------------------------------------------------------------------------------------

def fl(x) -> float:
    """A Python float (JSON writes the shortest repr that round-trips)."""
    return float(x)


def flist(t) -> list:
    return [float(v) for v in t.reshape(-1).tolist()]


def _dumps(obj, indent=0) -> str:
    """JSON with one key per line, but every list of scalars on a single line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {_dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{pad} {_dumps(v, indent + 1)}" for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(obj) + "\n"
    assert json.loads(text) == obj
    path.write_text(text)


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round through float32 and back: a float64 that float32 holds exactly."""
    return t.to(torch.float32).to(DT)


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------

def make_inputs(g: torch.Generator) -> dict:
    nc = torch.randint(3, 10, (B,), generator=g).tolist()
    nr = torch.randint(3, 10, (B,), generator=g).tolist()

    def per_token(n):
        return f32(-(0.05 + 2.5 * torch.rand(n, generator=g, dtype=DT)))

    lpc = [per_token(n) for n in nc]
    lpr = [per_token(n) for n in nr]
    # RRHF needs both orders of the per-token averages: pair 0 gets a chosen answer clearly above its
    # rejected one, pair 1 one clearly below (checked below).
    lpc[0] = f32(lpc[0] * 0.4)
    lpr[1] = f32(lpr[1] * 0.4)
    # reference = policy + per-token noise, so that the implicit rewards have both signs (kept < 0: log-probs)
    lrc = [f32((t - 0.3 * torch.randn(t.shape, generator=g, dtype=DT)).clamp(max=-0.01)) for t in lpc]
    lrr = [f32((t - 0.3 * torch.randn(t.shape, generator=g, dtype=DT)).clamp(max=-0.01)) for t in lpr]

    def mask(n):
        m = torch.rand(n, generator=g, dtype=DT) < 0.4
        if not m.any():
            m[torch.randint(0, n, (1,), generator=g)] = True
        return m

    def weights(n):
        w = 3.0 * torch.rand(n, generator=g, dtype=DT)
        w[torch.rand(n, generator=g, dtype=DT) < 0.2] = 0.0  # some tokens weigh nothing
        return f32(w)

    mc = [mask(n) for n in nc]
    mr = [mask(n) for n in nr]
    wc = [weights(n) for n in nc]
    wr = [weights(n) for n in nr]
    # pair 1: no chosen token weighs anything (u_w = 0, zero gradient on that side); the same for the masks
    wc[1] = torch.zeros(nc[1], dtype=DT)
    mc[1] = torch.zeros(nc[1], dtype=torch.bool)
    # pair 2: rejected weights summing to 0.6 (in (0, 1): a count clamped to 1 would be wrong here)
    wr[2] = f32(wr[2] + 0.1)
    wr[2] = f32(wr[2] * (0.6 / wr[2].sum()))
    assert 0.0 < wr[2].sum().item() < 1.0 and (wr[2] > 0).all()
    for w in wc + wr:
        assert ((w >= 0) & (w <= 3)).all()
    for i in range(B):
        assert len(set(map(len, (lpc[i], lrc[i], mc[i], wc[i])))) == 1
        assert len(set(map(len, (lpr[i], lrr[i], mr[i], wr[i])))) == 1
    assert len(set(nc + nr)) > 1, "ragged lengths wanted"
    return {"nc": nc, "nr": nr, "lpc": lpc, "lpr": lpr, "lrc": lrc, "lrr": lrr,
            "mc": mc, "mr": mr, "wc": wc, "wr": wr}


# ----------------------------------------------------------------------------------------------------------------
# objectives (float64, from the formulas in the docstring)
# ----------------------------------------------------------------------------------------------------------------

def leaves(ts):
    return [t.clone().requires_grad_(True) for t in ts]


def sepo_weighted(x, gamma, margin, kind):
    wc, wr = (x["wc"], x["wr"]) if kind == "weights" else ([m.to(DT) for m in x["mc"]], [m.to(DT) for m in x["mr"]])
    tc, tr = leaves(x["lpc"]), leaves(x["lpr"])

    def u(t, w):
        total = w.sum()
        denom = total if total.item() > 0 else torch.ones((), dtype=DT)
        return gamma * (w * t).sum() / denom

    uw = torch.stack([u(t, w) for t, w in zip(tc, wc)])
    ul = torch.stack([u(t, w) for t, w in zip(tr, wr)])
    losses = -F.logsigmoid(uw - ul - margin)
    loss = losses.mean()
    loss.backward()
    return {
        "gamma": gamma, "margin": margin,
        "weights": "chosen_weights / rejected_weights" if kind == "weights" else "chosen_mask / rejected_mask",
        "denominator_chosen": [fl(w.sum()) if w.sum() > 0 else 1.0 for w in wc],
        "denominator_rejected": [fl(w.sum()) if w.sum() > 0 else 1.0 for w in wr],
        "u_chosen": flist(uw.detach()), "u_rejected": flist(ul.detach()),
        "losses": flist(losses.detach()), "loss": fl(loss.detach()),
        "grad_policy_chosen_token_logps": [flist(t.grad) for t in tc],
        "grad_policy_rejected_token_logps": [flist(t.grad) for t in tr],
    }


def wdpo(x, beta, ls):
    tc, tr = leaves(x["lpc"]), leaves(x["lpr"])
    pc = torch.stack([(w * t).sum() for t, w in zip(tc, x["wc"])])
    pr = torch.stack([(w * t).sum() for t, w in zip(tr, x["wr"])])
    rc = torch.stack([(w * t).sum() for t, w in zip(x["lrc"], x["wc"])])
    rr = torch.stack([(w * t).sum() for t, w in zip(x["lrr"], x["wr"])])
    logits = (pc - pr) - (rc - rr)
    losses = -(1 - ls) * F.logsigmoid(beta * logits) - ls * F.logsigmoid(-beta * logits)
    loss = losses.mean()
    loss.backward()
    return {
        "beta": beta, "label_smoothing": ls,
        "weighted_pc": flist(pc.detach()), "weighted_pr": flist(pr.detach()),
        "weighted_rc": flist(rc), "weighted_rr": flist(rr),
        "logits": flist(logits.detach()), "losses": flist(losses.detach()), "loss": fl(loss.detach()),
        "chosen_rewards": flist(beta * (pc - rc).detach()), "rejected_rewards": flist(beta * (pr - rr).detach()),
        "grad_policy_chosen_token_logps": [flist(t.grad) for t in tc],
        "grad_policy_rejected_token_logps": [flist(t.grad) for t in tr],
    }


def ipo_sum(sums, beta):
    pc, pr = sums["pc"].clone().requires_grad_(True), sums["pr"].clone().requires_grad_(True)
    rc, rr = sums["rc"], sums["rr"]
    logits = (pc - pr) - (rc - rr)
    losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    loss.backward()
    out = {
        "beta": beta,
        "logits": flist(logits.detach()), "losses": flist(losses.detach()), "loss": fl(loss.detach()),
        "chosen_rewards": flist(beta * (pc - rc).detach()), "rejected_rewards": flist(beta * (pr - rr).detach()),
        "grad_pc": flist(pc.grad), "grad_pr": flist(pr.grad),
    }
    # TRL's IPO (averaged log-probs) on the same inputs
    nc, nr = sums["nc"].clamp(min=1), sums["nr"].clamp(min=1)
    pc, pr = sums["pc"].clone().requires_grad_(True), sums["pr"].clone().requires_grad_(True)
    logits = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    loss.backward()
    out["ipo_averaged"] = {
        "logits": flist(logits.detach()), "losses": flist(losses.detach()), "loss": fl(loss.detach()),
        "chosen_rewards": flist(beta * ((pc - rc) / nc).detach()),
        "rejected_rewards": flist(beta * ((pr - rr) / nr).detach()),
        "grad_pc": flist(pc.grad), "grad_pr": flist(pr.grad),
    }
    return out


def rrhf(x, rank_weight):
    tc, tr = leaves(x["lpc"]), leaves(x["lpr"])
    p_c = torch.stack([t.sum() / max(len(t), 1) for t in tc])
    p_r = torch.stack([t.sum() / max(len(t), 1) for t in tr])
    rank = torch.where(p_c < p_r, p_r - p_c, torch.zeros_like(p_c))
    sft = -p_c
    losses = rank_weight * rank + sft
    loss = losses.mean()
    loss.backward()
    return {
        "rank_weight": rank_weight,
        "avg_chosen": flist(p_c.detach()), "avg_rejected": flist(p_r.detach()),
        "rank": flist(rank.detach()), "sft": flist(sft.detach()),
        "hinge_zero": [bool(v) for v in (p_c >= p_r).tolist()],
        "losses": flist(losses.detach()), "loss": fl(loss.detach()),
        "chosen_rewards": flist(p_c.detach()), "rejected_rewards": flist(p_r.detach()),
        "grad_policy_chosen_token_logps": [flist(t.grad) for t in tc],
        "grad_policy_rejected_token_logps": [flist(t.grad) for t in tr],
    }


def tis_weights(g: torch.Generator) -> dict:
    special = torch.tensor([-800.0, -40.0, -3.0, -1.0, -0.25, 0.0, 0.25, 1.0, 3.0, 40.0, 800.0], dtype=DT)
    scores = f32(torch.cat([special, 1.5 * torch.randn(9, generator=g, dtype=DT)]))
    cases = []
    for mu, lo, hi in [(1.0, 0.0, 5.0), (2.0, 0.5, 2.0)]:
        cw = torch.exp(mu * scores).clamp(lo, hi)
        rw = torch.exp(-mu * scores).clamp(lo, hi)
        for w in (cw, rw):
            assert (w == lo).any() and (w == hi).any() and ((w > lo) & (w < hi)).any(), (mu, lo, hi, w)
        cases.append({"mu": mu, "lo": lo, "hi": hi, "chosen_weights": flist(cw), "rejected_weights": flist(rw)})
    return {
        "what": "the select stage's mode: weights rule per token score s (float32 values), computed in float64: "
                "chosen clamp(exp(mu*s), lo, hi), rejected clamp(exp(-mu*s), lo, hi); exp(+-800) overflows to "
                "inf / underflows to 0 before the clamp",
        "scores": flist(scores),
        "cases": cases,
    }


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def fixtures() -> dict:
    g = torch.Generator().manual_seed(20240917)
    x = make_inputs(g)
    rows = lambda ts: [flist(t) for t in ts]  # noqa: E731
    bools = lambda ms: [[bool(v) for v in m.tolist()] for m in ms]  # noqa: E731
    inputs = {
        "batch_size": B,
        "nc": x["nc"], "nr": x["nr"],
        "policy_chosen_token_logps": rows(x["lpc"]),
        "policy_rejected_token_logps": rows(x["lpr"]),
        "reference_chosen_token_logps": rows(x["lrc"]),
        "reference_rejected_token_logps": rows(x["lrr"]),
        "chosen_mask": bools(x["mc"]),
        "rejected_mask": bools(x["mr"]),
        "chosen_weights": rows(x["wc"]),
        "rejected_weights": rows(x["wr"]),
    }

    sepo_cases = [sepo_weighted(x, gamma, margin, kind)
                  for kind in ("weights", "mask") for gamma, margin in [(1.0, 0.0), (2.0, 0.3)]]
    wdpo_cases = [wdpo(x, beta, ls) for beta in (0.1, 0.5) for ls in (0.0, 0.1)]

    sums = {
        "pc": torch.stack([t.sum() for t in x["lpc"]]), "pr": torch.stack([t.sum() for t in x["lpr"]]),
        "rc": torch.stack([t.sum() for t in x["lrc"]]), "rr": torch.stack([t.sum() for t in x["lrr"]]),
        "nc": torch.tensor(x["nc"], dtype=DT), "nr": torch.tensor(x["nr"], dtype=DT),
    }
    ipo_cases = [ipo_sum(sums, beta) for beta in (0.1, 0.5)]
    for c in ipo_cases:
        assert abs(c["loss"] - c["ipo_averaged"]["loss"]) > 1e-2

    rrhf_cases = [rrhf(x, rw) for rw in (1.0, 0.5)]
    hz = rrhf_cases[0]["hinge_zero"]
    assert hz[0] and not hz[1], hz
    gaps = [abs(a - b) for a, b in zip(rrhf_cases[0]["avg_chosen"], rrhf_cases[0]["avg_rejected"])]
    assert min(gaps) > 0.05, f"a pair too close to the hinge's kink: {gaps}"

    return {
        "_about": "Expected token-weighted objectives (float64 torch), from scripts/make_token_fixtures.py (its "
                  "docstring has the formulas and sources). Losses are means over the batch of 4 pairs; every input "
                  "is float32-representable. Gradients are with respect to the per-token policy log-probs "
                  "(ragged rows, no padding), or to the summed pc / pr for ipo_sum.",
        "torch": torch.__version__.split("+")[0],
        "formulas": {
            "sepo_weighted": "u(y,w) = gamma * sum_t w_t logp_t / D, D = sum_t w_t if > 0 else 1; "
                             "loss_i = -logsigmoid(u_w - u_l - margin)",
            "wdpo": "pc = sum_t w_t logp_t (policy), rc = sum_t w_t logp_t (reference), same for rejected; "
                    "logits = (pc - pr) - (rc - rr); loss_i = -(1-ls)*logsigmoid(beta*logits) - "
                    "ls*logsigmoid(-beta*logits); rewards beta*(pc-rc), beta*(pr-rr)",
            "ipo_sum": "pc.. = sums over every response token; logits = (pc - pr) - (rc - rr); "
                       "loss_i = (logits - 1/(2*beta))^2; rewards beta*(pc-rc), beta*(pr-rr) (OpenRLHF DPOLoss ipo=True)",
            "ipo_averaged": "logits = (pc/nc - pr/nr) - (rc/nc - rr/nr); loss_i = (logits - 1/(2*beta))^2; "
                            "rewards beta*(pc-rc)/nc, beta*(pr-rr)/nr (TRL loss_type ipo)",
            "rrhf": "p = sum_t logp_t / max(n, 1); rank_i = p_r - p_c if p_c < p_r else 0; sft_i = -p_c; "
                    "loss_i = rank_weight*rank_i + sft_i; rewards p_c, p_r",
            "tis_weights": "chosen clamp(exp(mu*s), lo, hi); rejected clamp(exp(-mu*s), lo, hi)",
        },
        "inputs": inputs,
        "sepo_weighted": sepo_cases,
        "wdpo": wdpo_cases,
        "ipo_sum": {
            "inputs": {"pc": flist(sums["pc"]), "pr": flist(sums["pr"]), "rc": flist(sums["rc"]),
                       "rr": flist(sums["rr"]), "nc": x["nc"], "nr": x["nr"]},
            "cases": ipo_cases,
        },
        "rrhf": rrhf_cases,
        "tis_weights": tis_weights(g),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures"), help="output folder (default tests/fixtures)")
    a = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    path = Path(a.out).resolve() / "token_losses.json"
    fx = fixtures()
    write_json(path, fx)
    print(f"torch {torch.__version__}; wrote {path} ({path.stat().st_size} bytes, "
          f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})")
    for c in fx["sepo_weighted"]:
        print(f"  sepo_weighted {c['weights']:<35} gamma {c['gamma']} margin {c['margin']}: loss {c['loss']:.12f}")
    for c in fx["wdpo"]:
        print(f"  wdpo beta {c['beta']} ls {c['label_smoothing']}: loss {c['loss']:.12f}")
    for c in fx["ipo_sum"]["cases"]:
        print(f"  ipo_sum beta {c['beta']}: loss {c['loss']:.12f} (averaged ipo {c['ipo_averaged']['loss']:.12f})")
    for c in fx["rrhf"]:
        print(f"  rrhf rank_weight {c['rank_weight']}: loss {c['loss']:.12f}, hinge 0 on pairs "
              f"{[i for i, z in enumerate(c['hinge_zero']) if z]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
