//! Euler on the probability-flow ODE in k-diffusion's variables (Karras et al. 2022):
//! with xbar = x / alpha and sbar = sigma / alpha, d xbar / d sbar = eps. One call per step.
//! At the same levels this is the DDIM transfer with eta = 0 (Song et al. 2021, eq. 14).

use super::ops::transfer;
use super::SamplerDef;

pub static EULER: SamplerDef = SamplerDef::new("ode-euler", "1", "1")
    .summary("Euler on the probability-flow ODE in sigma/alpha (equals DDIM at the same levels)")
    .run(|_, tr, x, progress| {
        tr.walk(x, progress, |_, s| {
            Ok(transfer(s.x, &s.d.eps, &s.cur, &s.next))
        })
    });
