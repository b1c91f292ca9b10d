//! The request fields of structured outputs, as OpenAI and vLLM clients send them, read into one
//! engine [`Constraint`]: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and
//! vLLM's `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`) and its
//! older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`. At most one may be
//! given; a shape error names the field (422). Whether a grammar compiles is the replica's to say
//! (its tokenizer decides): that refusal is a 400 naming the field the constraint came from.

use serde::Deserialize;
use serde_json::Value;
use tessera_engine::constraint::Constraint;
use utoipa::ToSchema;

use super::error::AppError;

/// `response_format.json_schema`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    /// The schema's name (not used to decode).
    pub name: Option<String>,
    pub description: Option<String>,
    /// The JSON schema the output must be valid against.
    #[schema(value_type = Object)]
    pub schema: Option<Value>,
    /// Accepted; the schema is always enforced.
    pub strict: Option<bool>,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct ResponseFormat {
    /// `text` (free text, the default), `json_object` (any JSON object) or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// With `type: json_schema`.
    pub json_schema: Option<JsonSchemaFormat>,
}

/// vLLM's `structured_outputs`: exactly one of its fields.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    /// A JSON schema (an object, or its JSON text).
    #[schema(value_type = Object)]
    pub json: Option<Value>,
    /// A regular expression the whole output matches.
    pub regex: Option<String>,
    /// The output is exactly one of these strings.
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    /// Any JSON object.
    pub json_object: Option<bool>,
}

/// Every structured-output field of a generation request, as given.
#[derive(Debug, Default)]
pub struct ConstraintFields {
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputs>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// The constraint a request asks for and the field it came from.
pub type Chosen = Option<(Constraint, &'static str)>;

impl ConstraintFields {
    /// The one constraint asked for, if any.
    pub fn constraint(self) -> Result<Chosen, AppError> {
        let mut found: Vec<(Constraint, &'static str)> = Vec::new();
        if let Some(f) = self.response_format {
            match f.kind.as_str() {
                "text" => {}
                "json_object" => found.push((Constraint::JsonObject, "response_format")),
                "json_schema" => {
                    let schema = f.json_schema.and_then(|s| s.schema).ok_or_else(|| {
                        AppError::invalid(
                            "response_format.json_schema.schema",
                            "required with `type: json_schema`",
                        )
                    })?;
                    found.push((
                        Constraint::JsonSchema {
                            schema: schema_value(schema, "response_format.json_schema.schema")?,
                        },
                        "response_format",
                    ));
                }
                other => {
                    return Err(AppError::invalid(
                        "response_format.type",
                        format!("`{other}` is not one of text, json_object, json_schema"),
                    ))
                }
            }
        }
        if let Some(s) = self.structured_outputs {
            let field = "structured_outputs";
            let mut inner = Vec::new();
            if let Some(json) = s.json {
                inner.push(Constraint::JsonSchema {
                    schema: schema_value(json, "structured_outputs.json")?,
                });
            }
            if let Some(pattern) = s.regex {
                inner.push(Constraint::Regex { pattern });
            }
            if let Some(choices) = s.choice {
                inner.push(Constraint::Choice { choices });
            }
            if let Some(lark) = s.grammar {
                inner.push(Constraint::Grammar { lark });
            }
            if s.json_object == Some(true) {
                inner.push(Constraint::JsonObject);
            }
            if inner.len() > 1 {
                return Err(AppError::invalid(
                    field,
                    "give one of json, regex, choice, grammar, json_object",
                ));
            }
            found.extend(inner.into_iter().map(|c| (c, field)));
        }
        if let Some(json) = self.guided_json {
            found.push((
                Constraint::JsonSchema {
                    schema: schema_value(json, "guided_json")?,
                },
                "guided_json",
            ));
        }
        if let Some(pattern) = self.guided_regex {
            found.push((Constraint::Regex { pattern }, "guided_regex"));
        }
        if let Some(choices) = self.guided_choice {
            found.push((Constraint::Choice { choices }, "guided_choice"));
        }
        if let Some(lark) = self.guided_grammar {
            found.push((Constraint::Grammar { lark }, "guided_grammar"));
        }
        if found.len() > 1 {
            return Err(AppError::invalid(
                found[1].1,
                format!(
                    "give one structured-output constraint; `{}` was given too",
                    found[0].1
                ),
            ));
        }
        let chosen = found.pop();
        if let Some((c, field)) = &chosen {
            check_shape(c, field)?;
        }
        Ok(chosen)
    }
}

/// A schema given as an object, or as its JSON text.
fn schema_value(v: Value, field: &str) -> Result<Value, AppError> {
    let v = match v {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| AppError::invalid(field, format!("not JSON: {e}")))?,
        other => other,
    };
    if !v.is_object() {
        return Err(AppError::invalid(field, "a JSON schema is an object"));
    }
    Ok(v)
}

/// The engine's checks that need no compiler (sizes, empty values), naming the request's field.
fn check_shape(c: &Constraint, field: &str) -> Result<(), AppError> {
    c.check().map_err(|e| AppError::invalid(field, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> ConstraintFields {
        #[derive(Deserialize)]
        struct Body {
            response_format: Option<ResponseFormat>,
            structured_outputs: Option<StructuredOutputs>,
            guided_json: Option<Value>,
            guided_regex: Option<String>,
            guided_choice: Option<Vec<String>>,
            guided_grammar: Option<String>,
        }
        let b: Body = serde_json::from_value(v).unwrap();
        ConstraintFields {
            response_format: b.response_format,
            structured_outputs: b.structured_outputs,
            guided_json: b.guided_json,
            guided_regex: b.guided_regex,
            guided_choice: b.guided_choice,
            guided_grammar: b.guided_grammar,
        }
    }

    #[test]
    fn each_way_of_asking_reads_into_one_constraint() {
        let schema = json!({"type": "object"});
        let cases = [
            (json!({}), None),
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some((Constraint::JsonObject, "response_format")),
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Some((
                    Constraint::JsonSchema {
                        schema: schema.clone(),
                    },
                    "response_format",
                )),
            ),
            (
                json!({"guided_json": "{\"type\": \"object\"}"}),
                Some((
                    Constraint::JsonSchema {
                        schema: schema.clone(),
                    },
                    "guided_json",
                )),
            ),
            (
                json!({"guided_regex": "a+"}),
                Some((
                    Constraint::Regex {
                        pattern: "a+".into(),
                    },
                    "guided_regex",
                )),
            ),
            (
                json!({"structured_outputs": {"choice": ["x", "y"]}}),
                Some((
                    Constraint::Choice {
                        choices: vec!["x".into(), "y".into()],
                    },
                    "structured_outputs",
                )),
            ),
            (
                json!({"guided_grammar": "start: \"a\""}),
                Some((
                    Constraint::Grammar {
                        lark: "start: \"a\"".into(),
                    },
                    "guided_grammar",
                )),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(fields(body.clone()).constraint().unwrap(), want, "{body}");
        }
    }

    #[test]
    fn shape_errors_name_the_field() {
        for (body, field) in [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_regex": ""}), "guided_regex"),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                "structured_outputs",
            ),
        ] {
            let e = fields(body.clone()).constraint().unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{body}");
        }
    }
}
