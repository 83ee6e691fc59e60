//! Judged win rates: each of a model's answers against an opponent's answer to the same prompt,
//! scored by a judge. Wins, losses and ties, the win rate `(wins + ties / 2) / n` with its
//! standard error, and a length-controlled win rate after AlpacaEval 2: a logistic regression of
//! the outcome on the (standardized, tanh-bounded) length difference, read off at a difference
//! of zero, so a judge that merely likes long answers does not decide the comparison.

use super::stats::mean_se;

/// One comparison: the judge's score and length (tokens) of the candidate's answer and of the
/// opponent's. `same` marks identical answers, a tie whatever the scores say.
#[derive(Debug, Clone, Copy)]
pub struct Duel {
    pub score: f64,
    pub opponent_score: f64,
    pub len: usize,
    pub opponent_len: usize,
    pub same: bool,
}

impl Duel {
    /// 1 for a win, 0 for a loss, 1/2 for a tie.
    pub fn outcome(&self) -> f64 {
        if self.same || self.score == self.opponent_score {
            0.5
        } else if self.score > self.opponent_score {
            1.0
        } else {
            0.0
        }
    }
}

/// The summary of a set of duels.
#[derive(Debug, Clone, PartialEq)]
pub struct WinRate {
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    pub rate: f64,
    pub stderr: Option<f64>,
    /// Length-controlled rate and its standard error (delta method); the raw rate when the
    /// lengths do not vary or the fit does not converge.
    pub lc_rate: f64,
    pub lc_stderr: Option<f64>,
}

/// Win rate, its standard error, and the length-controlled rate of `duels`.
pub fn win_rate(duels: &[Duel]) -> WinRate {
    let y: Vec<f64> = duels.iter().map(Duel::outcome).collect();
    let (rate, stderr, _) = mean_se(&y);
    let count = |v: f64| y.iter().filter(|&&o| o == v).count();
    let (lc_rate, lc_stderr) = match length_feature(duels).and_then(|x| logistic_fit(&x, &y)) {
        Some(fit) => {
            let p = sigmoid(fit.intercept);
            (p, Some(p * (1.0 - p) * fit.intercept_var.sqrt()))
        }
        None => (rate, stderr),
    };
    WinRate {
        wins: count(1.0),
        losses: count(0.0),
        ties: count(0.5),
        rate,
        stderr,
        lc_rate,
        lc_stderr,
    }
}

/// `tanh((len - opponent_len) / sd)`, with `sd` the sample standard deviation of the length
/// differences (AlpacaEval 2's feature). `None` when the differences do not vary: then there is
/// nothing to control for.
pub fn length_feature(duels: &[Duel]) -> Option<Vec<f64>> {
    let d: Vec<f64> = duels
        .iter()
        .map(|u| u.len as f64 - u.opponent_len as f64)
        .collect();
    let (_, se, n) = mean_se(&d);
    let sd = se? * (n as f64).sqrt();
    // `sd` is finite here (mean_se skips non-finite items); zero means nothing varies.
    if sd <= 0.0 {
        return None;
    }
    Some(d.iter().map(|x| (x / sd).tanh()).collect())
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A logistic regression `P(win) = sigmoid(intercept + slope * x)` fitted by maximum likelihood.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticFit {
    pub intercept: f64,
    pub slope: f64,
    /// The intercept's variance from the inverse Fisher information.
    pub intercept_var: f64,
}

/// Fits `y ~ sigmoid(a + b x)` by Newton's method (iteratively reweighted least squares), with
/// outcomes in [0, 1] (a tie counts half, as a binomial GLM with fractional responses, which is
/// what statsmodels' `GLM(y, X, family=Binomial())` fits). Two parameters, so the normal
/// equations are a 2x2 solve. `None` when the fit does not converge (e.g. perfect separation:
/// every win longer than every loss) or the information matrix is singular.
pub fn logistic_fit(x: &[f64], y: &[f64]) -> Option<LogisticFit> {
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (&xi, &yi) in x.iter().zip(y) {
            let p = sigmoid(a + b * xi);
            let w = p * (1.0 - p);
            g0 += yi - p;
            g1 += (yi - p) * xi;
            h00 += w;
            h01 += w * xi;
            h11 += w * xi * xi;
        }
        let det = h00 * h11 - h01 * h01;
        if det.is_nan() || det.abs() <= 1e-12 {
            return None;
        }
        let da = (h11 * g0 - h01 * g1) / det;
        let db = (h00 * g1 - h01 * g0) / det;
        a += da;
        b += db;
        if !(a.is_finite() && b.is_finite()) || a.abs() > 30.0 {
            return None;
        }
        if da.abs() < 1e-10 && db.abs() < 1e-10 {
            // The covariance at the optimum: the inverse of the information matrix there.
            let (mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0);
            for &xi in x {
                let p = sigmoid(a + b * xi);
                let w = p * (1.0 - p);
                h00 += w;
                h01 += w * xi;
                h11 += w * xi * xi;
            }
            let det = h00 * h11 - h01 * h01;
            return (det > 0.0).then(|| LogisticFit {
                intercept: a,
                slope: b,
                intercept_var: h11 / det,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duel(score: f64, opp: f64, len: usize, opp_len: usize) -> Duel {
        Duel {
            score,
            opponent_score: opp,
            len,
            opponent_len: opp_len,
            same: false,
        }
    }

    #[test]
    fn counts_rate_and_ties() {
        let mut d = vec![
            duel(1.0, 0.0, 5, 5),
            duel(0.0, 1.0, 5, 5),
            duel(2.0, 2.0, 5, 5),
        ];
        d.push(Duel {
            same: true,
            ..duel(3.0, 1.0, 5, 5)
        });
        let w = win_rate(&d);
        assert_eq!((w.wins, w.losses, w.ties), (1, 1, 2));
        assert_eq!(w.rate, 0.5);
        // No length variation: the length-controlled rate is the raw one.
        assert_eq!(w.lc_rate, w.rate);
    }

    /// The win rate, its standard error and the length-controlled rate equal statsmodels' GLM
    /// fit (scripts/make_eval_fixtures.py) on 80 duels with ties.
    #[test]
    fn matches_statsmodels_glm() {
        let f: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/eval/winrate.json")).unwrap();
        let duels: Vec<Duel> = f["duels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| Duel {
                score: d["score"].as_f64().unwrap(),
                opponent_score: d["opponent_score"].as_f64().unwrap(),
                len: d["len"].as_u64().unwrap() as usize,
                opponent_len: d["opponent_len"].as_u64().unwrap() as usize,
                same: false,
            })
            .collect();
        let e = &f["expected"];
        let w = win_rate(&duels);
        let close = |a: f64, k: &str| {
            let b = e[k].as_f64().unwrap();
            assert!((a - b).abs() < 1e-6, "{k}: sepo {a}, statsmodels {b}");
        };
        assert_eq!(
            (w.wins as u64, w.losses as u64, w.ties as u64),
            (
                e["wins"].as_u64().unwrap(),
                e["losses"].as_u64().unwrap(),
                e["ties"].as_u64().unwrap()
            )
        );
        close(w.rate, "rate");
        close(w.stderr.unwrap(), "stderr");
        close(w.lc_rate, "lc_rate");
        close(w.lc_stderr.unwrap(), "lc_stderr");
        let y: Vec<f64> = duels.iter().map(Duel::outcome).collect();
        let fit = logistic_fit(&length_feature(&duels).unwrap(), &y).unwrap();
        close(fit.intercept, "intercept");
        close(fit.slope, "slope");
        close(fit.intercept_var.sqrt(), "intercept_se");
    }

    #[test]
    fn separation_falls_back_to_the_raw_rate() {
        // Every longer answer wins: the MLE slope is infinite.
        let d: Vec<Duel> = (0..10)
            .map(|i| {
                if i < 5 {
                    duel(1.0, 0.0, 10, 2)
                } else {
                    duel(0.0, 1.0, 2, 10)
                }
            })
            .collect();
        let w = win_rate(&d);
        assert_eq!(w.lc_rate, w.rate);
    }
}
