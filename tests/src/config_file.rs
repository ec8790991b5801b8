//! Config files for `relay run -c`, written by tests: routes from a list.

use std::path::Path;

use anyhow::{Context, Result};

/// The `[[route]]` entries of `(name, listen port on 127.0.0.1, target)`
/// routes, each with the `extra` keys (TOML lines).
pub fn routes_toml(routes: &[(&str, u16, String)], extra: &str) -> String {
    let mut text = String::new();
    for (name, port, target) in routes {
        text.push_str(&format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\ntarget = \"{target}\"\n{extra}\n"
        ));
    }
    text
}

/// Writes a config file of [`routes_toml`] routes to `path`.
pub fn write_routes(path: &Path, routes: &[(&str, u16, String)], extra: &str) -> Result<()> {
    std::fs::write(path, routes_toml(routes, extra))
        .with_context(|| format!("writing {}", path.display()))
}
