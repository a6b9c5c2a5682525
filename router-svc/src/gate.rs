//! The gating network: which experts each row goes to, and with what weight.
//!
//! Reference semantics (transformers' Mixtral): softmax over all experts in
//! f32, keep the top k, renormalise them to sum to one.

use candle_core::{Device, Tensor};
use moe_model::{Checkpoint, ModelError, layout};

/// The rows one expert receives at one layer, and each row's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRows {
    pub expert: usize,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

pub struct Gate {
    /// Per layer, `[hidden, num_experts]` (transposed at load, so that the
    /// product reads it in order).
    weights: Vec<Tensor>,
    top_k: usize,
}

impl Gate {
    /// Loads every layer's gate (its shapes were verified with the other
    /// shared tensors).
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        let weights = (0..config.num_hidden_layers)
            .map(|layer| checkpoint.load(&layout::gate(layer), device))
            .collect::<Result<_, ModelError>>()?;
        Ok(Self::new(weights, config.num_experts_per_tok)?)
    }

    /// A gate from each layer's `[num_experts, hidden]` weight, as a
    /// checkpoint stores it.
    pub fn new(weights: Vec<Tensor>, top_k: usize) -> candle_core::Result<Self> {
        let weights = weights
            .into_iter()
            .map(|weight| weight.t()?.contiguous())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { weights, top_k })
    }

    /// Routes every row of `hidden` (`[rows, hidden_size]`) at `layer`.
    /// Experts that receive no row are left out; the rest come in expert
    /// order, which is also the order their outputs are summed in.
    pub fn route(&self, layer: usize, hidden: &Tensor) -> candle_core::Result<Vec<ExpertRows>> {
        self.route_among(layer, hidden, |_| true)
    }

    /// As [`Gate::route`], choosing each row's top k among the `usable`
    /// experts only (renormalised over them): where rows go when their
    /// first choices cannot serve.
    pub fn route_among(
        &self,
        layer: usize,
        hidden: &Tensor,
        usable: impl Fn(usize) -> bool,
    ) -> candle_core::Result<Vec<ExpertRows>> {
        let logits = hidden.matmul(&self.weights[layer])?.to_vec2::<f32>()?;
        let num_experts = self.weights[layer].dim(1)?;
        let usable: Vec<bool> = (0..num_experts).map(usable).collect();
        let mut per_expert: Vec<ExpertRows> = (0..num_experts)
            .map(|expert| ExpertRows {
                expert,
                rows: Vec::new(),
                weights: Vec::new(),
            })
            .collect();
        for (row, logits) in logits.iter().enumerate() {
            for (expert, weight) in top_k_softmax_among(logits, self.top_k, &usable) {
                per_expert[expert].rows.push(row as u32);
                per_expert[expert].weights.push(weight);
            }
        }
        per_expert.retain(|e| !e.rows.is_empty());
        Ok(per_expert)
    }
}

/// The `k` largest softmax probabilities of `logits`, renormalised to sum
/// to one, with their indices. Ties go to the lower index, as in torch.
pub fn top_k_softmax(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    top_k_softmax_among(logits, k, &vec![true; logits.len()])
}

/// As [`top_k_softmax`], choosing only among the experts marked `usable`.
fn top_k_softmax_among(logits: &[f32], k: usize, usable: &[bool]) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).filter(|&e| usable[e]).collect();
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
    let chosen = &order[..k.min(order.len())];
    let probs: Vec<f32> = chosen.iter().map(|&e| exps[e] / total).collect();
    let kept: f32 = probs.iter().sum();
    chosen
        .iter()
        .zip(probs)
        .map(|(&e, p)| (e, p / kept))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_renormalises_the_chosen_probabilities() {
        let chosen = top_k_softmax(&[0.0, 2.0, 1.0, -1.0], 2);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
        let (a, b) = ((2.0f32).exp(), (1.0f32).exp());
        assert!((chosen[0].1 - a / (a + b)).abs() < 1e-6);
        assert!((chosen[0].1 + chosen[1].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn without_an_expert_rows_go_to_their_next_best_renormalised() {
        let logits = [0.0, 2.0, 1.0, -1.0];
        let chosen = top_k_softmax_among(&logits, 2, &[true, false, true, true]);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 0]);
        let (a, b) = ((1.0f32).exp(), (0.0f32).exp());
        assert!((chosen[0].1 - a / (a + b)).abs() < 1e-6);
        // Fewer usable experts than k: each row goes to those there are.
        let chosen = top_k_softmax_among(&logits, 2, &[false, false, false, true]);
        assert_eq!(chosen, vec![(3, 1.0)]);
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let chosen = top_k_softmax(&[1.0, 3.0, 3.0, 3.0], 2);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((chosen[0].1 - 0.5).abs() < 1e-6);
    }

    #[test]
    fn routes_rows_to_experts_in_expert_order() {
        let gate = Gate {
            // Expert 0 likes the first feature, expert 1 the second, expert 2 neither.
            weights: vec![Tensor::new(&[[4f32, 0.0, 0.0], [0.0, 4.0, 0.0]], &Device::Cpu).unwrap()],
            top_k: 1,
        };
        let hidden = Tensor::new(&[[0f32, 1.0], [1.0, 0.0], [0.0, 2.0]], &Device::Cpu).unwrap();
        let routed = gate.route(0, &hidden).unwrap();
        assert_eq!(routed.len(), 2);
        assert_eq!((routed[0].expert, routed[0].rows.clone()), (0, vec![1]));
        assert_eq!((routed[1].expert, routed[1].rows.clone()), (1, vec![0, 2]));
        assert_eq!(routed[1].weights, vec![1.0, 1.0]);
    }
}
