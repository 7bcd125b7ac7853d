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
    /// Optional request headers besides `Authorization`, each a partition number (0 to
    /// 1023): (name, description).
    pub headers: &'static [(&'static str, &'static str)],
    /// Request body media type and an example body.
    pub body: Option<(&'static str, &'static str)>,
    /// Success status and media type of the answer.
    pub answer: (u16, &'static str),
    /// The success body's schema: a component of [`document`] (`"#/components/schemas/…"`
    /// is implied) for JSON answers.
    pub returns: Option<&'static str>,
    /// Error statuses besides those every route may answer (see [`document`]).
    pub errors: &'static [u16],
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
            headers: &[],
            body: None,
            answer: (200, "application/json"),
            returns: None,
            errors: &[],
        }
    }

    /// The success body is the component schema `name`.
    pub const fn returns(mut self, name: &'static str) -> Self {
        self.returns = Some(name);
        self
    }

    /// Error statuses this route answers besides the common ones.
    pub const fn errors(mut self, statuses: &'static [u16]) -> Self {
        self.errors = statuses;
        self
    }

    pub const fn roles(mut self, roles: &'static [Role]) -> Self {
        self.access = Access::Roles(roles);
        self
    }

    pub const fn query(mut self, query: &'static [(&'static str, &'static str)]) -> Self {
        self.query = query;
        self
    }

    /// Optional partition-number headers (see [`Endpoint::headers`]).
    pub const fn headers(mut self, headers: &'static [(&'static str, &'static str)]) -> Self {
        self.headers = headers;
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

/// What each error status means, for every route that may answer it.
fn error_description(status: u16) -> &'static str {
    match status {
        400 => "a bad parameter or body; the message names it",
        401 => "no token, or an unknown, expired or revoked one",
        403 => "the token's role may not use this route, or the realm is outside its scope",
        404 => "no such route, or nothing with that id (or the node runs without the detector)",
        405 => "the route does not take this method",
        408 => "the request body, or the query, took longer than its limit",
        409 => "the request conflicts with the current state (already exists, already running, …)",
        413 => "the body, the answer or the query's memory is over its limit",
        429 => "a limit on queries or on unauthenticated input was reached; see Retry-After",
        503 => {
            "the node cannot take this now (store not writable, shutting down, bodies in flight over budget); see Retry-After"
        }
        _ => "an error",
    }
}

/// The schema of query parameter `name` on `path`.
fn parameter_schema(path: &str, name: &str) -> Value {
    let integer = json!({"type": "integer", "minimum": 0});
    match name {
        "limit" | "after" | "before" | "log_index" | "size" => integer,
        "from" | "to" if path.starts_with("/v1/proofs/") => integer,
        "from" | "to" => json!({"type": "string", "format": "date-time"}),
        "signatures" => json!({"type": "boolean"}),
        "severity" => json!({"type": "string", "enum": ["low", "medium", "high", "critical"]}),
        "format" => json!({"type": "string", "enum": ["json", "ndjson"]}),
        "status" if path == "/v1/agents" => json!({"type": "string", "enum": ["active", "quarantined", "revoked"]}),
        _ => json!({"type": "string"}),
    }
}

/// The component schemas: the error body and every JSON answer's shape.
fn schemas() -> Value {
    let object = json!({"type": "object"});
    let string_or_null = json!({"type": ["string", "null"]});
    let integer_or_null = json!({"type": ["integer", "null"]});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    json!({
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "a stable code"},
                "message": {"type": "string", "description": "a sentence naming the bad value"}
            }
        },
        "ItemResults": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "status", "reason", "log_index"],
                "properties": {
                    "index": {"type": "integer"},
                    "status": {"type": "string", "enum": ["accepted", "duplicate", "rejected"]},
                    "reason": string_or_null,
                    "message": {"type": "string"},
                    "log_index": integer_or_null,
                    "flags": strings,
                    "missing": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
                }
            }
        },
        "Agent": {
            "type": "object",
            "required": ["did", "realm", "labels", "parent", "children", "status", "enrolled_at", "enrolled_by", "enroll_log_index", "events"],
            "properties": {
                "did": {"type": "string"},
                "realm": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "parent": string_or_null,
                "children": strings,
                "status": {"type": "string", "enum": ["active", "quarantined", "revoked"]},
                "enrolled_at": {"type": "string"},
                "enrolled_by": {"type": "string"},
                "enroll_log_index": {"type": "integer"},
                "revoked_at": string_or_null,
                "revoke_log_index": integer_or_null,
                "revoke_reason": string_or_null,
                "status_log_index": integer_or_null,
                "events": {"type": "integer"},
                "last_seq": integer_or_null,
                "last_log_index": integer_or_null,
                "last_ts": string_or_null
            }
        },
        "AgentPage": {
            "type": "object",
            "required": ["agents", "next"],
            "properties": {"agents": {"type": "array", "items": {"$ref": "#/components/schemas/Agent"}}, "next": integer_or_null}
        },
        "Revoked": {
            "type": "object",
            "required": ["revoked", "log_indexes"],
            "properties": {"revoked": strings, "log_indexes": {"type": "array", "items": {"type": "integer"}}}
        },
        "Rejected": {
            "type": "object",
            "required": ["rejected"],
            "properties": {"rejected": {"type": "array", "items": {
                "type": "object",
                "required": ["id", "received_at", "reason", "message", "remote", "size", "blake3", "input", "input_encoding", "truncated"],
                "properties": {
                    "id": {"type": "integer"}, "received_at": {"type": "string"}, "reason": {"type": "string"},
                    "message": {"type": "string"}, "remote": {"type": "string"}, "index": integer_or_null,
                    "keyid": string_or_null, "size": {"type": "integer"}, "blake3": {"type": "string"},
                    "input": {"type": "string"}, "input_encoding": {"type": "string"}, "truncated": {"type": "boolean"},
                    "evidence": object
                }
            }}}
        },
        "Checkpoint": {
            "type": "object",
            "required": ["log_id", "origin", "size", "root", "note", "verifier_key", "node_did"],
            "properties": {
                "log_id": {"type": "string"}, "origin": {"type": "string"}, "size": {"type": "integer"},
                "root": {"type": "string"}, "note": {"type": "string"}, "verifier_key": {"type": "string"},
                "node_did": {"type": "string"}, "cosigned_by": {"type": "integer"}
            }
        },
        "InclusionProof": {
            "type": "object",
            "required": ["log_id", "origin", "leaf_index", "tree_size", "leaf_hash", "root_hash", "inclusion_path"],
            "properties": {
                "log_id": {"type": "string"}, "origin": {"type": "string"}, "leaf_index": {"type": "integer"},
                "tree_size": {"type": "integer"}, "leaf_hash": {"type": "string"}, "root_hash": {"type": "string"},
                "inclusion_path": strings
            }
        },
        "ConsistencyProof": {
            "type": "object",
            "required": ["log_id", "origin", "first_size", "second_size", "first_root", "second_root", "consistency_path"],
            "properties": {
                "log_id": {"type": "string"}, "origin": {"type": "string"}, "first_size": {"type": "integer"},
                "second_size": {"type": "integer"}, "first_root": {"type": "string"}, "second_root": {"type": "string"},
                "consistency_path": strings
            }
        },
        "TokenCreated": {
            "type": "object",
            "required": ["id", "token", "role", "realms", "expires_at"],
            "properties": {
                "id": {"type": "string"}, "token": {"type": "string"}, "role": {"type": "string"},
                "realms": strings, "expires_at": string_or_null
            }
        },
        "Tokens": {
            "type": "object",
            "required": ["tokens"],
            "properties": {"tokens": {"type": "array", "items": {
                "type": "object",
                "required": ["id", "role", "realms", "created_at", "expires_at", "revoked"],
                "properties": {
                    "id": {"type": "string"}, "role": {"type": "string"}, "realms": strings,
                    "created_at": {"type": "string"}, "expires_at": string_or_null, "revoked": {"type": "boolean"}
                }
            }}}
        },
        "TokenRevoked": {
            "type": "object",
            "required": ["id", "revoked"],
            "properties": {"id": {"type": "string"}, "revoked": {"type": "boolean"}}
        },
        "Envelope": {
            "type": "object",
            "required": ["payloadType", "payload", "signatures"],
            "properties": {
                "payloadType": {"type": "string"},
                "payload": {"type": "string", "description": "base64"},
                "signatures": {"type": "array", "items": {
                    "type": "object", "required": ["keyid", "sig"],
                    "properties": {"keyid": {"type": "string"}, "sig": {"type": "string"}}
                }}
            }
        },
        "MemoryStatus": {
            "type": "object",
            "required": ["memory_id", "status", "serve"],
            "properties": {"memory_id": {"type": "string"}, "status": {"type": "string"}, "serve": {"type": "boolean"}}
        },
        "FindingPage": {
            "type": "object",
            "required": ["findings", "next"],
            "properties": {"findings": {"type": "array", "items": object}, "next": integer_or_null}
        },
        "ActionPage": {
            "type": "object",
            "required": ["actions", "next", "pending"],
            "properties": {"actions": {"type": "array", "items": object}, "next": integer_or_null, "pending": {"type": "array", "items": object}}
        },
        "Approvals": {
            "type": "object",
            "required": ["pending"],
            "properties": {"pending": {"type": "array", "items": object}}
        },
        "Playbooks": {
            "type": "object",
            "required": ["playbooks"],
            "properties": {"playbooks": {"type": "array", "items": object}}
        },
        "Record": object,
        "Rows": {"type": "array", "items": object},
        "EventPage": {
            "type": "object",
            "required": ["events", "next"],
            "properties": {"events": {"type": "array", "items": object}, "next": integer_or_null}
        },
        "Integrity": {
            "type": "object",
            "required": ["checkpoint", "last_verify"],
            "properties": {
                "checkpoint": {"$ref": "#/components/schemas/Checkpoint"},
                "last_verify": {"anyOf": [{"$ref": "#/components/schemas/Verified"}, {"type": "null"}]}
            }
        },
        "Verified": {
            "type": "object",
            "required": ["at", "ok", "entries", "signatures_checked", "problems", "first_problem", "by", "millis"],
            "properties": {
                "at": {"type": "string"}, "ok": {"type": "boolean"}, "entries": {"type": "integer"},
                "signatures_checked": {"type": "integer"}, "problems": {"type": "integer"},
                "first_problem": string_or_null, "by": {"type": "string"}, "millis": {"type": "integer"}
            }
        }
    })
}

/// `GET /openapi.json`: the document for `endpoints`, built once and served as it is.
pub fn route<S: Clone + Send + Sync + 'static>(
    endpoints: &[Endpoint],
    version: &str,
) -> axum::routing::MethodRouter<S> {
    let document = std::sync::Arc::new(document(endpoints, version));
    axum::routing::get(move || {
        let document = document.clone();
        async move { axum::Json(document.as_ref().clone()) }
    })
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
            json!({"name": name, "in": "query", "required": false, "description": description, "schema": parameter_schema(endpoint.path, name)})
        }));
        parameters.extend(endpoint.headers.iter().map(|(name, description)| {
            json!({"name": name, "in": "header", "required": false, "description": description, "schema": {"type": "integer", "minimum": 0, "maximum": 1023}})
        }));
        let (status, media) = endpoint.answer;
        let mut responses = Map::new();
        let content = match endpoint.returns {
            Some(schema) => json!({media: {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}),
            None => json!({media: {}}),
        };
        responses.insert(
            status.to_string(),
            json!({"description": "success", "content": content}),
        );
        // Every route may answer these: a bad request, an unknown path, a method it does
        // not take, a body over its limit or too slow, and a node that cannot take it now.
        let mut statuses = vec![400, 404, 405, 408, 413, 503];
        statuses.extend_from_slice(endpoint.errors);
        for status in statuses {
            responses.insert(status.to_string(), error_response(error_description(status)));
        }
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
            "schemas": schemas()
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
