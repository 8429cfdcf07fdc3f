//! vLLM's runtime adapter endpoints, on `serve --runtime-lora` (as vLLM gates them behind
//! VLLM_ALLOW_RUNTIME_LORA_UPDATING: they read any directory the server can): `POST
//! /v1/load_lora_adapter {"lora_name", "lora_path"}` loads a PEFT adapter served as model `lora_name`;
//! `POST /v1/unload_lora_adapter {"lora_name"}` drops one. Both answer vLLM's plain-text success line.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{check_key, parse_body, read_body, ApiError, AppState};

#[derive(Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadBody {
    lora_name: String,
    #[serde(default)]
    #[allow(dead_code)]
    lora_int_id: Option<i64>,
}

fn gate(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    check_key(state, headers)?;
    if !state.runtime_lora {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message:
                "loading adapters at run time is off; start `introspect serve` with --runtime-lora"
                    .into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    }
    Ok(())
}

pub(super) async fn load(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let bytes = read_body(body, state.max_body_bytes).await?;
        gate(&state, &headers)?;
        let b: LoadBody = parse_body(&bytes)?;
        if b.lora_name.is_empty() || b.lora_name == state.base || state.has_adapter(&b.lora_name) {
            return Err(ApiError::bad_request(
                format!(
                    "the name `{}` is already served (or empty); unload it first or pick another",
                    b.lora_name
                ),
                Some("lora_name"),
            ));
        }
        let (name, path) = (b.lora_name.clone(), std::path::PathBuf::from(&b.lora_path));
        state
            .engine
            .call(move |backend| backend.add_adapter(&name, &path))
            .await
            .ok_or_else(ApiError::queue_full)?
            .map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("lora_path")))?;
        state
            .adapters
            .write()
            .expect("adapters lock")
            .push(b.lora_name.clone());
        Ok(format!(
            "Success: LoRA adapter '{}' added successfully.",
            b.lora_name
        ))
    };
    r.await.into_response()
}

pub(super) async fn unload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let bytes = read_body(body, state.max_body_bytes).await?;
        gate(&state, &headers)?;
        let b: UnloadBody = parse_body(&bytes)?;
        // Out of the list first: new requests for it get 404 from here on; the engine drops it after
        // the requests already queued.
        {
            let mut list = state.adapters.write().expect("adapters lock");
            let Some(i) = list.iter().position(|a| *a == b.lora_name) else {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!("no adapter named `{}` is loaded", b.lora_name),
                    kind: "invalid_request_error",
                    param: Some("lora_name".into()),
                    code: Some("model_not_found"),
                });
            };
            list.remove(i);
        }
        let name = b.lora_name.clone();
        if state
            .engine
            .call(move |backend| backend.remove_adapter(&name))
            .await
            .is_none()
        {
            let mut list = state.adapters.write().expect("adapters lock");
            list.push(b.lora_name.clone());
            return Err(ApiError::queue_full());
        }
        Ok(format!(
            "Success: LoRA adapter '{}' removed successfully.",
            b.lora_name
        ))
    };
    r.await.into_response()
}
