//! The capture filter front end: libpcap compiles any expression or refuses
//! it with its message; whatever it compiles, relay translates for the
//! kernel or refuses by name, for both link types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::observe::filter::{Filter, LinkType};

fuzz_target!(|text: &str| {
    // libpcap's parser is not reentrant-safe across huge inputs in useful
    // time; real expressions are short.
    if text.len() > 512 {
        return;
    }
    match Filter::parse(text) {
        Ok(filter) => {
            for link in [LinkType::Ethernet, LinkType::Raw] {
                match filter.program(link) {
                    Ok(Some(program)) => assert!(!program.is_empty()),
                    Ok(None) => unreachable!("a parsed expression always has a program"),
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
