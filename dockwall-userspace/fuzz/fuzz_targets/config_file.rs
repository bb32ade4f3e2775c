//! The saved-allowances file: any text either parses or is refused with a
//! `LINE:COLUMN: reason`; what parses survives a write and re-read intact.
#![no_main]

use dockwall_userspace::config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match config::parse(text) {
        Ok(policy) => {
            let written = config::render(&policy).expect("render");
            assert_eq!(config::parse(&written), Ok(policy), "{text:?}");
        }
        Err(reason) => {
            let (line, rest) = reason.split_once(':').expect("LINE:");
            let (col, _) = rest.split_once(':').expect("COLUMN:");
            assert!(line.parse::<usize>().is_ok() && col.parse::<usize>().is_ok(), "{reason}");
        }
    }
});
