//! The in-place decode step (`Llama::decode_logits`, plain f32 buffers) against the tensor forward pass it
//! replaces on the CPU: same logits for left-padded rows over several steps, with and without a LoRA
//! adapter, on dense f32 weights (tiny-llama3, SmolLM2 dequantized) and on GGUF blocks (SmolLM2 Q4_1/Q8_0).

mod common;

use candle_core::{Device, Tensor};
use introspect::lora::{peft, Adapter};
use introspect::model::cache::KvCache;
use introspect::model::decode::DecodeRows;
use introspect::model::llama::{causal_mask, Batch};
use introspect::model::{Llama, LlamaConfig, WeightStore};

/// Two prompts of different lengths, left-padded into one prefill.
const PROMPTS: [&[u32]; 2] = [&[1, 9690, 198, 2683, 359, 253, 5356], &[1, 4093, 198, 1780]];

fn prefill(m: &Llama, adapter: Option<&Adapter>) -> KvCache {
    let t = PROMPTS.iter().map(|p| p.len()).max().unwrap();
    let pads: Vec<usize> = PROMPTS.iter().map(|p| t - p.len()).collect();
    let mut ids = vec![];
    let mut pos = vec![];
    for (p, &pad) in PROMPTS.iter().zip(&pads) {
        let vocab = m.cfg.vocab_size as u32;
        ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().map(|id| id % vocab)));
        pos.extend((0..t).map(|i| i.saturating_sub(pad) as f32));
    }
    let dev = Device::Cpu;
    let mut cache = KvCache::new(m.cfg.num_hidden_layers);
    m.forward(
        &Batch {
            ids: &Tensor::from_vec(ids, (2, t), &dev).unwrap(),
            positions: &Tensor::from_vec(pos, (2, t), &dev).unwrap(),
            mask: causal_mask(&pads, t, 0, &dev).unwrap().as_ref(),
            adapter,
        },
        Some(&mut cache),
    )
    .unwrap();
    cache
}

/// Largest |Δ logit| between the in-place step and the tensor forward over three decode steps.
fn max_step_diff(m: &Llama, adapter: Option<&Adapter>) -> f32 {
    let t = PROMPTS.iter().map(|p| p.len()).max().unwrap();
    let pads: Vec<usize> = PROMPTS.iter().map(|p| t - p.len()).collect();
    let (mut fast, mut slow) = (prefill(m, adapter), prefill(m, adapter));
    let dev = Device::Cpu;
    let mut worst = 0f32;
    for (step, next) in [[17u32, 42], [5, 3000], [9956, 1]].iter().enumerate() {
        let next = next.map(|id| id % m.cfg.vocab_size as u32);
        let pos: Vec<f32> = PROMPTS.iter().map(|p| (p.len() + step) as f32).collect();
        let got = m
            .decode_logits(
                &DecodeRows {
                    ids: &next,
                    positions: &pos,
                    pads: &pads,
                    adapter,
                },
                &mut fast,
            )
            .unwrap();
        let hidden = m
            .forward(
                &Batch {
                    ids: &Tensor::new(&next, &dev).unwrap().reshape((2, 1)).unwrap(),
                    positions: &Tensor::new(pos.as_slice(), &dev)
                        .unwrap()
                        .reshape((2, 1))
                        .unwrap(),
                    mask: causal_mask(&pads, 1, slow.len(), &dev).unwrap().as_ref(),
                    adapter,
                },
                Some(&mut slow),
            )
            .unwrap();
        let want = m
            .logits(&hidden.squeeze(1).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        worst = worst.max(common::max_abs_diff(&got, &want));
    }
    assert_eq!(fast.len(), slow.len());
    worst
}

#[test]
fn tiny_llama3_with_and_without_a_peft_adapter() {
    let dir = common::golden().join("tiny-llama3");
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let w = WeightStore::from_hf_dir(&dir, &Device::Cpu).unwrap();
    let m = Llama::load(cfg, &w, &Device::Cpu).unwrap();
    let adapter = peft::load(&dir.join("peft-adapter"), &m.cfg, &Device::Cpu).unwrap();
    for a in [None, Some(&adapter)] {
        let d = max_step_diff(&m, a);
        eprintln!("tiny-llama3 adapter={} max |Δ logit| {d:e}", a.is_some());
        assert!(d < 1e-4, "in-place decode differs by {d}");
    }
}

#[test]
fn smollm2_dense_and_blocks() {
    // The block kernels round activations to 16 bits per 32-value block on both paths; inputs that differ in
    // their last bits (another summation order in the tensor path's norms and attention) can round to
    // neighbouring steps, which 30 layers carry to the logits as ~1e-2 (measured 9.4e-3; f32: 2.5e-5).
    for (name, model, tolerance) in [
        ("f32", common::smollm2_f32(), 1e-3),
        ("quantized", common::smollm2_quantized(), 3e-2),
    ] {
        let d = max_step_diff(&model.llama, None);
        eprintln!("SmolLM2 {name} max |Δ logit| {d:e}");
        assert!(d < tolerance, "{name}: in-place decode differs by {d}");
    }
}

/// bf16 projections (`WeightMode::Bf16`): the decode step runs (each product reads the weight as f32) and
/// its logits stay close to the f32 model's, with the same most likely token.
#[test]
fn smollm2_bf16_projections_stay_close_to_f32() {
    let (f32m, bf16m) = (&common::smollm2_f32().llama, &common::smollm2_bf16().llama);
    let d = max_step_diff(bf16m, None);
    assert!(d < 1e-3, "bf16: in-place decode differs by {d}");
    let last = |m: &Llama| {
        let mut cache = prefill(m, None);
        let pads = [0usize, 3];
        let pos: Vec<f32> = PROMPTS.iter().map(|p| p.len() as f32).collect();
        m.decode_logits(
            &DecodeRows {
                ids: &[17, 42],
                positions: &pos,
                pads: &pads,
                adapter: None,
            },
            &mut cache,
        )
        .unwrap()
    };
    let (a, b) = (last(f32m), last(bf16m));
    let vocab = f32m.cfg.vocab_size;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    for row in 0..2 {
        let (ra, rb) = (&a[row * vocab..][..vocab], &b[row * vocab..][..vocab]);
        assert_eq!(argmax(ra), argmax(rb), "row {row}: top token differs");
        let diff = common::max_abs_diff(ra, rb);
        eprintln!("SmolLM2 bf16 vs f32 row {row}: max |Δ logit| {diff:.3}");
        assert!(diff < 0.5, "row {row}: bf16 logits off by {diff}");
    }
}
