//! The config file: any text is either a spec or a list of problems, each
//! naming the file and a position inside the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use relay::config::file;

fuzz_target!(|text: &str| {
    let path = Path::new("fuzz.toml");
    if let Err(problems) = file::parse(path, text) {
        let shown = problems.to_string();
        assert!(
            shown.contains("fuzz.toml"),
            "a problem without its file: {shown}"
        );
    }
});
