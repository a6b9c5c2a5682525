//! Turning a row of logits into a token: greedy, or temperature with top-k
//! and nucleus (top-p) filtering, from a per-request seeded generator so
//! that the same request and seed always give the same tokens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        }
    }

    /// The next token and its log-probability under the model (before
    /// temperature and filtering, as OpenAI-style logprobs report it).
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        (token as u32, log_softmax_at(logits, token))
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let temperature = self.params.temperature as f64;
        let mut candidates: Vec<(usize, f64)> = logits
            .iter()
            .map(|&l| l as f64 / temperature)
            .enumerate()
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Nucleus: the smallest prefix whose mass reaches top_p.
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&p| {
                mass += p;
                mass >= self.params.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        let kept_mass: f64 = probs[..keep].iter().sum();
        let mut target = self.rng.random::<f64>() * kept_mass;
        for (i, &p) in probs[..keep].iter().enumerate() {
            if target < p {
                return candidates[i].0;
            }
            target -= p;
        }
        candidates[keep - 1].0
    }
}

/// The first index of the largest value, as torch.argmax picks it.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[index]`, accumulated in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    (logits[index] as f64 - max - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_its_logprob() {
        let mut sampler = Sampler::new(params(0.0, 1.0, 0, 0));
        let (token, logprob) = sampler.sample(&[1.0, 3.0, 3.0, 0.0]);
        assert_eq!(token, 1);
        let expected = 3.0 - (1f64.exp() + 2.0 * 3f64.exp() + 1.0).ln();
        assert!((logprob as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let draw = |p: SamplingParams| {
            let mut sampler = Sampler::new(p);
            (0..200)
                .map(|_| sampler.sample(&logits).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params(1.0, 1.0, 0, 9)), draw(params(1.0, 1.0, 0, 9)));
        assert_ne!(draw(params(1.0, 1.0, 0, 9)), draw(params(1.0, 1.0, 0, 10)));
        let mut order: Vec<usize> = (0..50).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top3: Vec<u32> = order[..3].iter().map(|&i| i as u32).collect();
        assert!(
            draw(params(2.0, 1.0, 3, 1))
                .iter()
                .all(|t| top3.contains(t))
        );
        // A tiny nucleus is the single most likely token.
        assert!(
            draw(params(1.0, 1e-6, 0, 1))
                .iter()
                .all(|&t| t == order[0] as u32)
        );
    }
}
