//! The `chat_template` a merge writes, as mergekit chooses it: `auto` (the template most common among the inputs),
//! one of mergekit's named templates (`alpaca`, `chatml`, `exaone`, `llama3`, `mistral`; their Jinja text is
//! carried as data in `assets/chat_templates/`), or a literal Jinja string. Owns parsing the setting, reading an
//! input model's template, and the choice; `output` writes the result as `chat_template.jinja` (where transformers'
//! `save_pretrained`, and so mergekit, writes it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// mergekit's named templates, by name.
const NAMED: &[(&str, &str)] = &[
    ("alpaca", include_str!("../../assets/chat_templates/alpaca.jinja")),
    ("chatml", include_str!("../../assets/chat_templates/chatml.jinja")),
    ("exaone", include_str!("../../assets/chat_templates/exaone.jinja")),
    ("llama3", include_str!("../../assets/chat_templates/llama3.jinja")),
    ("mistral", include_str!("../../assets/chat_templates/mistral.jinja")),
];

/// The file the chosen template is written to, and the older places a tokenizer may keep one.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
pub const LEGACY_TEMPLATE_FILE: &str = "chat_template.json";

#[derive(Clone, Debug, PartialEq)]
pub enum ChatTemplate {
    /// The template most input models carry (ties: the first in model order).
    Auto,
    /// Jinja text: a named template's or the config's own.
    Text(String),
}

/// Reads a config's `chat_template` value with mergekit's rules: `auto`; a short single-line string without `{`
/// names a template; anything else must look like Jinja (at least 20 characters and a `{`).
pub fn parse(value: &str) -> std::result::Result<ChatTemplate, String> {
    if value == "auto" {
        return Ok(ChatTemplate::Auto);
    }
    if value.len() < 256 && !value.contains('\n') && !value.contains('{') {
        return match NAMED.iter().find(|(name, _)| *name == value) {
            Some((_, text)) => Ok(ChatTemplate::Text(text.to_string())),
            None => Err(format!(
                "chat_template '{value}' is neither 'auto', a named template ({}), nor a Jinja template",
                NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )),
        };
    }
    if value.len() < 20 || !value.contains('{') {
        return Err(format!("chat_template '{value}' is not a Jinja template (too short or no '{{')"));
    }
    Ok(ChatTemplate::Text(value.to_string()))
}

/// The template a model directory carries, as transformers finds it: `chat_template.jinja`, else
/// `chat_template.json`'s `chat_template`, else `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// named templates of which `default` is taken). Surrounding whitespace is trimmed, as mergekit compares them.
pub fn of_model(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join(TEMPLATE_FILE);
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
        return Ok(Some(text.trim().to_string()).filter(|t| !t.is_empty()));
    }
    for file in [LEGACY_TEMPLATE_FILE, "tokenizer_config.json"] {
        let path = dir.join(file);
        let Some(json) = crate::files::read_json_if_exists::<serde_json::Value>(&path)? else { continue };
        let template = match &json["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => {
                named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string)
            }
            _ => None,
        };
        if let Some(t) = template.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// The Jinja text to write. `Auto` takes the template most common among `models` (each directory counted once, in
/// the order given), None when no input carries one. mergekit breaks ties by set order, which varies between runs;
/// graft takes the first model's.
pub fn choose(setting: &ChatTemplate, models: &[PathBuf]) -> Result<Option<String>> {
    match setting {
        ChatTemplate::Text(t) => Ok(Some(t.clone())),
        ChatTemplate::Auto => {
            let mut seen: Vec<&PathBuf> = Vec::new();
            let mut order: Vec<String> = Vec::new();
            let mut count: HashMap<String, usize> = HashMap::new();
            for dir in models {
                if seen.contains(&dir) {
                    continue;
                }
                seen.push(dir);
                if let Some(t) = of_model(dir)? {
                    if !count.contains_key(&t) {
                        order.push(t.clone());
                    }
                    *count.entry(t).or_default() += 1;
                }
            }
            // max_by_key keeps the last maximum; scan in reverse so the first of equals wins.
            Ok(order.iter().rev().max_by_key(|t| count[*t]).cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_literals_and_mistakes() {
        assert_eq!(parse("auto"), Ok(ChatTemplate::Auto));
        let ChatTemplate::Text(chatml) = parse("chatml").unwrap() else { panic!("chatml is named") };
        assert!(chatml.contains("<|im_start|>"));
        let literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
        assert_eq!(parse(literal), Ok(ChatTemplate::Text(literal.to_string())));
        assert!(parse("chatlm").unwrap_err().contains("chatml"), "a typo lists the known names");
        assert!(parse("{{ x }}").is_err(), "shorter than 20 characters");
    }

    #[test]
    fn auto_takes_the_most_common_and_the_first_of_a_tie() {
        let root = std::env::temp_dir().join(format!("graft-chat-template-{}", std::process::id()));
        let dirs: Vec<PathBuf> = (0..4).map(|i| root.join(format!("m{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(dirs[0].join(TEMPLATE_FILE), "{{ 'a' }}\n").unwrap();
        std::fs::write(dirs[1].join("tokenizer_config.json"), r#"{"chat_template": "{{ 'b' }}"}"#).unwrap();
        std::fs::write(
            dirs[2].join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "{{ 't' }}"}, {"name": "default", "template": " {{ 'b' }} "}]}"#,
        )
        .unwrap();
        // dirs[3] has none.
        let auto = |ds: &[PathBuf]| choose(&ChatTemplate::Auto, ds).unwrap();
        assert_eq!(auto(&dirs), Some("{{ 'b' }}".to_string()), "two of three carry 'b'");
        assert_eq!(auto(&[dirs[0].clone(), dirs[1].clone()]), Some("{{ 'a' }}".to_string()), "tie: the first");
        assert_eq!(auto(&[dirs[1].clone(), dirs[0].clone()]), Some("{{ 'b' }}".to_string()), "tie: the first");
        assert_eq!(
            auto(&[dirs[0].clone(), dirs[0].clone(), dirs[1].clone(), dirs[2].clone()]),
            Some("{{ 'b' }}".to_string()),
            "a directory counts once"
        );
        assert_eq!(auto(&dirs[3..]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
