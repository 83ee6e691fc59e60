#!/usr/bin/env python3
"""Reference values for the `evaluate` stage's figures, computed independently of sepo.

Writes tests/fixtures/eval/:
- preference.json: per-token log-probs of 12 pairs (policy and reference, with key-token masks)
  and the held-out metrics TRL logs for them, computed with torch in float64 from TRL's DPO
  evaluation formulas (trl/trainer/dpo_trainer.py, `get_batch_loss_metrics`):
      chosen_rewards   = beta * (policy_chosen_logps - reference_chosen_logps)
      rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
      reward_accuracies = (chosen_rewards > rejected_rewards).float()
      margins = chosen_rewards - rejected_rewards
  plus SimPO's length-normalized log-prob (average over the response tokens) and the same on the
  key tokens only. Each figure is the mean over pairs with its standard error (ddof=1 / sqrt(n)).
- winrate.json: 80 judged duels (scores, lengths, ties) and the win rate, its standard error, and
  the length-controlled win rate: statsmodels' `GLM(y, [1, tanh(d / sd(d))], family=Binomial())`
  (ties count 1/2), read off at zero length difference: expit(intercept), with the delta-method
  standard error expit'(a) * bse(a).

- pairs.jsonl + e2e.json: an end-to-end case for tests/evaluate.rs. Eight preference rows (six
  `test`, two `train`), tokenized as sepo's `tokenize` stage does with `template: none`
  (`tokenizer(prompt)` with its BOS, each response encoded without special tokens then EOS);
  transformers (float32, eager attention) gives the log-probs of tests/fixtures/hf/tiny-llama (the
  policy) and tiny-mistral (the reference) on the test rows, their greedy answers (generate,
  do_sample=False, max_new_tokens 6, stopping at EOS), and the scores of the reward model
  tiny-llama-rm (AutoModelForSequenceClassification, one sequence at a time) on prompt + answer and
  prompt + chosen. The expected report figures are computed from those with numpy/statsmodels as
  above.

Run: python scripts/make_eval_fixtures.py  (torch, numpy, statsmodels; seeded, deterministic).
"""

import json
from pathlib import Path

import numpy as np
import statsmodels.api as sm
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "eval"


def mean_se(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def preference():
    rng = np.random.default_rng(7)
    beta = 0.1
    pairs = []
    for _ in range(12):
        lc, lr = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        p = {
            "chosen": (rng.normal(-2, 1, lc)).astype(np.float32).tolist(),
            "rejected": (rng.normal(-2, 1, lr)).astype(np.float32).tolist(),
            "ref_chosen": (rng.normal(-2, 1, lc)).astype(np.float32).tolist(),
            "ref_rejected": (rng.normal(-2, 1, lr)).astype(np.float32).tolist(),
            "chosen_mask": (rng.random(lc) < 0.4).tolist(),
            "rejected_mask": (rng.random(lr) < 0.4).tolist(),
        }
        pairs.append(p)
    expected = {}
    for prefix, masked in (("", False), ("key_", True)):
        def s(v, m):
            t = torch.tensor(v, dtype=torch.float32).double()
            if masked:
                t = t * torch.tensor(m, dtype=torch.float64)
            return t.sum()

        def avg(v, m):
            n = sum(m) if masked else len(v)
            return s(v, m) / max(n, 1)

        pc = torch.stack([s(p["chosen"], p["chosen_mask"]) for p in pairs])
        pr = torch.stack([s(p["rejected"], p["rejected_mask"]) for p in pairs])
        rc = torch.stack([s(p["ref_chosen"], p["chosen_mask"]) for p in pairs])
        rr = torch.stack([s(p["ref_rejected"], p["rejected_mask"]) for p in pairs])
        chosen_rewards = beta * (pc - rc)
        rejected_rewards = beta * (pr - rr)
        acc = (chosen_rewards > rejected_rewards).double()
        margins = chosen_rewards - rejected_rewards
        norm = torch.stack([avg(p["chosen"], p["chosen_mask"]) - avg(p["rejected"], p["rejected_mask"]) for p in pairs])
        for name, v in (
            ("reward_chosen", chosen_rewards),
            ("reward_rejected", rejected_rewards),
            ("reward_margin", margins),
            ("reward_accuracy", acc),
            ("logp_margin", norm),
            ("logp_accuracy", (norm > 0).double()),
        ):
            m, se = mean_se(v.numpy())
            expected[prefix + name] = {"value": m, "stderr": se}
    return {"beta": beta, "pairs": pairs, "expected": expected}


def winrate():
    rng = np.random.default_rng(11)
    n = 80
    lens = rng.integers(5, 60, n)
    opp = rng.integers(5, 60, n)
    # A judge that likes length a little, plus noise; a few exact ties.
    score = 0.02 * lens + rng.normal(0, 1, n)
    opp_score = 0.02 * opp + rng.normal(0, 1, n)
    opp_score[:6] = score[:6]
    y = np.where(score > opp_score, 1.0, np.where(score < opp_score, 0.0, 0.5))
    d = (lens - opp).astype(np.float64)
    x = np.tanh(d / d.std(ddof=1))
    fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial()).fit()
    a, se_a = float(fit.params[0]), float(fit.bse[0])
    lc = 1.0 / (1.0 + np.exp(-a))
    rate, se = mean_se(y)
    return {
        "duels": [
            {"score": float(s), "opponent_score": float(o), "len": int(l), "opponent_len": int(ol)}
            for s, o, l, ol in zip(score, opp_score, lens, opp)
        ],
        "expected": {
            "wins": int((y == 1).sum()),
            "losses": int((y == 0).sum()),
            "ties": int((y == 0.5).sum()),
            "rate": rate,
            "stderr": se,
            "intercept": a,
            "intercept_se": se_a,
            "slope": float(fit.params[1]),
            "lc_rate": float(lc),
            "lc_stderr": float(lc * (1 - lc) * se_a),
        },
    }


HF = OUT.parent / "hf"


def e2e_pairs():
    words = ["cats", "rain", "tea", "boats", "music", "snow", "bread", "stars"]
    rows = []
    for i, w in enumerate(words):
        rows.append({
            "id": f"p{i}",
            "split": "train" if i < 2 else "test",
            "prompt": f"Tell me about {w}.",
            "chosen": f"I like {w} a lot, they are nice.",
            "rejected": f"No. {w}?" if i % 2 else f"{w} {w} {w}",
        })
    return rows


def win_figures(score, opp_score, lens, opp_lens, same):
    y = np.where(same | (score == opp_score), 0.5, np.where(score > opp_score, 1.0, 0.0))
    rate, se = mean_se(y)
    out = {"win_rate": (rate, se), "wins": float((y == 1).sum()), "losses": float((y == 0).sum()), "ties": float((y == 0.5).sum())}
    d = (np.asarray(lens) - np.asarray(opp_lens)).astype(np.float64)
    lc = (rate, se)
    if d.std(ddof=1) > 0:
        x = np.tanh(d / d.std(ddof=1))
        try:
            fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial()).fit()
            a = float(fit.params[0])
            if abs(a) < 30 and np.isfinite(fit.bse[0]):
                p = 1.0 / (1.0 + np.exp(-a))
                lc = (float(p), float(p * (1 - p) * fit.bse[0]))
        except Exception:  # perfect separation: sepo falls back to the raw rate too
            pass
    out["lc_win_rate"] = lc
    return out


def e2e():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from tokenizers import Tokenizer

    rows = e2e_pairs()
    tok = Tokenizer.from_file(str(HF / "tiny-llama" / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    for r in rows:
        r["prompt_ids"] = tok.encode(r["prompt"]).ids
        r["chosen_ids"] = tok.encode(r["chosen"], add_special_tokens=False).ids + [eos]
        r["rejected_ids"] = tok.encode(r["rejected"], add_special_tokens=False).ids + [eos]
    test = [r for r in rows if r["split"] == "test"]

    def lm(name):
        return AutoModelForCausalLM.from_pretrained(HF / name, dtype=torch.float32, attn_implementation="eager").eval()

    def logps(model, prompt, resp):
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].double()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(resp)[:, None])[:, 0].numpy()

    def answer(model, prompt):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=eos)
        return out[0, len(prompt):].tolist()

    beta = 0.1
    policy, reference = lm("tiny-llama"), lm("tiny-mistral")
    rm = AutoModelForSequenceClassification.from_pretrained(HF / "tiny-llama-rm", dtype=torch.float32, attn_implementation="eager").eval()

    def judge(prompt, resp):
        with torch.no_grad():
            return float(rm(torch.tensor([prompt + resp])).logits[0, 0])

    exp = {}
    models = {"llama": policy, "mistral": reference}
    lp = {m: [(logps(mod, r["prompt_ids"], r["chosen_ids"]), logps(mod, r["prompt_ids"], r["rejected_ids"])) for r in test] for m, mod in models.items()}
    for m in models:
        avg = np.array([c.mean() - rj.mean() for c, rj in lp[m]])
        figs = {"logp_margin": mean_se(avg), "logp_accuracy": mean_se((avg > 0).astype(float))}
        if m == "llama":
            rc = np.array([beta * (c.sum() - rc_.sum()) for (c, _), (rc_, _) in zip(lp["llama"], lp["mistral"])])
            rr = np.array([beta * (rj.sum() - rr_.sum()) for (_, rj), (_, rr_) in zip(lp["llama"], lp["mistral"])])
            figs.update({
                "reward_chosen": mean_se(rc), "reward_rejected": mean_se(rr),
                "reward_margin": mean_se(rc - rr), "reward_accuracy": mean_se((rc > rr).astype(float)),
            })
        exp[m] = figs
    answers = {m: [answer(mod, r["prompt_ids"]) for r in test] for m, mod in models.items()}
    scores = {m: np.array([judge(r["prompt_ids"], a) for r, a in zip(test, answers[m])]) for m in models}
    chosen_scores = np.array([judge(r["prompt_ids"], r["chosen_ids"]) for r in test])
    chosen_lens = [len(r["chosen_ids"]) for r in test]
    for m in models:
        lens = np.array([len(a) for a in answers[m]], dtype=float)
        exp[m]["response_length_mean"] = mean_se(lens)
        exp[m]["judge_score_mean"] = (float(scores[m].mean()), None)
        versus = [("chosen", chosen_scores, chosen_lens, [r["chosen_ids"] for r in test])]
        if m == "llama":
            versus.insert(0, ("reference", scores["mistral"], [len(a) for a in answers["mistral"]], answers["mistral"]))
        for name, opp, opp_lens, opp_ids in versus:
            same = np.array([a == b for a, b in zip(answers[m], opp_ids)])
            for k, v in win_figures(scores[m], opp, lens, opp_lens, same).items():
                exp[m][f"{k}_vs_{name}"] = v if isinstance(v, tuple) else (v, None)
    jsonl = "".join(json.dumps({k: r[k] for k in ("id", "split", "prompt", "chosen", "rejected")}) + "\n" for r in rows)
    return jsonl, {
        "beta": beta,
        "max_new_tokens": 6,
        "rows": [{k: r[k] for k in ("id", "split", "prompt_ids", "chosen_ids", "rejected_ids")} for r in rows],
        "answers": answers,
        "expected": {m: {k: {"value": v[0], "stderr": v[1]} for k, v in f.items()} for m, f in exp.items()},
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    if (HF / "tiny-llama-rm").is_dir():
        jsonl, case = e2e()
        (OUT / "pairs.jsonl").write_text(jsonl)
        (OUT / "e2e.json").write_text(json.dumps(case, indent=1) + "\n")
        print("wrote", OUT / "e2e.json")
    for name, obj in (("preference.json", preference()), ("winrate.json", winrate())):
        (OUT / name).write_text(json.dumps(obj, indent=1) + "\n")
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
