//! The address grammar, both forms: any text either parses or is refused
//! with an error that names the input; the pair check never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::addr;

fuzz_target!(|text: &str| {
    let (first, second) = text.split_once('\n').unwrap_or((text, ""));
    for one in [first, second] {
        if let Err(e) = addr::parse_listen(one) {
            assert!(!e.to_string().is_empty());
        }
        if let Err(e) = addr::parse_target(one) {
            assert!(!e.to_string().is_empty());
        }
    }
    if let Ok((listen, target)) = addr::parse_pair(first, second) {
        let _ = addr::check_route(&listen, &target);
    }
});
