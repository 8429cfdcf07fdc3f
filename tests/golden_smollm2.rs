//! SmolLM2-135M-Instruct (the GGUF of the PyPI wheel) against transformers f32: rendered prompt, prompt ids,
//! greedy ids and top-10 log-probabilities for every case of ../shared/golden/smollm2/cases.json.

mod common;

use candle_core::Device;
use introspect::engine::{GenerationParams, Generator};
use introspect::model::{LoadedModel, Message, WeightMode};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(common::golden().join("smollm2/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn messages(case: &Value) -> Vec<Message> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy completions (32 tokens at most, as the reference) with the top-10 of the first position.
fn run(model: &LoadedModel, prompts: &[Vec<u32>]) -> Vec<introspect::engine::Completion> {
    let gen = Generator::new(model);
    let params = GenerationParams {
        max_tokens: 32,
        top_logprobs: 10,
        ..Default::default()
    };
    gen.generate(prompts, &params)
        .unwrap()
        .into_iter()
        .map(|mut c| c.remove(0))
        .collect()
}

#[test]
fn prompts_render_and_tokenize_exactly_like_transformers() {
    let m = common::smollm2_f32();
    for case in cases() {
        let (text, ids) = m.encode_chat(&messages(&case)).unwrap();
        assert_eq!(
            text,
            case["rendered_prompt"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
        assert_eq!(ids, u32s(&case["prompt_ids"]), "case {}", case["name"]);
    }
}

#[test]
fn f32_greedy_ids_and_top10_logprobs_match_transformers() {
    let m = common::smollm2_f32();
    let cases = cases();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| u32s(&c["prompt_ids"])).collect();
    // All cases in one left-padded batch: this also checks batching against the reference.
    let out = run(m, &prompts);
    for (case, c) in cases.iter().zip(&out) {
        let name = case["name"].as_str().unwrap();
        assert_eq!(
            c.token_ids,
            u32s(&case["greedy_new_ids"])
                .into_iter()
                .filter(|&i| i != 2)
                .collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(c.text, case["greedy_text"].as_str().unwrap(), "{name}");
        let want = case["first_token_top10"].as_array().unwrap();
        for (w, g) in want.iter().zip(&c.steps[0].top) {
            assert_eq!(
                g.id as u64,
                w["id"].as_u64().unwrap(),
                "{name}: top-10 order"
            );
            assert_eq!(m.tokenizer.token(g.id), w["token"].as_str().unwrap());
            let d = (g.logprob.0 as f64 - w["logprob"].as_f64().unwrap()).abs();
            assert!(d < 1e-3, "{name}: logprob of {} differs by {d}", g.id);
        }
    }
}

/// A batch of left-padded prompts gives each prompt's own greedy completion, in f32 and with quantized
/// weights (the head's input is then a non-contiguous slice of the batch's last positions, which Candle's
/// quantized matmuls refuse).
#[test]
fn batched_generation_equals_one_by_one() {
    let prompts: Vec<Vec<u32>> = cases().iter().map(|c| u32s(&c["prompt_ids"])).collect();
    for (name, m) in [
        ("f32", common::smollm2_f32()),
        ("quantized", common::smollm2_quantized()),
    ] {
        // Exact on the CPU kernels. Candle's quantized matmul (the generic path: what CUDA and Metal
        // run, as llama.cpp's) rounds activations to 8 bits per block, a step function: the last-bit
        // differences of a batched prefill (shared start, padding) flip some roundings, and the
        // first-step log-probs of batched and one-by-one runs differ by up to 0.23 here (f32: 1e-5).
        // There the runs may part, but only where the one-by-one run's top two are that close.
        let near_tie = if m.llama.kernels.cpu() || name == "f32" {
            0.0
        } else {
            0.3
        };
        let batched = run(m, &prompts);
        for (i, (p, b)) in prompts.iter().zip(&batched).enumerate() {
            let single = &run(m, std::slice::from_ref(p))[0];
            let Some(j) = (0..single.token_ids.len().max(b.token_ids.len()))
                .find(|&j| single.token_ids.get(j) != b.token_ids.get(j))
            else {
                continue;
            };
            let top = &single.steps[j].top;
            let margin = top[0].logprob.0 - top[1].logprob.0;
            eprintln!("{name} prompt {i}: batched and one-by-one part at token {j}, top-2 margin {margin:.4}");
            assert!(
                margin < near_tie,
                "{name} prompt {i}: batched and one-by-one part at token {j}, where the top two are {margin} apart"
            );
        }
    }
}

#[test]
fn quantized_path_stays_close_to_transformers() {
    // Q4_1 / Q8_0 blocks multiplied with activations rounded to 16 bits: close to, not equal to, the f32
    // reference, and close enough that greedy decoding gives its tokens.
    let m = common::smollm2_quantized();
    let cases = cases();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| u32s(&c["prompt_ids"])).collect();
    let out = run(m, &prompts);
    let mut worst = 0f64;
    let mut first_token_agree = 0;
    for (case, c) in cases.iter().zip(&out) {
        let greedy: Vec<u32> = u32s(&case["greedy_new_ids"])
            .into_iter()
            .filter(|&i| i != 2)
            .collect();
        assert_eq!(c.token_ids, greedy, "{}: greedy ids", case["name"]);
        let want = case["first_token_top10"].as_array().unwrap();
        if c.token_ids.first().copied() == want[0]["id"].as_u64().map(|x| x as u32) {
            first_token_agree += 1;
        }
        for w in want {
            let id = w["id"].as_u64().unwrap() as u32;
            if let Some(g) = c.steps[0].top.iter().find(|t| t.id == id) {
                worst = worst.max((g.logprob.0 as f64 - w["logprob"].as_f64().unwrap()).abs());
            }
        }
    }
    eprintln!("quantized vs transformers f32: max |Δ logprob| over top-10 = {worst:.4}; first token agrees on {first_token_agree}/{}", cases.len());
    assert!(worst < 5e-3, "quantized logprobs drift {worst}");
    assert_eq!(first_token_agree, cases.len());
}

#[test]
fn stop_strings_cut_the_text() {
    let m = common::smollm2_f32();
    let case = &cases()[1];
    let gen = Generator::new(m);
    let params = GenerationParams {
        max_tokens: 32,
        stop: vec![" rabbit".into()],
        ..Default::default()
    };
    let out = gen.generate(&[u32s(&case["prompt_ids"])], &params).unwrap();
    assert_eq!(out[0][0].text, "deer cow chicken fish");
    assert_eq!(
        out[0][0].finish_reason,
        introspect::engine::FinishReason::Stop
    );
}

#[test]
fn tokenizer_round_trips_and_export_gives_the_same_model_in_hf_layout() {
    let gguf = common::smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    introspect::model::export::export_hf(&gguf, None, dir.path()).unwrap();
    let hf = LoadedModel::load(dir.path(), WeightMode::F32, &Device::Cpu).unwrap();
    let m = common::smollm2_f32();
    let texts = [
        "Hello world",
        "  leading, double  and trailing spaces  ",
        "tabs\tand\n\nnewlines\n",
        "digits 2024 and 3.14159",
        "it's we'll they've",
        "naïve café — 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ];
    for t in texts {
        let a = m.tokenizer.encode(t).unwrap();
        assert_eq!(
            m.tokenizer.decode(&a, false).unwrap(),
            t,
            "GGUF tokenizer round trip"
        );
        assert_eq!(
            hf.tokenizer.encode(t).unwrap(),
            a,
            "tokenizer.json vs GGUF ids for {t:?}"
        );
    }
    for case in cases() {
        let msgs = messages(&case);
        assert_eq!(
            hf.encode_chat(&msgs).unwrap(),
            m.encode_chat(&msgs).unwrap()
        );
    }
    let ids = u32s(&cases()[0]["prompt_ids"]);
    let a = hf
        .llama
        .full_logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = m
        .llama
        .full_logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-4);
}

/// `--weights quantized` on an HF directory quantizes at load (here to Q8_0, which the CPU block kernels
/// read) instead of loading f32: greedy decoding stays on transformers' tokens, and a type the rows
/// cannot hold (Q4_K needs 256-column rows; SmolLM2's are 576) is refused naming the tensor.
#[test]
fn hf_weights_quantize_at_load() {
    use introspect::model::{LoadSpec, QuantType};
    let dir = tempfile::tempdir().unwrap();
    introspect::model::export::export_hf(&common::smollm2_gguf(), None, dir.path()).unwrap();
    let spec = |quantize| LoadSpec {
        mode: WeightMode::Quantized,
        quantize,
    };
    let m = LoadedModel::load(dir.path(), spec(QuantType::Q8_0), &Device::Cpu).unwrap();
    assert!(
        m.llama.quantized_projections() > 0,
        "no projection was quantized"
    );
    let cases = cases();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| u32s(&c["prompt_ids"])).collect();
    let out = run(&m, &prompts);
    // Q8_0 of weights that were Q4_1 moves each by up to half a Q8_0 step, and the embedding is held in
    // bf16: the first position's top-10 log-probs stay within 0.2 of transformers' (measured 0.093) and
    // greedy decoding starts on its tokens; long continuations may leave them at a near-tie.
    let (mut worst, mut long) = (0f64, 0);
    for (case, c) in cases.iter().zip(&out) {
        let greedy: Vec<u32> = u32s(&case["greedy_new_ids"])
            .into_iter()
            .filter(|&i| i != 2)
            .collect();
        let same = c
            .token_ids
            .iter()
            .zip(&greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{}: first {same} of {} greedy ids agree",
            case["name"],
            greedy.len()
        );
        assert!(same >= 3.min(greedy.len()), "{}: greedy ids", case["name"]);
        long += usize::from(same >= 8.min(greedy.len()));
        for w in case["first_token_top10"].as_array().unwrap() {
            let id = w["id"].as_u64().unwrap() as u32;
            if let Some(g) = c.steps[0].top.iter().find(|t| t.id == id) {
                worst = worst.max((g.logprob.0 as f64 - w["logprob"].as_f64().unwrap()).abs());
            }
        }
    }
    eprintln!("Q8_0 at load vs transformers f32: max |Δ logprob| over top-10 = {worst:.4}");
    assert!(worst < 0.2, "Q8_0 at load: log-probs drift {worst}");
    assert!(
        long * 3 >= cases.len() * 2,
        "only {long} cases keep 8 greedy tokens"
    );
    let err = LoadedModel::load(dir.path(), spec(QuantType::Q4K), &Device::Cpu)
        .err()
        .expect("Q4_K of 576-column rows must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("q4_k") && msg.contains("tensor `"), "{msg}");
}
