//! The allowance trie key, the layout the kernel reads: every key userspace
//! reads back from the map maps to one allowance entry and back to itself.
#![no_main]

use dockwall_common::AllowKey;
use dockwall_userspace::policy::AllowEntry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u32, u16, u8, u8, [u8; 16])| {
    let (prefix_len, port, proto, family, addr) = input;
    let key = AllowKey { port, proto, family, addr };
    if let Some(entry) = AllowEntry::from_key(prefix_len, &key) {
        let (len, again) = entry.key();
        assert_eq!(AllowEntry::from_key(len, &again), Some(entry));
        assert_eq!(len, prefix_len);
    }
});
