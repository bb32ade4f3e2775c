//! Sources, ports and container specs as an admin types them: parsing never
//! panics, and whatever parses prints back to the same value.
#![no_main]

use dockwall_userspace::policy::{ContainerSpec, PortProto, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(source) = text.parse::<Source>() {
        assert_eq!(source.to_string().parse::<Source>(), Ok(source), "{text:?}");
    }
    if let Ok(port) = text.parse::<PortProto>() {
        assert!(port.port != 0, "{text:?}");
        assert_eq!(port.to_string().parse::<PortProto>(), Ok(port), "{text:?}");
    }
    if let Ok(spec) = text.parse::<ContainerSpec>() {
        assert_eq!(spec.to_string().parse::<ContainerSpec>(), Ok(spec.clone()), "{text:?}");
    }
});
