//! The protocol's JSON Schemas, loaded once and ready to check frames with.
//!
//! [`Spec::load`] reads every `*.json` under `spec/v1/schemas`, registers each
//! under its `$id` (the validator cannot fetch anything, so every relative
//! `$ref` must resolve to a registered file), compiles a validator for every
//! `$defs` entry, and reads the index `spec/v1/commands.json` that maps
//! command and push types to their definitions. The `check_*` methods answer
//! `Err` with a message naming the definition and the failing location.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};

/// Base URI of protocol v1: the index's `$id` directory. Index entries are
/// relative to it.
pub const V1_BASE: &str = "https://agent-service.spec/v1/";
/// Base URI of the schema files.
pub const SCHEMAS_BASE: &str = "https://agent-service.spec/v1/schemas/";

/// One schema file as loaded.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    /// Path relative to the crate root (`spec/v1/schemas/commands/stream.json`).
    pub path: String,
    /// Its `$id`.
    pub id: String,
    pub contents: Value,
}

/// A command's entry in the index.
#[derive(Debug, Clone)]
pub struct CommandEntry {
    /// Absolute reference of the request payload definition.
    pub request: String,
    /// Absolute reference of the reply payload definition.
    pub response: String,
    /// The capability the session must have asked for at attach, if any.
    pub capability: Option<String>,
    /// The WebSocket paths that offer the command.
    pub endpoints: Vec<String>,
}

/// The loaded, compiled protocol specification.
pub struct Spec {
    files: Vec<SchemaFile>,
    index: Value,
    commands: BTreeMap<String, CommandEntry>,
    pushes: BTreeMap<String, String>,
    envelope: BTreeMap<String, String>,
    /// One validator per `$defs` entry of every file, by absolute reference
    /// (`https://agent-service.spec/v1/schemas/...json#/$defs/Name`).
    validators: BTreeMap<String, Validator>,
    registry: Registry<'static>,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field(
                "files",
                &self.files.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("defs", &self.validators.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The workspace root, where `spec/` lives.
pub fn crate_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            json_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

/// Turns an index entry or shorthand into an absolute reference:
/// `https://...` stays; `schemas/...` is relative to [`V1_BASE`]; anything
/// else (`commands/stream.json#/$defs/X`) is relative to [`SCHEMAS_BASE`].
pub fn absolute_ref(def_ref: &str) -> String {
    if def_ref.starts_with("https://") || def_ref.starts_with("http://") {
        def_ref.to_owned()
    } else if def_ref.starts_with("schemas/") {
        format!("{V1_BASE}{def_ref}")
    } else {
        format!("{SCHEMAS_BASE}{def_ref}")
    }
}

/// `https://agent-service.spec/v1/schemas/commands/stream.json#/$defs/X` →
/// `commands/stream.json#/$defs/X`, for messages.
fn short(def_ref: &str) -> &str {
    def_ref.strip_prefix(SCHEMAS_BASE).unwrap_or(def_ref)
}

fn options<'a>(registry: &'a Registry<'static>) -> jsonschema::ValidationOptions<'a> {
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .with_registry(registry)
}

impl Spec {
    /// Loads and compiles everything; panics with a clear message on any
    /// unreadable, unparsable or uncompilable schema.
    pub fn load() -> Spec {
        Self::try_load().unwrap_or_else(|e| panic!("loading spec/: {e}"))
    }

    /// Like [`Spec::load`], but says what is wrong instead of panicking.
    pub fn try_load() -> Result<Spec, String> {
        let root = crate_root();
        let mut paths = Vec::new();
        json_files(&root.join("spec/v1/schemas"), &mut paths);
        if paths.is_empty() {
            return Err("no schema files under spec/v1/schemas".into());
        }

        let mut files = Vec::new();
        for path in paths {
            let rel = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{rel}: {e}"))?;
            let contents: Value =
                serde_json::from_str(&text).map_err(|e| format!("{rel}: not JSON: {e}"))?;
            let id = contents
                .get("$id")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{rel}: no \"$id\""))?
                .to_owned();
            let expected = format!(
                "{SCHEMAS_BASE}{}",
                rel.trim_start_matches("spec/v1/schemas/")
            );
            if id != expected {
                return Err(format!("{rel}: \"$id\" is {id:?}, expected {expected:?}"));
            }
            files.push(SchemaFile {
                path: rel,
                id,
                contents,
            });
        }

        let mut builder = Registry::new();
        for file in &files {
            builder = builder
                .add(&file.id, file.contents.clone())
                .map_err(|e| format!("{}: cannot register: {e}", file.path))?;
        }
        let registry = builder
            .prepare()
            .map_err(|e| format!("cannot build the schema registry: {e}"))?;

        let mut validators = BTreeMap::new();
        for file in &files {
            // The whole file must compile as a schema too.
            options(&registry)
                .build(&file.contents)
                .map_err(|e| format!("{}: does not compile: {e}", file.path))?;
            let defs = file
                .contents
                .get("$defs")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("{}: no \"$defs\" object", file.path))?;
            for name in defs.keys() {
                let def_ref = format!("{}#/$defs/{name}", file.id);
                let v = options(&registry)
                    .build(&json!({ "$ref": def_ref }))
                    .map_err(|e| format!("{}: {def_ref} does not compile: {e}", file.path))?;
                validators.insert(def_ref, v);
            }
        }

        let index_path = root.join("spec/v1/commands.json");
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(&index_path)
                .map_err(|e| format!("spec/v1/commands.json: {e}"))?,
        )
        .map_err(|e| format!("spec/v1/commands.json: not JSON: {e}"))?;

        let str_at = |v: &Value, key: &str, what: &str| -> Result<String, String> {
            v.get(key)
                .and_then(Value::as_str)
                .map(absolute_ref)
                .ok_or_else(|| format!("spec/v1/commands.json: {what} has no string {key:?}"))
        };
        let mut commands = BTreeMap::new();
        for (name, entry) in index
            .get("commands")
            .and_then(Value::as_object)
            .ok_or("spec/v1/commands.json: no \"commands\" object")?
        {
            let capability = match entry.get("capability") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => {
                    return Err(format!(
                        "spec/v1/commands.json: {name}.capability is {other}, not a string or null"
                    ));
                }
            };
            let endpoints = entry
                .get("endpoints")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            commands.insert(
                name.clone(),
                CommandEntry {
                    request: str_at(entry, "request", name)?,
                    response: str_at(entry, "response", name)?,
                    capability,
                    endpoints,
                },
            );
        }
        let mut pushes = BTreeMap::new();
        for (name, entry) in index
            .get("pushes")
            .and_then(Value::as_object)
            .ok_or("spec/v1/commands.json: no \"pushes\" object")?
        {
            pushes.insert(name.clone(), str_at(entry, "payload", name)?);
        }
        let mut envelope = BTreeMap::new();
        for (name, def) in index
            .get("envelope")
            .and_then(Value::as_object)
            .ok_or("spec/v1/commands.json: no \"envelope\" object")?
        {
            let def = def
                .as_str()
                .ok_or_else(|| format!("spec/v1/commands.json: envelope.{name} is not a string"))?;
            envelope.insert(name.clone(), absolute_ref(def));
        }
        for kind in ["request", "reply", "error", "push"] {
            if !envelope.contains_key(kind) {
                return Err(format!("spec/v1/commands.json: envelope.{kind} is missing"));
            }
        }

        Ok(Spec {
            files,
            index,
            commands,
            pushes,
            envelope,
            validators,
            registry,
        })
    }

    /// Every schema file, in path order.
    pub fn files(&self) -> &[SchemaFile] {
        &self.files
    }

    /// The raw index (`spec/v1/commands.json`).
    pub fn index(&self) -> &Value {
        &self.index
    }

    /// Command types and their index entries.
    pub fn commands(&self) -> &BTreeMap<String, CommandEntry> {
        &self.commands
    }

    /// Push types and the absolute reference of their payload definitions.
    pub fn pushes(&self) -> &BTreeMap<String, String> {
        &self.pushes
    }

    /// Absolute references of every compiled `$defs` entry.
    pub fn defs(&self) -> impl Iterator<Item = &str> {
        self.validators.keys().map(String::as_str)
    }

    /// Whether `def_ref` (absolute, or relative as [`absolute_ref`] reads it)
    /// names a compiled `$defs` entry.
    pub fn has_def(&self, def_ref: &str) -> bool {
        self.validators.contains_key(&absolute_ref(def_ref))
    }

    /// The schema JSON of a definition, by absolute or relative reference.
    pub fn def_schema(&self, def_ref: &str) -> Option<&Value> {
        let abs = absolute_ref(def_ref);
        let (file, pointer) = abs.split_once('#')?;
        let file = self.files.iter().find(|f| f.id == file)?;
        file.contents.pointer(pointer)
    }

    /// The request payload definition of a command type.
    pub fn request_def(&self, command_type: &str) -> Option<&str> {
        self.commands.get(command_type).map(|c| c.request.as_str())
    }

    /// The reply payload definition of a command type.
    pub fn response_def(&self, command_type: &str) -> Option<&str> {
        self.commands.get(command_type).map(|c| c.response.as_str())
    }

    /// The payload definition of a push type.
    pub fn push_def(&self, push_type: &str) -> Option<&str> {
        self.pushes.get(push_type).map(String::as_str)
    }

    /// Checks `value` against one definition. `def_ref` is absolute
    /// (`https://agent-service.spec/v1/schemas/frames/pushes.json#/$defs/StreamGap`),
    /// relative to `spec/v1/` (`schemas/frames/pushes.json#/$defs/StreamGap`, as
    /// in the index) or to `spec/v1/schemas/` (`frames/pushes.json#/$defs/StreamGap`).
    /// A reference that is not a `$defs` entry (a deeper pointer) is compiled
    /// on the spot.
    pub fn check_def(&self, def_ref: &str, value: &Value) -> Result<(), String> {
        self.check_def_at(def_ref, value, "")
    }

    /// [`Spec::check_def`] for a value found at JSON pointer `at` inside a
    /// larger document: error locations are reported relative to that.
    fn check_def_at(&self, def_ref: &str, value: &Value, at: &str) -> Result<(), String> {
        let abs = absolute_ref(def_ref);
        match self.validators.get(&abs) {
            Some(v) => Self::run(v, &abs, value, at),
            None => {
                let v = options(&self.registry)
                    .build(&json!({ "$ref": abs }))
                    .map_err(|e| format!("{}: no such definition: {e}", short(&abs)))?;
                Self::run(&v, &abs, value, at)
            }
        }
    }

    /// Whether `value` satisfies the definition (see [`Spec::check_def`]).
    pub fn is_valid(&self, def_ref: &str, value: &Value) -> bool {
        self.check_def(def_ref, value).is_ok()
    }

    fn run(v: &Validator, abs: &str, value: &Value, prefix: &str) -> Result<(), String> {
        let errors: Vec<String> = v
            .iter_errors(value)
            .map(|e| {
                let at = format!("{prefix}{}", e.instance_path());
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("at {at}: {e}")
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{}: {}", short(abs), errors.join("; ")))
        }
    }

    fn envelope_def(&self, kind: &str) -> &str {
        &self.envelope[kind]
    }

    /// A request frame: the envelope, then the payload against the request
    /// definition of its `type` (payload errors are reported at `/payload/...`).
    pub fn check_request(&self, frame: &Value) -> Result<(), String> {
        self.check_def(self.envelope_def("request"), frame)?;
        let kind = frame["type"].as_str().unwrap_or_default();
        let def = self
            .request_def(kind)
            .ok_or_else(|| format!("request type {kind:?} is not in spec/v1/commands.json"))?;
        self.check_payload(def, &frame["payload"])
    }

    /// A reply frame answering a `command_type` request: the envelope, then
    /// the payload against the command's response definition.
    pub fn check_reply(&self, command_type: &str, frame: &Value) -> Result<(), String> {
        self.check_def(self.envelope_def("reply"), frame)?;
        let def = self.response_def(command_type).ok_or_else(|| {
            format!("command type {command_type:?} is not in spec/v1/commands.json")
        })?;
        self.check_payload(def, &frame["payload"])
    }

    /// An error frame (envelope and error body, code from the closed list).
    pub fn check_error(&self, frame: &Value) -> Result<(), String> {
        self.check_def(self.envelope_def("error"), frame)
    }

    /// A push frame: the envelope, then the payload against its push type's
    /// definition. A push type missing from the index is an error.
    pub fn check_push(&self, frame: &Value) -> Result<(), String> {
        self.check_def(self.envelope_def("push"), frame)?;
        let kind = frame["type"].as_str().unwrap_or_default();
        let def = self
            .push_def(kind)
            .ok_or_else(|| format!("push type {kind:?} is not in spec/v1/commands.json"))?;
        self.check_payload(def, &frame["payload"])
    }

    /// Payload errors, located in the frame (`/payload/...`).
    fn check_payload(&self, def: &str, payload: &Value) -> Result<(), String> {
        self.check_def_at(def, payload, "/payload")
    }
}
