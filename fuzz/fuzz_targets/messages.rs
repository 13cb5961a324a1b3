//! Message parsing: `RepoMessage::from_slice`, `ClusterRecord::from_json` + `verify`, and
//! `SyncRequest` via serde_json. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optimystic_core::record::ClusterRecord;
use optimystic_core::sync::SyncRequest;
use optimystic_core::wire::RepoMessage;

fuzz_target!(|data: &[u8]| {
    let _ = RepoMessage::from_slice(data);
    let _ = serde_json::from_slice::<SyncRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(record) = ClusterRecord::from_json(text) {
            let _ = record.verify(None);
            let _ = record.to_value();
        }
    }
});
