//! Which containers `relay observe containers` takes: `--select` rules
//! (`name=web-*`, `label=com.docker.compose.project=shop`, `label=KEY`,
//! `image=nginx*`), every one of which must match; no rule takes every
//! running container.
//!
//! Globs are the shell's `*` (any run of characters, `/` included) and
//! `?` (one character); everything else matches itself. Written here
//! rather than taken from a crate: matching a name against two wildcards
//! is a dozen lines, and a glob crate would bring path semantics (`*` not
//! crossing `/`) that image names must not have.

use std::fmt;
use std::str::FromStr;

use super::Container;

/// A shell-style pattern with `*` and `?`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: impl Into<String>) -> Self {
        Glob(pattern.into())
    }

    /// Does `text` match the whole pattern?
    pub fn matches(&self, text: &str) -> bool {
        let (pattern, text): (Vec<char>, Vec<char>) =
            (self.0.chars().collect(), text.chars().collect());
        // Iterative wildcard matching with one backtrack point (the last `*`).
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, t));
                    p += 1;
                }
                Some('?') => {
                    p += 1;
                    t += 1;
                }
                Some(c) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|c| *c == '*')
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One `--select` rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The container's name (without Docker's leading `/`).
    Name(Glob),
    /// A label that is present (`value: None`) or whose value matches.
    Label { key: String, value: Option<Glob> },
    /// The image as the container was created from it (`nginx:1.25`,
    /// `registry.example/app@sha256:...`), as `docker ps` shows it.
    Image(Glob),
}

/// Why a `--select` rule does not parse; names the text and the forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid selection {input:?}: {reason}; expected name=GLOB, label=KEY, label=KEY=GLOB or image=GLOB"
)]
pub struct ParseRuleError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Rule {
    type Err = ParseRuleError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ParseRuleError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let Some((kind, value)) = input.split_once('=') else {
            return Err(fail("no `=`"));
        };
        if value.is_empty() {
            return Err(fail("nothing after `=`"));
        }
        match kind {
            "name" => Ok(Rule::Name(Glob::new(value.trim_start_matches('/')))),
            "image" => Ok(Rule::Image(Glob::new(value))),
            "label" => match value.split_once('=') {
                Some(("", _)) => Err(fail("empty label key")),
                Some((key, glob)) => Ok(Rule::Label {
                    key: key.to_string(),
                    value: Some(Glob::new(glob)),
                }),
                None => Ok(Rule::Label {
                    key: value.to_string(),
                    value: None,
                }),
            },
            other => Err(fail(&format!("unknown kind {other:?}"))),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Name(glob) => write!(f, "name={glob}"),
            Rule::Image(glob) => write!(f, "image={glob}"),
            Rule::Label { key, value: None } => write!(f, "label={key}"),
            Rule::Label {
                key,
                value: Some(glob),
            } => write!(f, "label={key}={glob}"),
        }
    }
}

impl Rule {
    pub fn matches(&self, container: &Container) -> bool {
        match self {
            Rule::Name(glob) => glob.matches(&container.name),
            Rule::Image(glob) => glob.matches(&container.image),
            Rule::Label { key, value } => match (container.labels.get(key), value) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(have), Some(glob)) => glob.matches(have),
            },
        }
    }
}

/// Every rule must match; no rule matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selection {
    pub rules: Vec<Rule>,
}

impl Selection {
    /// Every running container.
    pub fn all() -> Self {
        Selection::default()
    }

    pub fn matches(&self, container: &Container) -> bool {
        self.rules.iter().all(|rule| rule.matches(container))
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules.is_empty() {
            return f.write_str("all");
        }
        let rules: Vec<String> = self.rules.iter().map(Rule::to_string).collect();
        f.write_str(&rules.join(" and "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::discover::Network;

    fn container(name: &str, image: &str, labels: &[(&str, &str)]) -> Container {
        Container {
            key: format!("id-{name}"),
            source: crate::observe::discover::Source::Docker,
            id: format!("id-{name}"),
            name: name.into(),
            image: image.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pid: 1,
            netns: 0,
            ns_path: None,
            network: Network::Own,
        }
    }

    #[test]
    fn globs_match_whole_names_with_star_and_question_mark() {
        for (pattern, text, expected) in [
            ("web-*", "web-1", true),
            ("web-*", "web-", true),
            ("web-*", "api-1", false),
            ("web-*", "xweb-1", false),
            ("*-db", "shop-db", true),
            ("*", "", true),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "a-b-b-d", false),
            ("web-?", "web-1", true),
            ("web-?", "web-10", false),
            ("nginx*", "nginx:1.25", true),
            ("*/app:*", "registry.example/team/app:2", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(
                Glob::new(pattern).matches(text),
                expected,
                "{pattern:?} against {text:?}"
            );
        }
    }

    #[test]
    fn rules_parse_and_print_back() {
        for text in [
            "name=web-*",
            "image=nginx*",
            "label=com.docker.compose.project=shop",
            "label=tier",
            "label=a=b=c",
        ] {
            let rule: Rule = text.parse().expect("a valid rule");
            assert_eq!(rule.to_string(), text);
        }
        assert_eq!(
            "label=a=b=c".parse::<Rule>().ok(),
            Some(Rule::Label {
                key: "a".into(),
                value: Some(Glob::new("b=c"))
            })
        );
    }

    #[test]
    fn bad_rules_name_the_input_and_the_forms() {
        for (input, needle) in [
            ("web-*", "no `=`"),
            ("name=", "nothing after"),
            ("label==x", "empty label key"),
            ("pod=x", "unknown kind \"pod\""),
        ] {
            let err = input.parse::<Rule>().expect_err("a bad rule").to_string();
            assert!(err.contains(&format!("{input:?}")), "{err}");
            assert!(err.contains(needle), "{input}: {err}");
            assert!(err.contains("name=GLOB"), "{err}");
        }
    }

    #[test]
    fn every_rule_must_match() {
        let web = container(
            "web-1",
            "nginx:1.25",
            &[("com.docker.compose.project", "shop")],
        );
        let api = container(
            "api-1",
            "nginx:1.25",
            &[("com.docker.compose.project", "blog")],
        );
        let select = |rules: &[&str]| Selection {
            rules: rules.iter().map(|r| r.parse().expect("valid")).collect(),
        };
        assert!(Selection::all().matches(&web) && Selection::all().matches(&api));
        let shop_nginx = select(&["image=nginx*", "label=com.docker.compose.project=shop"]);
        assert!(shop_nginx.matches(&web));
        assert!(!shop_nginx.matches(&api));
        assert!(select(&["label=com.docker.compose.project"]).matches(&api));
        assert!(!select(&["label=tier"]).matches(&api));
        assert!(!select(&["name=web-*", "image=redis*"]).matches(&web));
        assert_eq!(
            shop_nginx.to_string(),
            "image=nginx* and label=com.docker.compose.project=shop"
        );
    }
}
