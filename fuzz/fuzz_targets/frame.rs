//! Frame decoding (SPEC 3.1): `decode_frame` under several limits, then the decoded JSON as a
//! `RepoMessage`. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optimystic_core::wire::RepoMessage;
use optimystic_node::codec::{DEFAULT_CLUSTER_MAX_FRAME_BYTES, DEFAULT_REPO_MAX_FRAME_BYTES, decode_frame};

fuzz_target!(|data: &[u8]| {
    for max in [0, 1, 16, 1024, DEFAULT_CLUSTER_MAX_FRAME_BYTES, DEFAULT_REPO_MAX_FRAME_BYTES, usize::MAX] {
        if let Ok(Some((value, consumed))) = decode_frame(data, max) {
            assert!(consumed <= data.len(), "consumed {consumed} of {} bytes", data.len());
            let _ = RepoMessage::from_value(value);
        }
    }
});
