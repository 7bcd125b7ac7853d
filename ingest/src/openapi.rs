//! The HTTP API's catalogue: every route is declared once as an [`Endpoint`] next to its
//! handler, the router is built from those declarations, and `GET /openapi.json` is
//! generated from the same list. A route cannot be served without being documented.
//!
//! ```text
//!  [(Endpoint, MethodRouter)] ─┬─▶ axum Router (what is served)
//!                              └─▶ document() ─▶ OpenAPI 3.1 JSON (what is described)
//! ```

use serde_json::{Map, Value, json};

use crate::auth::Role;

/// Who may call an endpoint.
#[derive(Clone, Copy, Debug)]
pub enum Access {
    /// No token: health checks and the console's static files.
    Public,
    /// A bearer token of one of these roles.
    Roles(&'static [Role]),
}

/// One method on one path.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub method: &'static str,
    /// An axum path: `{name}` segments are path parameters.
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    /// Request body media type and an example body.
    pub body: Option<(&'static str, &'static str)>,
    /// Success status and media type of the answer.
    pub answer: (u16, &'static str),
}

impl Endpoint {
    pub const fn new(method: &'static str, path: &'static str, tag: &'static str, summary: &'static str) -> Self {
        Self {
            method,
            path,
            tag,
            summary,
            access: Access::Public,
            query: &[],
            body: None,
            answer: (200, "application/json"),
        }
    }

    pub const fn roles(mut self, roles: &'static [Role]) -> Self {
        self.access = Access::Roles(roles);
        self
    }

    pub const fn query(mut self, query: &'static [(&'static str, &'static str)]) -> Self {
        self.query = query;
        self
    }

    pub const fn body(mut self, media: &'static str, example: &'static str) -> Self {
        self.body = Some((media, example));
        self
    }

    pub const fn answer(mut self, status: u16, media: &'static str) -> Self {
        self.answer = (status, media);
        self
    }

    /// Role names allowed, empty for a public endpoint.
    pub fn role_names(&self) -> Vec<&'static str> {
        match self.access {
            Access::Public => Vec::new(),
            Access::Roles(roles) => roles.iter().map(|role| role.name()).collect(),
        }
    }
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// The OpenAPI 3.1 document for `endpoints`.
pub fn document(endpoints: &[Endpoint], version: &str) -> Value {
    let mut paths = Map::new();
    for endpoint in endpoints {
        let mut parameters: Vec<Value> = endpoint
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        parameters.extend(endpoint.query.iter().map(|(name, description)| {
            json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "string"}})
        }));
        let (status, media) = endpoint.answer;
        let mut responses = Map::new();
        responses.insert(
            status.to_string(),
            json!({"description": "success", "content": {media: {}}}),
        );
        responses.insert(
            "400".into(),
            error_response("a bad parameter or body; the message names it"),
        );
        let mut operation = json!({
            "operationId": operation_id(endpoint),
            "tags": [endpoint.tag],
            "summary": endpoint.summary,
            "parameters": parameters,
        });
        match endpoint.access {
            Access::Public => {
                operation["security"] = json!([]);
            }
            Access::Roles(roles) => {
                operation["security"] = json!([{"bearer": []}]);
                operation["x-custos-roles"] = json!(roles.iter().map(|role| role.name()).collect::<Vec<_>>());
                responses.insert(
                    "401".into(),
                    error_response("no token, or an unknown, expired or revoked one"),
                );
                responses.insert(
                    "403".into(),
                    error_response("the token's role may not use this route, or the realm is outside its scope"),
                );
            }
        }
        operation["responses"] = Value::Object(responses);
        if let Some((media, example)) = endpoint.body {
            let example: Value = serde_json::from_str(example).unwrap_or_else(|_| Value::String(example.into()));
            operation["requestBody"] = json!({"required": true, "content": {media: {"example": example}}});
        }
        let path = paths
            .entry(endpoint.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        path[endpoint.method.to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Custos",
            "version": version,
            "description": "Audit, anomaly detection and automated response for fleets of AI agents. Every route but the health checks and the console's static files needs a bearer token; x-custos-roles lists the roles allowed.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:7600"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "cus_… tokens from `custos token create`"}},
            "schemas": {"Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": {"type": "string", "description": "a stable code"},
                    "message": {"type": "string", "description": "a sentence naming the bad value"}
                }
            }}
        }
    })
}

fn operation_id(endpoint: &Endpoint) -> String {
    let mut id = endpoint.method.to_ascii_lowercase();
    for segment in endpoint
        .path
        .split('/')
        .filter(|segment| !segment.is_empty() && *segment != "v1")
    {
        id.push('_');
        id.extend(
            segment
                .trim_matches(|c| c == '{' || c == '}')
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
    }
    id
}
