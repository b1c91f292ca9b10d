//! The OpenAPI document (utoipa), built from the handlers' annotations; a test checks that every
//! route of [`super::app`] is in it.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{chat, deployments, error, jobs, openai, status};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera", description = "Serve and fine-tune LLMs: chat, OpenAI-compatible completions, LoRA fine-tune jobs."),
    paths(
        chat::chat,
        openai::chat_completions,
        openai::completions,
        openai::models,
        jobs::fine_tune,
        jobs::list,
        jobs::get,
        jobs::cancel,
        jobs::events,
        deployments::create,
        deployments::list,
        deployments::get,
        deployments::delete,
        status::health,
        status::ready,
        status::cluster,
        status::metrics,
        document,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document", body = Object)))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
