//! Chat templates other than SmolLM2's: the Llama-3.1 header format.

use introspect::model::{ChatTemplate, Message};

fn llama31() -> ChatTemplate {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/llama-3.1-instruct.jinja"
    ))
    .unwrap();
    ChatTemplate::new(
        &src,
        "llama-3.1-instruct.jinja",
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    .unwrap()
}

#[test]
fn llama31_renders_the_header_format() {
    let msgs = vec![
        Message::new("system", "You are a helpful assistant"),
        Message::new("user", "Hi there!  "),
    ];
    let got = llama31().render(&msgs, true).unwrap();
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
                Today Date: 26 Jul 2024\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
                Hi there!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(got, want);
}

#[test]
fn llama31_without_system_and_without_generation_prompt() {
    let msgs = vec![Message::new("user", "a"), Message::new("assistant", "b")];
    let got = llama31().render(&msgs, false).unwrap();
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
                Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\na<|eot_id|>\
                <|start_header_id|>assistant<|end_header_id|>\n\nb<|eot_id|>";
    assert_eq!(got, want);
}

#[test]
fn raise_exception_becomes_an_error_naming_the_template() {
    let t = ChatTemplate::new(
        "{{ raise_exception('roles must alternate') }}",
        "my_template.jinja",
        "",
        "",
    )
    .unwrap();
    let e = t
        .render(&[Message::new("user", "x")], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("my_template.jinja") && e.contains("roles must alternate"),
        "{e}"
    );
}
