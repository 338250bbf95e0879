//! Recipe parameters: validated against the recipe's own schema before it runs.

use std::collections::BTreeMap;

use super::wit::{ParamKind, ParamSpec, ParamValue};

/// A parameter problem, reported with the recipe's own help text.
#[derive(Debug, thiserror::Error)]
#[error("recipe {recipe}: {message}")]
pub struct ParamError {
    pub recipe: String,
    pub message: String,
}

/// Raw values before validation: from `--config file.toml`, then `--set k=v` (which win).
#[derive(Clone, Debug, Default)]
pub struct RawParams {
    values: BTreeMap<String, RawValue>,
}

#[derive(Clone, Debug)]
enum RawValue {
    /// From `--set`: typed by the schema.
    Text(String),
    /// From TOML: already typed.
    Toml(toml::Value),
}

impl RawParams {
    /// Adds `key=value` pairs from the command line.
    pub fn set(&mut self, pair: &str) -> Result<(), String> {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("--set expects key=value, got {pair:?}"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("--set expects key=value, got {pair:?}"));
        }
        self.values.insert(k.to_string(), RawValue::Text(v.trim().to_string()));
        Ok(())
    }

    /// Reads a TOML file: top-level keys, or a `[params]` table.
    pub fn load_toml(&mut self, text: &str, origin: &str) -> Result<(), String> {
        let doc: toml::Table = text.parse().map_err(|e| format!("{origin}: invalid TOML: {e}"))?;
        let table = match doc.get("params") {
            Some(toml::Value::Table(t)) => t.clone(),
            Some(_) => return Err(format!("{origin}: `params` must be a table")),
            None => doc,
        };
        for (k, v) in table {
            if matches!(v, toml::Value::Table(_) | toml::Value::Array(_) | toml::Value::Datetime(_)) {
                return Err(format!("{origin}: parameter {k} must be a boolean, number or string"));
            }
            self.values.entry(k).or_insert(RawValue::Toml(v));
        }
        Ok(())
    }

    /// The value given for `key` as text (a `--set` value, or a TOML string), before
    /// validation: for the checks made before a recipe is loaded.
    pub fn text(&self, key: &str) -> Option<&str> {
        match self.values.get(key)? {
            RawValue::Text(s) => Some(s),
            RawValue::Toml(toml::Value::String(s)) => Some(s),
            RawValue::Toml(_) => None,
        }
    }

    /// Checks every value against `schema` and fills in defaults.
    pub fn validate(&self, recipe: &str, schema: &[ParamSpec]) -> Result<Vec<(String, ParamValue)>, ParamError> {
        let err = |message: String| ParamError { recipe: recipe.to_string(), message };
        for key in self.values.keys() {
            if !schema.iter().any(|p| &p.name == key) {
                let known: Vec<String> = schema.iter().map(|p| format!("  {} ({}): {}", p.name, kind_name(p.kind), p.help)).collect();
                return Err(err(format!(
                    "unknown parameter {key:?}; this recipe takes:\n{}",
                    if known.is_empty() { "  (no parameters)".to_string() } else { known.join("\n") }
                )));
            }
        }
        schema
            .iter()
            .map(|spec| {
                let value = match self.values.get(&spec.name) {
                    None => spec.default.clone(),
                    Some(raw) => convert(spec, raw).map_err(|m| err(format!("parameter {}: {m}. {}", spec.name, spec.help)))?,
                };
                if spec.kind == ParamKind::Choice
                    && let ParamValue::Text(s) = &value
                    && !spec.allowed.contains(s)
                {
                    return Err(err(format!("parameter {}: {s:?} is not one of {}. {}", spec.name, spec.allowed.join(", "), spec.help)));
                }
                Ok((spec.name.clone(), value))
            })
            .collect()
    }
}

pub fn kind_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Boolean => "boolean",
        ParamKind::Integer => "integer",
        ParamKind::Number => "number",
        ParamKind::Text => "text",
        ParamKind::Choice => "choice",
    }
}

/// Most parameters a recipe may declare (the presets take about twenty).
pub const MAX_PARAMS: usize = 256;
/// Longest parameter name, in bytes.
pub const MAX_PARAM_NAME: usize = 64;
/// Longest help text, text default or allowed value, in bytes.
pub const MAX_PARAM_TEXT: usize = 4096;
/// Most allowed values of one choice.
pub const MAX_CHOICES: usize = 256;

/// Checks that a recipe's own schema is coherent (defaults of the declared kind,
/// choices with a non-empty list containing the default, unique names) and
/// within the caps above, in time linear in its size: the schema comes from an
/// untrusted recipe, and each cap is a refusal rather than host work without bound.
pub fn check_schema(schema: &[ParamSpec]) -> Result<(), String> {
    if schema.len() > MAX_PARAMS {
        return Err(format!("{} parameters; a recipe may declare at most {MAX_PARAMS}", schema.len()));
    }
    let mut names = std::collections::HashSet::with_capacity(schema.len());
    for p in schema {
        let shown = || crate::text::sanitize(&p.name, 60);
        if p.name.len() > MAX_PARAM_NAME {
            return Err(format!("parameter name \"{}\" is {} bytes; at most {MAX_PARAM_NAME} are allowed", shown(), p.name.len()));
        }
        if p.name.is_empty() || !names.insert(p.name.as_str()) {
            return Err(format!("parameter name \"{}\" is empty or repeated", shown()));
        }
        if p.allowed.len() > MAX_CHOICES {
            return Err(format!("parameter {}: {} allowed values; at most {MAX_CHOICES} are allowed", shown(), p.allowed.len()));
        }
        let default_len = if let ParamValue::Text(t) = &p.default { t.len() } else { 0 };
        let longest = p.allowed.iter().map(|a| a.len()).chain([p.help.len(), default_len]).max().unwrap_or(0);
        if longest > MAX_PARAM_TEXT {
            return Err(format!(
                "parameter {}: a help text, default or allowed value of {longest} bytes; at most {MAX_PARAM_TEXT} are allowed",
                shown()
            ));
        }
        let ok = matches!(
            (p.kind, &p.default),
            (ParamKind::Boolean, ParamValue::Boolean(_))
                | (ParamKind::Integer, ParamValue::Integer(_))
                | (ParamKind::Number, ParamValue::Number(_))
                | (ParamKind::Text, ParamValue::Text(_))
                | (ParamKind::Choice, ParamValue::Text(_))
        );
        if !ok {
            return Err(format!("parameter {}: default is not a {}", p.name, kind_name(p.kind)));
        }
        if p.kind == ParamKind::Choice {
            let ParamValue::Text(d) = &p.default else { unreachable!() };
            if !p.allowed.contains(d) {
                return Err(format!("parameter {}: default {d:?} is not among its allowed values", p.name));
            }
        }
    }
    Ok(())
}

fn convert(spec: &ParamSpec, raw: &RawValue) -> Result<ParamValue, String> {
    match (spec.kind, raw) {
        (ParamKind::Boolean, RawValue::Text(s)) => match s.as_str() {
            "true" | "yes" | "on" | "1" => Ok(ParamValue::Boolean(true)),
            "false" | "no" | "off" | "0" => Ok(ParamValue::Boolean(false)),
            _ => Err(format!("{s:?} is not a boolean (true/false)")),
        },
        (ParamKind::Boolean, RawValue::Toml(toml::Value::Boolean(b))) => Ok(ParamValue::Boolean(*b)),
        (ParamKind::Integer, RawValue::Text(s)) => s.parse().map(ParamValue::Integer).map_err(|_| format!("{s:?} is not an integer")),
        (ParamKind::Integer, RawValue::Toml(toml::Value::Integer(i))) => Ok(ParamValue::Integer(*i)),
        (ParamKind::Number, RawValue::Text(s)) => match s.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(ParamValue::Number(n)),
            _ => Err(format!("{s:?} is not a finite number")),
        },
        (ParamKind::Number, RawValue::Toml(toml::Value::Float(f))) if f.is_finite() => Ok(ParamValue::Number(*f)),
        (ParamKind::Number, RawValue::Toml(toml::Value::Integer(i))) => Ok(ParamValue::Number(*i as f64)),
        (ParamKind::Text | ParamKind::Choice, RawValue::Text(s)) => Ok(ParamValue::Text(s.clone())),
        (ParamKind::Text | ParamKind::Choice, RawValue::Toml(toml::Value::String(s))) => Ok(ParamValue::Text(s.clone())),
        (kind, RawValue::Toml(v)) => Err(format!("expected a {}, got {v}", kind_name(kind))),
    }
}

/// `value` as text for reports and metadata.
pub fn value_to_json(v: &ParamValue) -> serde_json::Value {
    match v {
        ParamValue::Boolean(b) => (*b).into(),
        ParamValue::Integer(i) => (*i).into(),
        ParamValue::Number(n) => (*n).into(),
        ParamValue::Text(s) => s.clone().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "format".into(),
                kind: ParamKind::Choice,
                default: ParamValue::Text("fp8".into()),
                allowed: vec!["fp8".into(), "nvfp4".into()],
                help: "Weight format".into(),
            },
            ParamSpec {
                name: "steps".into(),
                kind: ParamKind::Integer,
                default: ParamValue::Integer(20),
                allowed: vec![],
                help: "Steps".into(),
            },
            ParamSpec {
                name: "alpha".into(),
                kind: ParamKind::Number,
                default: ParamValue::Number(0.5),
                allowed: vec![],
                help: "Alpha".into(),
            },
            ParamSpec {
                name: "smooth".into(),
                kind: ParamKind::Boolean,
                default: ParamValue::Boolean(false),
                allowed: vec![],
                help: "Smooth".into(),
            },
        ]
    }

    #[test]
    fn defaults_fill_in_and_set_overrides_toml() {
        let mut raw = RawParams::default();
        raw.set("format=nvfp4").unwrap();
        raw.load_toml("format = \"fp8\"\nsteps = 30\nalpha = 1\n", "p.toml").unwrap();
        let v = raw.validate("r", &schema()).unwrap();
        assert_eq!(v[0].1, ParamValue::Text("nvfp4".into()));
        assert_eq!(v[1].1, ParamValue::Integer(30));
        assert_eq!(v[2].1, ParamValue::Number(1.0));
        assert_eq!(v[3].1, ParamValue::Boolean(false));
    }

    #[test]
    fn errors_carry_the_recipe_help() {
        let mut raw = RawParams::default();
        raw.set("format=int4").unwrap();
        let e = raw.validate("sdxl", &schema()).unwrap_err().to_string();
        assert!(e.contains("sdxl") && e.contains("int4") && e.contains("fp8, nvfp4") && e.contains("Weight format"), "{e}");

        let mut raw = RawParams::default();
        raw.set("stepz=3").unwrap();
        let e = raw.validate("sdxl", &schema()).unwrap_err().to_string();
        assert!(e.contains("unknown parameter \"stepz\"") && e.contains("steps (integer): Steps"), "{e}");

        let mut raw = RawParams::default();
        raw.set("steps=many").unwrap();
        let e = raw.validate("sdxl", &schema()).unwrap_err().to_string();
        assert!(e.contains("not an integer"), "{e}");

        let mut raw = RawParams::default();
        raw.load_toml("[params]\nsmooth = \"yes\"\n", "c.toml").unwrap();
        let e = raw.validate("sdxl", &schema()).unwrap_err().to_string();
        assert!(e.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn malformed_set_and_toml_are_refused() {
        assert!(RawParams::default().set("noequals").is_err());
        assert!(RawParams::default().load_toml("format = [1,2]", "x").is_err());
        assert!(RawParams::default().load_toml("= broken", "x").is_err());
    }

    #[test]
    fn schema_caps_are_refusals() {
        let spec = |name: String| ParamSpec {
            name,
            kind: ParamKind::Integer,
            default: ParamValue::Integer(0),
            allowed: vec![],
            help: String::new(),
        };
        let many: Vec<ParamSpec> = (0..MAX_PARAMS + 1).map(|i| spec(format!("p{i}"))).collect();
        assert!(check_schema(&many).unwrap_err().contains("at most 256"));
        assert!(check_schema(&many[..MAX_PARAMS]).is_ok());
        // 160,000 parameters (the issue's case): refused by the count, at once.
        let huge: Vec<ParamSpec> = (0..160_000).map(|i| spec(format!("p{i}"))).collect();
        assert!(check_schema(&huge).is_err());
        let mut dup = many[..3].to_vec();
        dup[2].name = "p0".into();
        assert!(check_schema(&dup).unwrap_err().contains("repeated"));
        assert!(check_schema(&[spec("n".repeat(65))]).unwrap_err().contains("at most 64"));
        let mut long_help = spec("h".into());
        long_help.help = "x".repeat(MAX_PARAM_TEXT + 1);
        assert!(check_schema(&[long_help]).unwrap_err().contains("at most 4096"));
        let mut choices = schema()[0].clone();
        choices.allowed = (0..MAX_CHOICES + 1).map(|i| format!("c{i}")).collect();
        choices.allowed[0] = "fp8".into();
        assert!(check_schema(&[choices]).unwrap_err().contains("allowed values"));
        let mut long_default = spec("t".into());
        long_default.kind = ParamKind::Text;
        long_default.default = ParamValue::Text("d".repeat(MAX_PARAM_TEXT + 1));
        assert!(check_schema(&[long_default]).is_err());
    }

    #[test]
    fn schema_check_catches_bad_defaults() {
        let mut s = schema();
        assert!(check_schema(&s).is_ok());
        s[1].default = ParamValue::Text("x".into());
        assert!(check_schema(&s).is_err());
        let mut s = schema();
        s[0].default = ParamValue::Text("int4".into());
        assert!(check_schema(&s).is_err());
    }
}
