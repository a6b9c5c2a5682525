use attention_svc::{Engine, MoeLayer, SequenceChunk};
use candle_core::{Device, Tensor};
use std::time::Instant;
struct Zero;
impl MoeLayer for Zero {
    type Error = candle_core::Error;
    async fn forward(&self, _l: usize, h: &Tensor) -> Result<Tensor, Self::Error> {
        h.zeros_like()
    }
}
fn main() {
    moe_model::pin_compute_threads();
    let ck = moe_model::Checkpoint::open(std::path::Path::new("/tmp/small")).unwrap();
    let engine = Engine::load(&ck, &Device::Cpu).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut caches: Vec<_> = (0..32).map(|_| engine.new_cache()).collect();
    let prompt: Vec<u32> = (0..128).map(|i| (i * 7 + 3) % 4000).collect();
    let t = Instant::now();
    for c in caches.iter_mut() {
        let mut chunks = vec![SequenceChunk {
            cache: c,
            tokens: &prompt,
        }];
        rt.block_on(engine.step(&mut chunks, &Zero)).unwrap();
    }
    println!("prefill 32x128: {:?}", t.elapsed());
    let tok = [5u32];
    for _ in 0..3 {
        let t = Instant::now();
        let n = 20;
        for _ in 0..n {
            let mut chunks: Vec<_> = caches
                .iter_mut()
                .map(|c| SequenceChunk {
                    cache: c,
                    tokens: &tok,
                })
                .collect();
            rt.block_on(engine.step(&mut chunks, &Zero)).unwrap();
        }
        println!("decode step (32 seqs): {:?}", t.elapsed() / n);
    }
}
