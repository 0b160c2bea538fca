//! Skills: what an agent offers, as advertised in its card and checked on every call.

use std::fmt;
use std::time::Duration;

use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ValidationError;
use crate::limits::*;

/// Checks the shared name charset: lowercase ASCII letters and digits first, then also `.`, `_`
/// and `-`. One spelling per name keeps DHT keys unambiguous.
fn check_name(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("{s:?} must be 1 to {max} characters"),
        ));
    }
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !(first_ok && rest_ok) {
        return Err(ValidationError::new(
            field,
            format!(
                "{s:?} may hold only a-z, 0-9, '.', '_' and '-', and must start with a-z or 0-9"
            ),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, ValidationError> {
                let s = s.into();
                check_name($field, &s, $max)?;
                Ok($name(s))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, ValidationError> {
                $name::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, ValidationError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A skill's name, e.g. `translate` or `acme.summarize-v2`: 1 to 64 of `a-z 0-9 . _ -`.
    SkillName,
    "name",
    MAX_SKILL_NAME_LEN
);
name_type!(
    /// A discovery tag, e.g. `nlp`: 1 to 32 of `a-z 0-9 . _ -`.
    Tag,
    "tag",
    MAX_TAG_LEN
);

/// How a skill returns its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The result comes in the response.
    #[default]
    Sync,
    /// Accepted now, result delivered later.
    Async,
    /// Ordered chunks, then an end or an error.
    Stream,
}

/// Who may call a skill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Anyone who can reach the node.
    Public,
    /// Peers of the same private mesh.
    #[default]
    Mesh,
    /// Callers presenting a grant signed by the skill's owner.
    Grants,
    /// The same owner only.
    Private,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Stream => "stream",
        })
    }
}

impl fmt::Display for ShareMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareMode::Public => "public",
            ShareMode::Mesh => "mesh",
            ShareMode::Grants => "grants",
            ShareMode::Private => "private",
        })
    }
}

/// A JSON Schema, inline as JSON text, or by the sha256 of that text when space is short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    /// The schema's JSON text.
    Inline(String),
    /// `sha256` of the schema's JSON text.
    Sha256(#[serde(with = "serde_bytes")] [u8; 32]),
}

impl Schema {
    /// An inline schema from a JSON value.
    pub fn inline(value: &serde_json::Value) -> Self {
        Schema::Inline(value.to_string())
    }

    /// The sha256 of the schema text (the hash itself for `Sha256`).
    pub fn hash(&self) -> [u8; 32] {
        match self {
            Schema::Inline(text) => Sha256::digest(text.as_bytes()).into(),
            Schema::Sha256(h) => *h,
        }
    }

    /// The parsed schema, if inline.
    pub fn json(&self) -> Option<Result<serde_json::Value, serde_json::Error>> {
        match self {
            Schema::Inline(text) => Some(serde_json::from_str(text)),
            Schema::Sha256(_) => None,
        }
    }

    fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let Schema::Inline(text) = self else {
            return Ok(());
        };
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(ValidationError::new(
                field,
                format!(
                    "{} bytes is over the limit of {MAX_SCHEMA_BYTES}",
                    text.len()
                ),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(_) | serde_json::Value::Bool(_)) => Ok(()),
            Ok(_) => Err(ValidationError::new(
                field,
                "a JSON Schema is an object or a boolean",
            )),
            Err(e) => Err(ValidationError::new(field, format!("not JSON: {e}"))),
        }
    }
}

/// A skill's resource bounds, enforced by the callee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillLimits {
    /// The handler's deadline, in milliseconds.
    pub timeout_ms: u32,
    /// The largest arguments accepted, in bytes of CBOR.
    pub max_arg_bytes: u32,
    /// Calls of this skill running at once.
    pub max_concurrency: u16,
}

impl Default for SkillLimits {
    fn default() -> Self {
        SkillLimits {
            timeout_ms: 30_000,
            max_arg_bytes: 64 * 1024,
            max_concurrency: 16,
        }
    }
}

impl SkillLimits {
    /// The handler's deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }

    fn validate(&self, mode: Mode) -> Result<(), ValidationError> {
        let max = match mode {
            Mode::Sync => MAX_SKILL_TIMEOUT,
            Mode::Stream | Mode::Async => MAX_LONG_SKILL_TIMEOUT,
        };
        if self.timeout_ms == 0 || Duration::from_millis(self.timeout_ms.into()) > max {
            return Err(ValidationError::new(
                "limits.timeout_ms",
                format!(
                    "{} must be 1 to {} for a {mode} skill",
                    self.timeout_ms,
                    max.as_millis()
                ),
            ));
        }
        if self.max_arg_bytes == 0 || self.max_arg_bytes as usize > MAX_CALL_ARGS_BYTES {
            return Err(ValidationError::new(
                "limits.max_arg_bytes",
                format!("{} must be 1 to {MAX_CALL_ARGS_BYTES}", self.max_arg_bytes),
            ));
        }
        if self.max_concurrency == 0 || self.max_concurrency > MAX_SKILL_CONCURRENCY {
            return Err(ValidationError::new(
                "limits.max_concurrency",
                format!(
                    "{} must be 1 to {MAX_SKILL_CONCURRENCY}",
                    self.max_concurrency
                ),
            ));
        }
        Ok(())
    }
}

/// A versioned skill as advertised: what it is called, how it is called, who may call it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillSpec {
    /// The name callers ask for.
    pub name: SkillName,
    /// Semantic version of this implementation.
    pub version: Version,
    /// A human description.
    #[serde(default)]
    pub description: String,
    /// How results come back.
    pub mode: Mode,
    /// Who may call.
    pub share: ShareMode,
    /// Schema of the arguments (absent: anything).
    #[serde(default)]
    pub input: Option<Schema>,
    /// Schema of the output (absent: anything).
    #[serde(default)]
    pub output: Option<Schema>,
    /// Discovery tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Resource bounds.
    pub limits: SkillLimits,
}

impl SkillSpec {
    /// Starts a spec; `build()` validates it.
    pub fn builder(name: impl Into<String>, version: impl Into<String>) -> SkillSpecBuilder {
        SkillSpecBuilder {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            mode: Mode::default(),
            share: ShareMode::default(),
            input: None,
            output: None,
            tags: Vec::new(),
            limits: SkillLimits::default(),
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.description.len() > MAX_DESCRIPTION_LEN {
            return Err(ValidationError::new(
                "description",
                format!("over {MAX_DESCRIPTION_LEN} bytes"),
            ));
        }
        if let Some(s) = &self.input {
            s.validate("input")?;
        }
        if let Some(s) = &self.output {
            s.validate("output")?;
        }
        if self.tags.len() > MAX_TAGS {
            return Err(ValidationError::new(
                "tags",
                format!("{} tags, at most {MAX_TAGS}", self.tags.len()),
            ));
        }
        for (i, t) in self.tags.iter().enumerate() {
            if self.tags[..i].contains(t) {
                return Err(ValidationError::new(
                    format!("tags[{i}]"),
                    format!("{t} appears twice"),
                ));
            }
        }
        self.limits.validate(self.mode)
    }

    /// The same spec with inline schemas replaced by their hashes, to fit in a card.
    pub fn compact(&self) -> SkillSpec {
        let hash = |s: &Option<Schema>| s.as_ref().map(|s| Schema::Sha256(s.hash()));
        SkillSpec {
            input: hash(&self.input),
            output: hash(&self.output),
            ..self.clone()
        }
    }
}

/// Builds a [`SkillSpec`]; `build()` names the first bad field.
#[derive(Clone, Debug)]
pub struct SkillSpecBuilder {
    name: String,
    version: String,
    description: String,
    mode: Mode,
    share: ShareMode,
    input: Option<Schema>,
    output: Option<Schema>,
    tags: Vec<String>,
    limits: SkillLimits,
}

impl SkillSpecBuilder {
    /// A human description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }
    /// How results come back (default sync).
    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = m;
        self
    }
    /// Who may call (default mesh).
    pub fn share(mut self, s: ShareMode) -> Self {
        self.share = s;
        self
    }
    /// The arguments' JSON Schema.
    pub fn input_schema(mut self, schema: serde_json::Value) -> Self {
        self.input = Some(Schema::inline(&schema));
        self
    }
    /// The output's JSON Schema.
    pub fn output_schema(mut self, schema: serde_json::Value) -> Self {
        self.output = Some(Schema::inline(&schema));
        self
    }
    /// Adds a tag.
    pub fn tag(mut self, t: impl Into<String>) -> Self {
        self.tags.push(t.into());
        self
    }
    /// The handler deadline.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.limits.timeout_ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        self
    }
    /// The largest arguments accepted.
    pub fn max_arg_bytes(mut self, n: u32) -> Self {
        self.limits.max_arg_bytes = n;
        self
    }
    /// Calls running at once.
    pub fn max_concurrency(mut self, n: u16) -> Self {
        self.limits.max_concurrency = n;
        self
    }

    /// Validates and returns the spec.
    pub fn build(self) -> Result<SkillSpec, ValidationError> {
        let version = Version::parse(&self.version)
            .map_err(|e| ValidationError::new("version", format!("{:?}: {e}", self.version)))?;
        let tags = self
            .tags
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                Tag::new(t).map_err(|e| ValidationError::new(format!("tags[{i}]"), e.reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = SkillSpec {
            name: SkillName::new(self.name)?,
            version,
            description: self.description,
            mode: self.mode,
            share: self.share,
            input: self.input,
            output: self.output,
            tags,
            limits: self.limits,
        };
        spec.validate()?;
        Ok(spec)
    }
}
