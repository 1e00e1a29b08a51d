//! The receive name (HULFT's dynamic file names): a receive profile's
//! `name:` template turns a transfer into the inbox name its file takes.
//! Placeholders: `{file_name}` (the default, the name the sender gave),
//! `{stem}` and `{ext}` (that name before and after its last dot; `{ext}`
//! without the dot, empty when there is none), `{date}` (the receiver's
//! local date, YYYYMMDD), `{transfer_id}` and `{meta.KEY}` (a metadata
//! value, empty when the transfer has none). `{{` and `}}` are literal
//! braces. The result is checked like a name from the network
//! ([`FileName`]); one that breaks the rule fails the transfer
//! (`bad_receive_name`).

use crate::domain::FileName;
use crate::store::ReceiveRow;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    FileName,
    Stem,
    Ext,
    Date,
    TransferId,
    Meta(String),
}

/// A checked `name:` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    parts: Vec<Part>,
}

impl Default for NameTemplate {
    fn default() -> Self {
        NameTemplate {
            parts: vec![Part::FileName],
        }
    }
}

impl NameTemplate {
    /// Parses a template; the error says which placeholder is wrong.
    pub fn parse(template: &str) -> Result<NameTemplate, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                text.push(c);
                rest = &rest[2..];
                continue;
            }
            if c == '}' {
                return Err("a `}` without its `{`: write `}}` for a literal brace".into());
            }
            if c != '{' {
                text.push(c);
                rest = &rest[c.len_utf8()..];
                continue;
            }
            let Some(end) = rest.find('}') else {
                return Err("a `{` without its `}`: write `{{` for a literal brace".into());
            };
            let key = &rest[1..end];
            let part = match key {
                "file_name" => Part::FileName,
                "stem" => Part::Stem,
                "ext" => Part::Ext,
                "date" => Part::Date,
                "transfer_id" => Part::TransferId,
                k => match k.strip_prefix("meta.") {
                    Some(m)
                        if !m.is_empty()
                            && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                    {
                        Part::Meta(m.to_string())
                    }
                    _ => {
                        return Err(format!(
                            "unknown placeholder `{{{k}}}`: use {{file_name}}, {{stem}}, {{ext}}, {{date}}, {{transfer_id}} or {{meta.KEY}}"
                        ));
                    }
                },
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &rest[end + 1..];
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if parts.is_empty() {
            return Err("an empty name".into());
        }
        Ok(NameTemplate { parts })
    }

    /// True for the default, `{file_name}`.
    pub fn is_default(&self) -> bool {
        self.parts == [Part::FileName]
    }

    /// The inbox name of `row`'s file on `date` (YYYYMMDD), checked like a
    /// name from the network; the error is the (escaped) name it made.
    pub fn render(&self, row: &ReceiveRow, date: &str) -> Result<FileName, String> {
        let name = row.file_name.as_str();
        let (stem, ext) = match name.rfind('.') {
            Some(i) if i > 0 => (&name[..i], &name[i + 1..]),
            _ => (name, ""),
        };
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::FileName => out.push_str(name),
                Part::Stem => out.push_str(stem),
                Part::Ext => out.push_str(ext),
                Part::Date => out.push_str(date),
                Part::TransferId => out.push_str(row.transfer_id.as_str()),
                Part::Meta(k) => {
                    let v = row
                        .meta
                        .iter()
                        .find(|(key, _)| key.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.as_str());
                    out.push_str(v.unwrap_or_default());
                }
            }
        }
        FileName::parse(&out).map_err(|_| crate::domain::escape_name(&out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{FileId, NodeName, TransferId};
    use crate::store::{Status, Transfer};

    fn row(name: &str, meta: &[(&str, &str)]) -> ReceiveRow {
        let mut t = Transfer::begin(
            TransferId::parse("0190f6c4-0000-7000-8000-000000000001").unwrap(),
            NodeName::parse("alpha").unwrap(),
            FileId::parse("SALES").unwrap(),
            name,
            (1, 1),
            Status::Receiving,
        );
        t.meta = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ReceiveRow::new(t)
    }

    #[test]
    fn placeholders() {
        let r = row("sales.2026.csv", &[("branch", "tokyo")]);
        let t = NameTemplate::parse("{meta.branch}_{stem}_{date}.{ext}").unwrap();
        assert_eq!(
            t.render(&r, "20261202").unwrap(),
            "tokyo_sales.2026_20261202.csv"
        );
        let t = NameTemplate::parse("{{x}}{transfer_id}-{file_name}").unwrap();
        assert_eq!(
            t.render(&r, "d").unwrap(),
            "{x}0190f6c4-0000-7000-8000-000000000001-sales.2026.csv"
        );
        assert!(NameTemplate::parse("{file_name}").unwrap().is_default());
        let noext = row("README", &[]);
        let t = NameTemplate::parse("{stem}.{ext}x").unwrap();
        assert_eq!(t.render(&noext, "d").unwrap(), "README.x");
    }

    #[test]
    fn bad_templates_and_unsafe_results_are_refused() {
        for bad in ["{nope}", "{meta.}", "{meta.a-b}", "{file_name", "a}", ""] {
            assert!(NameTemplate::parse(bad).is_err(), "{bad}");
        }
        let t = NameTemplate::parse("{meta.dir}").unwrap();
        for v in ["../x", "-rf", "", "a/b", ".hidden", "a\u{202e}b"] {
            let r = row("f.csv", &[("dir", v)]);
            assert!(t.render(&r, "d").is_err(), "{v:?}");
        }
    }
}
