//! What the `evaluate` stage computes, as plain functions of numbers so each is tested against
//! an independent implementation: held-out preference metrics ([`metrics`]), judged win rates
//! with a length-controlled variant ([`winrate`]), and the report files ([`report`]).

pub mod cost;
pub mod figures;
pub mod judge;
pub mod metrics;
pub mod prompts;
pub mod report;
pub mod stats;
pub mod winrate;
