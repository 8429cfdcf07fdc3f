//! The Llama forward against PyTorch + transformers on a random Llama-3-featured model
//! (GQA, llama3 RoPE scaling, untied head, two EOS ids): ../shared/golden/tiny-llama3.

mod common;

use candle_core::{Device, Tensor};
use introspect::engine::{GenerationParams, Generator};
use introspect::model::{Llama, LlamaConfig, WeightStore};

fn tiny() -> Llama {
    let dir = common::golden().join("tiny-llama3");
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let w = WeightStore::from_hf_dir(&dir, &Device::Cpu).unwrap();
    Llama::load(cfg, &w, &Device::Cpu).unwrap()
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        common::golden().join("tiny-llama3/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn config_reads_the_llama3_fields() {
    let cfg = tiny().cfg;
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (4, 2, 16)
    );
    assert_eq!(cfg.eos_token_ids, vec![2, 3]);
    assert!(!cfg.tie_word_embeddings);
    assert!(matches!(
        cfg.rope_scaling,
        introspect::model::config::RopeScaling::Llama3 { .. }
    ));
}

#[test]
fn full_sequence_logits_match_transformers() {
    let m = tiny();
    let exp = expected();
    for case in ["a", "b"] {
        let input = common::token_ids(&exp[&format!("input_ids_{case}")]);
        let want = exp[&format!("logits_{case}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = m
            .full_logits(&input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = common::max_abs_diff(&got, &want);
        assert!(
            d < 1e-4,
            "case {case} ({} tokens): max |logit diff| {d}",
            input.len()
        );
    }
}

#[test]
fn transformers_5_rope_parameters_spelling_gives_the_same_model() {
    // The same config in transformers 5.x spelling: `rope_parameters` holds theta and the scaling.
    let dir = common::golden().join("tiny-llama3");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut params = j["rope_scaling"].clone();
    params["rope_theta"] = j["rope_theta"].clone();
    let obj = j.as_object_mut().unwrap();
    obj.remove("rope_scaling");
    obj.remove("rope_theta");
    obj.insert("rope_parameters".into(), params);
    let v5 = LlamaConfig::from_hf_json(&j).unwrap();
    let v4 = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    assert_eq!(v5, v4);
}

#[test]
fn greedy_decoding_with_the_kv_cache_matches_transformers() {
    let m = tiny();
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden().join("tiny-llama3/expected-greedy.json"))
            .unwrap(),
    )
    .unwrap();
    let prompt: Vec<u32> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<u32> = g["greedy_new_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // The reference generated exactly 16 tokens; no EOS so that nothing stops early.
    let gen = Generator::for_ids(&m, &[]);
    let params = GenerationParams {
        max_tokens: want.len(),
        ..Default::default()
    };
    let out = gen.generate(&[prompt], &params).unwrap();
    assert_eq!(out[0][0].token_ids, want);
}

#[test]
fn batched_generation_equals_one_by_one() {
    let m = tiny();
    let exp = expected();
    let a = common::token_ids(&exp["input_ids_a"]);
    let b = common::token_ids(&exp["input_ids_b"]);
    let prompts = vec![
        a.clone(),
        b[..40].to_vec(),
        a[..7].to_vec(),
        b[..100].to_vec(),
    ];
    let eos = [2u32, 3];
    let gen = Generator::for_ids(&m, &eos);
    let params = GenerationParams {
        max_tokens: 12,
        top_logprobs: 5,
        ..Default::default()
    };
    let batched = gen.generate(&prompts, &params).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = gen.generate(std::slice::from_ref(p), &params).unwrap();
        assert_eq!(
            batched[i][0].token_ids, single[0][0].token_ids,
            "prompt {i}"
        );
        for (s, t) in batched[i][0].steps.iter().zip(&single[0][0].steps) {
            assert!(
                (s.logprob.0 - t.logprob.0).abs() < 1e-4,
                "prompt {i}: {} vs {}",
                s.logprob.0,
                t.logprob.0
            );
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_n_samples_differ() {
    let m = tiny();
    let a = common::token_ids(&expected()["input_ids_a"]);
    let gen = Generator::for_ids(&m, &[]);
    let params = GenerationParams {
        max_tokens: 8,
        temperature: 1.0,
        seed: 11,
        n: 4,
        ..Default::default()
    };
    let x = gen.generate(std::slice::from_ref(&a), &params).unwrap();
    let y = gen.generate(std::slice::from_ref(&a), &params).unwrap();
    assert_eq!(x, y);
    assert_eq!(x[0].len(), 4);
    let distinct: std::collections::HashSet<_> = x[0].iter().map(|c| c.token_ids.clone()).collect();
    assert!(
        distinct.len() > 1,
        "4 samples at T=1 from a random model should not all agree"
    );
}

/// bf16 mode (projections, embedding and head stored as bf16): logits within 0.1 of transformers' f32
/// ones, with the same most likely token at every position. The products are bf16 × bf16 with f32
/// accumulation on both paths.
#[test]
fn bf16_weights_stay_within_a_tenth_of_the_f32_logits() {
    let dir = common::golden().join("tiny-llama3");
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let spec = introspect::model::LoadSpec::from(introspect::model::WeightMode::Bf16);
    let w = WeightStore::from_hf_dir_as(&dir, spec, false, &Device::Cpu).unwrap();
    let m = Llama::load(cfg, &w, &Device::Cpu).unwrap();
    assert_eq!(m.embed_tokens_dtype(), candle_core::DType::BF16);
    let exp = expected();
    for case in ["a", "b"] {
        let input = common::token_ids(&exp[&format!("input_ids_{case}")]);
        let want = exp[&format!("logits_{case}")].squeeze(0).unwrap();
        let got = m.full_logits(&input).unwrap();
        let d = common::max_abs_diff(
            &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        eprintln!("case {case}: bf16 max |Δ logit| {d:.4}");
        assert!(d < 0.1, "case {case}: bf16 logits off by {d}");
        // The same top token wherever transformers' top two are further apart than bf16 moved any logit
        // (a random model has near-ties a 0.02 shift can flip).
        let (got, want) = (
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap(),
        );
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
        let mut clear = 0;
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let mut sorted = w.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 2.0 * d {
                clear += 1;
                assert_eq!(
                    argmax(g),
                    argmax(w),
                    "case {case} position {pos}: top token differs"
                );
            }
        }
        assert!(clear > 0, "case {case}: no position with a clear top token");
    }
}

/// `introspect verify`'s checks (what scripts/gpu-check runs on a GPU) pass here, on this path's kernels.
#[test]
fn the_device_verification_passes_on_the_cpu() {
    let checks =
        introspect::verify::tiny_llama3(&common::golden().join("tiny-llama3"), &Device::Cpu)
            .unwrap();
    assert_eq!(checks.len(), 12);
    for c in &checks {
        assert!(c.passed(), "{}: {} > {}", c.name, c.measured, c.tolerance);
    }
}
