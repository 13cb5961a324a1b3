//! Bad input: malformed JSON, unknown operations, wrong operation counts, invalid transforms, wrong
//! types and bad ids in every wire type give typed errors and never panic; invalid transforms fed
//! through `StorageRepo` change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fmt::Debug;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use common::MiniStorage;
use optimystic_core::model::{
    BlockGetResult, BlockGets, BlockTrxRef, BlockTrxState, CommitRequest, CommitResult, CommitSuccess, GetBlockResults,
    PendPolicy, PendRequest, PendResult, PendSuccess, StaleFailure, TrxBlocks, TrxContext, TrxTransforms,
};
use optimystic_core::wire::{ErrorBody, ErrorEnvelope, RepoMessage, RepoOperation, WireError, decode_response};
use optimystic_core::{
    Block, BlockHeader, BlockId, BlockOperation, ErrorCode, MessageOptions, Repo, RepoError, StorageRepo, Transform,
    Transforms, TrxId, TrxRev,
};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

// =============================================================================================
// Valid examples of every wire type.

fn header() -> Value {
    json!({"id": "a", "type": "t", "collectionId": "c"})
}
fn block() -> Value {
    json!({"header": header(), "n": 1, "items": [1, {"x": 2}]})
}
fn op() -> Value {
    json!(["items", 0, 1, [2, {"y": null}]])
}
fn transform() -> Value {
    json!({"insert": block(), "updates": [op()], "delete": false})
}
fn transforms() -> Value {
    json!({"inserts": {"a": block()}, "updates": {"a": [op()]}, "deletes": ["a"]})
}
fn trx_rev() -> Value {
    json!({"trxId": "t", "rev": 1})
}
fn context() -> Value {
    json!({"committed": [trx_rev()], "rev": 2, "trxId": "t"})
}
fn trx_blocks() -> Value {
    json!({"trxId": "t", "blockIds": ["a"]})
}
fn gets() -> Value {
    json!({"blockIds": ["a"], "context": context()})
}
fn pend() -> Value {
    json!({"trxId": "t", "rev": 1, "transforms": transforms(), "policy": "c"})
}
fn commit() -> Value {
    json!({"trxId": "t", "blockIds": ["a"], "rev": 1, "tailId": "a", "headerId": "a"})
}
fn trx_ref() -> Value {
    json!({"blockId": "a", "trxId": "t", "transform": transform()})
}
fn trx_transforms() -> Value {
    json!({"trxId": "t", "rev": 1, "transforms": transforms()})
}
fn pend_success() -> Value {
    json!({"success": true, "pending": [trx_ref()], "blockIds": ["a"]})
}
fn stale() -> Value {
    json!({"success": false, "reason": "r", "missing": [trx_transforms()], "pending": [trx_ref()]})
}
fn state() -> Value {
    json!({"latest": trx_rev(), "pendings": ["t"]})
}
fn get_result() -> Value {
    json!({"block": block(), "state": state()})
}
fn envelope() -> Value {
    json!({"error": {"code": "bad-request", "message": "m"}})
}
fn message(op: &str, body: Value) -> Value {
    json!({"operations": [{op: body}], "expiration": 1})
}

// =============================================================================================
// Schemas: which paths of an example are free JSON, may be omitted, may be null, or hold ids.

#[derive(Clone, Debug, Default)]
struct Schema {
    /// Prefixes under which any JSON is accepted.
    free: Vec<String>,
    /// Fields that may be absent (`Option` or `#[serde(default)]`).
    may_omit: Vec<String>,
    /// Fields that may be `null` (`Option`).
    null_ok: Vec<String>,
    /// Block ids (1..=256 bytes) and transaction ids (1..=128 bytes).
    block_ids: Vec<String>,
    trx_ids: Vec<String>,
    /// Strings that must be one of a fixed set (enums, bool literals aside).
    enums: Vec<String>,
}

impl Schema {
    fn free(mut self, p: &str) -> Self {
        self.free.push(p.into());
        self
    }
    fn option(mut self, p: &str) -> Self {
        self.may_omit.push(p.into());
        self.null_ok.push(p.into());
        self
    }
    fn defaulted(mut self, p: &str) -> Self {
        self.may_omit.push(p.into());
        self
    }
    /// A map whose entries may be removed.
    fn map(mut self, p: &str) -> Self {
        self.may_omit.push(format!("{p}/*"));
        self
    }
    fn block_id(mut self, p: &str) -> Self {
        self.block_ids.push(p.into());
        self
    }
    fn trx_id(mut self, p: &str) -> Self {
        self.trx_ids.push(p.into());
        self
    }
    fn enumeration(mut self, p: &str) -> Self {
        self.enums.push(p.into());
        self
    }
    /// Adds `inner`'s rules under `prefix`.
    fn nest(mut self, prefix: &str, inner: Schema) -> Self {
        let add = |dst: &mut Vec<String>, src: Vec<String>| dst.extend(src.into_iter().map(|p| format!("{prefix}{p}")));
        add(&mut self.free, inner.free);
        add(&mut self.may_omit, inner.may_omit);
        add(&mut self.null_ok, inner.null_ok);
        add(&mut self.block_ids, inner.block_ids);
        add(&mut self.trx_ids, inner.trx_ids);
        add(&mut self.enums, inner.enums);
        self
    }
}

fn s_header() -> Schema {
    Schema::default().block_id("/id")
}
fn s_block() -> Schema {
    Schema::default().nest("/header", s_header()).free("/n").free("/items")
}
fn s_op() -> Schema {
    Schema::default().free("/3")
}
fn s_transform() -> Schema {
    Schema::default()
        .option("/insert")
        .option("/updates")
        .option("/delete")
        .nest("/insert", s_block())
        .nest("/updates/*", s_op())
}
fn s_transforms() -> Schema {
    Schema::default()
        .defaulted("/inserts")
        .defaulted("/updates")
        .defaulted("/deletes")
        .map("/inserts")
        .map("/updates")
        .nest("/inserts/*", s_block())
        .nest("/updates/*/*", s_op())
        .block_id("/deletes/*")
}
fn s_trx_rev() -> Schema {
    Schema::default().trx_id("/trxId")
}
fn s_context() -> Schema {
    Schema::default().defaulted("/committed").option("/trxId").trx_id("/trxId").nest("/committed/*", s_trx_rev())
}
fn s_trx_blocks() -> Schema {
    Schema::default().trx_id("/trxId").block_id("/blockIds/*")
}
fn s_gets() -> Schema {
    Schema::default().block_id("/blockIds/*").option("/context").nest("/context", s_context())
}
fn s_pend() -> Schema {
    Schema::default().trx_id("/trxId").option("/rev").nest("/transforms", s_transforms()).enumeration("/policy")
}
fn s_commit() -> Schema {
    Schema::default()
        .trx_id("/trxId")
        .block_id("/blockIds/*")
        .block_id("/tailId")
        .block_id("/headerId")
        .option("/headerId")
}
fn s_trx_ref() -> Schema {
    Schema::default().block_id("/blockId").trx_id("/trxId").option("/transform").nest("/transform", s_transform())
}
fn s_trx_transforms() -> Schema {
    Schema::default().trx_id("/trxId").nest("/transforms", s_transforms())
}
fn s_pend_success() -> Schema {
    Schema::default().defaulted("/pending").nest("/pending/*", s_trx_ref()).block_id("/blockIds/*")
}
fn s_stale() -> Schema {
    Schema::default()
        .option("/reason")
        .option("/missing")
        .option("/pending")
        .nest("/missing/*", s_trx_transforms())
        .nest("/pending/*", s_trx_ref())
}
fn s_state() -> Schema {
    Schema::default().option("/latest").defaulted("/pendings").nest("/latest", s_trx_rev()).trx_id("/pendings/*")
}
fn s_get_result() -> Schema {
    Schema::default().option("/block").nest("/block", s_block()).nest("/state", s_state())
}
fn s_envelope() -> Schema {
    Schema::default()
}
fn s_message(op: &str, inner: Schema) -> Schema {
    Schema::default().nest(&format!("/operations/*/{op}"), inner)
}

// =============================================================================================
// The mutation checker.

type Path = Vec<String>;

fn paths(value: &Value, prefix: &mut Path, out: &mut Vec<Path>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(k.clone());
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(i.to_string());
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn pointer(path: &Path) -> String {
    path.iter().map(|s| format!("/{s}")).collect()
}

fn matches(pattern: &str, path: &Path, prefix_ok: bool) -> bool {
    let segs: Vec<&str> = pattern.split('/').skip(1).collect();
    if segs.len() > path.len() || (!prefix_ok && segs.len() != path.len()) {
        return false;
    }
    segs.iter().zip(path).all(|(s, p)| *s == "*" || s == p)
}

fn any_match(patterns: &[String], path: &Path, prefix_ok: bool) -> bool {
    patterns.iter().any(|p| matches(p, path, prefix_ok))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "u64",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn replacements() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(7),
        json!(-1),
        json!(1.5),
        json!(1e20),
        json!("s"),
        json!([]),
        json!([1]),
        json!({}),
        json!({"k": 1}),
    ]
}

/// Parses `value` as `T` (from the value and from its text), asserting it never panics.
fn parse<T: DeserializeOwned + Debug>(value: &Value) -> Result<T, String> {
    let text = value.to_string();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let a = serde_json::from_value::<T>(value.clone()).map_err(|e| e.to_string());
        let b = serde_json::from_str::<T>(&text).map_err(|e| e.to_string());
        (a, b)
    }));
    let (a, b) = outcome.unwrap_or_else(|_| panic!("parsing {text} panicked"));
    assert_eq!(a.is_ok(), b.is_ok(), "from_value and from_str disagree on {text}: {a:?} / {b:?}");
    a
}

fn set_at(root: &mut Value, path: &Path, new: Value) {
    let target = root.pointer_mut(&pointer(path)).unwrap();
    *target = new;
}

fn remove_at(root: &mut Value, path: &Path) -> bool {
    let Some((last, parent)) = path.split_last() else { return false };
    match root.pointer_mut(&pointer(&parent.to_vec())) {
        Some(Value::Object(map)) => map.shift_remove(last).is_some(),
        _ => false,
    }
}

/// Mutates every position of a valid example of `T` and checks each result against the schema:
/// a wrong type, a missing required field, a bad id or a bad enum value is an error; free JSON is
/// accepted; nothing panics. Returns the number of mutations tried.
fn check_type<T: DeserializeOwned + Debug>(name: &str, example: Value, schema: &Schema) -> usize {
    parse::<T>(&example).unwrap_or_else(|e| panic!("{name}: the valid example must parse: {e}\n{example}"));
    let mut all = Vec::new();
    paths(&example, &mut Vec::new(), &mut all);
    let mut tried = 0;
    for path in &all {
        let original = example.pointer(&pointer(path)).unwrap().clone();
        let free = any_match(&schema.free, path, true);
        // Wrong types.
        for new in replacements() {
            let same_type = json_type(&new) == json_type(&original)
                || (json_type(&original) == "number" && matches!(json_type(&new), "u64" | "number"));
            if same_type {
                continue;
            }
            let mut mutated = example.clone();
            set_at(&mut mutated, path, new.clone());
            let result = parse::<T>(&mutated);
            tried += 1;
            let allowed = free
                || (new.is_null() && any_match(&schema.null_ok, path, false))
                // serde's derived `Deserialize` also accepts a struct in positional array form
                // (`["t", 1]` for a TrxRev); structs with a flattened field (Block, BlockHeader)
                // do not. The values inside are still type-checked.
                || (json_type(&original) == "object" && new.is_array())
                // A u64 given as another non-negative integer form is the same type.
                || (json_type(&original) == "u64" && new.as_u64().is_some());
            if !allowed {
                assert!(result.is_err(), "{name}: {} = {new} should be refused, parsed as {result:?}", pointer(path));
            }
        }
        // Missing fields.
        let mut removed = example.clone();
        if !path.is_empty() && remove_at(&mut removed, path) {
            tried += 1;
            let result = parse::<T>(&removed);
            if !free && !any_match(&schema.may_omit, path, false) {
                assert!(result.is_err(), "{name}: without {} should be refused, parsed as {result:?}", pointer(path));
            }
        }
        // Bad ids.
        let limit = if any_match(&schema.block_ids, path, false) {
            Some(256)
        } else if any_match(&schema.trx_ids, path, false) {
            Some(128)
        } else {
            None
        };
        if let Some(limit) = limit {
            for (id, ok) in [
                (String::new(), false),
                ("x".repeat(limit), true),
                ("x".repeat(limit + 1), false),
                (format!("{}é", "x".repeat(limit - 1)), false),
                ("é".repeat(limit / 2), true),
                ("\u{0}/../".into(), true),
            ] {
                let mut mutated = example.clone();
                set_at(&mut mutated, path, json!(id));
                tried += 1;
                let result = parse::<T>(&mutated);
                assert_eq!(result.is_ok(), ok, "{name}: id of {} bytes at {}: {result:?}", id.len(), pointer(path));
            }
        }
        if any_match(&schema.enums, path, false) {
            for bad in ["", "C", "continue", "x"] {
                let mut mutated = example.clone();
                set_at(&mut mutated, path, json!(bad));
                tried += 1;
                assert!(parse::<T>(&mutated).is_err(), "{name}: {bad:?} at {} should be refused", pointer(path));
            }
        }
    }
    tried
}

/// Renames a map key (a block id) to bad ids: refused.
fn check_bad_keys<T: DeserializeOwned + Debug>(name: &str, example: Value, map_path: &str) {
    for bad in [String::new(), "x".repeat(257)] {
        let mut mutated = example.clone();
        let Some(Value::Object(map)) = mutated.pointer_mut(map_path) else { panic!("{name}: no map at {map_path}") };
        let entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
        for (_, v) in entries {
            map.insert(bad.clone(), v);
        }
        assert!(parse::<T>(&mutated).is_err(), "{name}: key of {} bytes at {map_path} should be refused", bad.len());
    }
}

#[test]
fn every_wire_type_refuses_wrong_types_missing_fields_and_bad_ids() {
    let mut tried = 0;
    tried += check_type::<BlockHeader>("BlockHeader", header(), &s_header());
    tried += check_type::<Block>("Block", block(), &s_block());
    tried += check_type::<BlockOperation>("BlockOperation", op(), &s_op());
    tried += check_type::<Transform>("Transform", transform(), &s_transform());
    tried += check_type::<Transforms>("Transforms", transforms(), &s_transforms());
    tried += check_type::<TrxRev>("TrxRev", trx_rev(), &s_trx_rev());
    tried += check_type::<TrxContext>("TrxContext", context(), &s_context());
    tried += check_type::<TrxBlocks>("TrxBlocks", trx_blocks(), &s_trx_blocks());
    tried += check_type::<BlockGets>("BlockGets", gets(), &s_gets());
    tried += check_type::<PendRequest>("PendRequest", pend(), &s_pend());
    tried += check_type::<CommitRequest>("CommitRequest", commit(), &s_commit());
    tried += check_type::<BlockTrxRef>("BlockTrxRef", trx_ref(), &s_trx_ref());
    tried += check_type::<TrxTransforms>("TrxTransforms", trx_transforms(), &s_trx_transforms());
    tried += check_type::<PendSuccess>("PendSuccess", pend_success(), &s_pend_success());
    tried += check_type::<StaleFailure>("StaleFailure", stale(), &s_stale());
    tried += check_type::<PendResult>("PendResult (success)", pend_success(), &s_pend_success());
    tried += check_type::<PendResult>("PendResult (stale)", stale(), &s_stale());
    tried += check_type::<CommitResult>("CommitResult (success)", json!({"success": true}), &Schema::default());
    tried += check_type::<CommitResult>("CommitResult (stale)", stale(), &s_stale());
    tried += check_type::<CommitSuccess>("CommitSuccess", json!({"success": true}), &Schema::default());
    tried += check_type::<BlockTrxState>("BlockTrxState", state(), &s_state());
    tried += check_type::<BlockGetResult>("BlockGetResult", get_result(), &s_get_result());
    tried += check_type::<GetBlockResults>(
        "GetBlockResults",
        json!({"a": get_result()}),
        &Schema::default().map("").nest("/*", s_get_result()),
    );
    tried += check_type::<ErrorEnvelope>("ErrorEnvelope", envelope(), &s_envelope());
    tried += check_type::<ErrorBody>("ErrorBody", json!({"code": "x", "message": "m"}), &Schema::default());
    tried += check_type::<PendPolicy>("PendPolicy", json!("r"), &Schema::default().enumeration(""));
    tried += check_type::<RepoMessage>("RepoMessage get", message("get", gets()), &s_message("get", s_gets()));
    tried += check_type::<RepoMessage>("RepoMessage pend", message("pend", pend()), &s_message("pend", s_pend()));
    tried += check_type::<RepoMessage>(
        "RepoMessage cancel",
        message("cancel", json!({"trxRef": trx_blocks()})),
        &s_message("cancel", Schema::default().nest("/trxRef", s_trx_blocks())),
    );
    tried +=
        check_type::<RepoMessage>("RepoMessage commit", message("commit", commit()), &s_message("commit", s_commit()));

    check_bad_keys::<Transforms>("Transforms inserts", transforms(), "/inserts");
    check_bad_keys::<Transforms>("Transforms updates", transforms(), "/updates");
    check_bad_keys::<GetBlockResults>("GetBlockResults", json!({"a": get_result()}), "");
    check_bad_keys::<RepoMessage>(
        "RepoMessage pend inserts",
        message("pend", pend()),
        "/operations/0/pend/transforms/inserts",
    );
    assert!(tried > 1000, "the checker tried {tried} mutations");
}

/// Every mutated message fails through `RepoMessage::from_slice` as `WireError::Json`.
#[test]
fn from_slice_gives_wire_errors() {
    let mut all = Vec::new();
    let example = message("pend", pend());
    paths(&example, &mut Vec::new(), &mut all);
    for path in all.iter().filter(|p| !p.is_empty()) {
        let mut mutated = example.clone();
        set_at(&mut mutated, path, json!({"wrong": [true]}));
        let bytes = serde_json::to_vec(&mutated).unwrap();
        match RepoMessage::from_slice(&bytes) {
            Ok(_) | Err(WireError::Json(_)) => {}
            Err(other) => panic!("{}: unexpected {other:?}", pointer(path)),
        }
    }
}

// =============================================================================================
// Malformed messages.

fn expect_json_error(bytes: &[u8]) {
    let outcome = catch_unwind(|| RepoMessage::from_slice(bytes));
    match outcome {
        Ok(Err(WireError::Json(_))) => {}
        Ok(other) => panic!("{:?}: expected WireError::Json, got {other:?}", String::from_utf8_lossy(bytes)),
        Err(_) => panic!("{:?}: from_slice panicked", String::from_utf8_lossy(bytes)),
    }
}

#[test]
fn malformed_json_is_a_wire_error() {
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!("{{\"operations\":{}1{}}}", "[".repeat(5000), "]".repeat(5000));
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b" ".to_vec(),
        b"{".to_vec(),
        b"}".to_vec(),
        b"null".to_vec(),
        b"true".to_vec(),
        b"1".to_vec(),
        b"[]".to_vec(),
        b"\"text\"".to_vec(),
        b"{}".to_vec(),
        b"{\"operations\": }".to_vec(),
        b"{\"operations\": [], \"expiration\": 1,}".to_vec(),
        b"{'operations': [], 'expiration': 1}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": 1} trailing".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": 1}{}".to_vec(),
        b"\xff\xfe\x00".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"\xff\"]}}], \"expiration\": 1}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"\\ud800\"]}}], \"expiration\": 1}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}]}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": -1}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": 1.5}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": 1e400}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": 18446744073709551616}".to_vec(),
        b"{\"operations\": [{\"get\": {\"blockIds\": [\"a\"]}}], \"expiration\": \"1\"}".to_vec(),
        b"{\"operations\": {\"get\": {\"blockIds\": [\"a\"]}}, \"expiration\": 1}".to_vec(),
        b"{\"operations\": [{\"pend\": {\"trxId\": \"t\", \"policy\": \"c\", \"transforms\": {\"updates\": {\"a\": [[\"items\", 18446744073709551616, 0, []]]}}}}], \"expiration\": 1}".to_vec(),
        deep_array.into_bytes(),
        deep_object.into_bytes(),
    ];
    for bytes in cases {
        expect_json_error(&bytes);
    }
}

#[test]
fn unknown_operations_are_wire_errors() {
    let ops = [
        json!({"foo": {}}),
        json!({"Get": gets()}),
        json!({"GET": gets()}),
        json!({"get": gets(), "pend": pend()}),
        json!({}),
        json!("get"),
        json!(null),
        json!([gets()]),
        json!({"cancel": trx_blocks()}),
        json!({"cancel": {"trxRef": trx_blocks(), "other": 1}}),
        json!({"pend": gets()}),
        json!({"commit": pend()}),
        json!({"get": null}),
    ];
    for op in ops {
        let bytes = serde_json::to_vec(&json!({"operations": [op], "expiration": 1})).unwrap();
        expect_json_error(&bytes);
        let value = json!({"operations": [op], "expiration": 1});
        assert!(matches!(RepoMessage::from_value(value), Err(WireError::Json(_))), "{op}");
    }
}

#[test]
fn zero_or_two_operations_are_refused() {
    let get = json!({"get": gets()});
    for (ops, n) in [(json!([]), 0), (json!([get, get]), 2), (json!([get, get, get]), 3)] {
        let value = json!({"operations": ops, "expiration": 1});
        let bytes = serde_json::to_vec(&value).unwrap();
        match RepoMessage::from_slice(&bytes) {
            Err(WireError::OperationCount(got)) => assert_eq!(got, n),
            other => panic!("{n} operations: expected OperationCount, got {other:?}"),
        }
        assert!(matches!(RepoMessage::from_value(value), Err(WireError::OperationCount(_))));
        // Built in code, the accessors refuse too.
        let message = RepoMessage { operations: Vec::new(), expiration: 1 };
        assert!(matches!(message.operation(), Err(WireError::OperationCount(0))));
        assert!(matches!(message.into_operation(), Err(WireError::OperationCount(0))));
    }
    let error: RepoError = WireError::OperationCount(2).into();
    assert_eq!(error.code(), ErrorCode::BadRequest);
}

#[test]
fn invalid_transform_shapes_are_refused_at_parse() {
    let bad_ops = [
        json!(["items", 0, 1]),
        json!(["items", 0, 1, [], 5]),
        json!(["items", -1, 0, []]),
        json!(["items", 0, -1, []]),
        json!(["items", 1.5, 0, []]),
        json!(["items", "0", 0, []]),
        json!([1, 0, 0, []]),
        json!({"entity": "items"}),
        json!("items"),
        json!([]),
    ];
    for bad in bad_ops {
        let t = json!({"updates": {"a": [bad]}});
        assert!(parse::<Transforms>(&t).is_err(), "{bad} should be refused");
        let bytes =
            serde_json::to_vec(&message("pend", json!({"trxId": "t", "transforms": t, "policy": "c"}))).unwrap();
        expect_json_error(&bytes);
    }
    let bad_transforms = [
        json!({"deletes": {"a": true}}),
        json!({"deletes": "a"}),
        json!({"updates": [["n", 0, 0, 1]]}),
        json!({"updates": {"a": ["n", 0, 0, 1]}}),
        json!({"inserts": {"a": {"n": 1}}}),
        json!({"inserts": {"a": {"header": {"id": "a", "type": "t"}}}}),
        json!({"inserts": {"a": {"header": "a"}}}),
        json!({"inserts": ["a"]}),
        json!({"inserts": {"": block()}}),
    ];
    for bad in bad_transforms {
        assert!(parse::<Transforms>(&bad).is_err(), "{bad} should be refused");
    }
}

#[test]
fn error_envelopes_and_responses_never_panic() {
    let values = [
        json!(null),
        json!(1),
        json!({"error": 1}),
        json!({"error": {"code": 1, "message": "m"}}),
        json!({"error": {"code": "bad-request"}}),
        json!({"error": {"code": "nope", "message": "m"}, "other": 1}),
        json!({"success": "yes"}),
        json!({"success": true, "blockIds": [""]}),
        json!({"a": {"state": {"pendings": [1]}}}),
        json!([1, 2, 3]),
    ];
    for value in values {
        let _ = ErrorEnvelope::from_response(&value);
        for kind in ["get", "pend", "cancel", "commit", "nope"] {
            let outcome = catch_unwind(|| decode_response(kind, value.clone()));
            assert!(outcome.is_ok(), "decode_response({kind}, {value}) panicked");
        }
    }
    // An unknown code becomes an internal error, a known one its variant.
    let e = ErrorEnvelope::from_response(&json!({"error": {"code": "nope", "message": "m"}})).unwrap().into_error();
    assert_eq!(e.code(), ErrorCode::Internal);
    let e = ErrorEnvelope::from_response(&envelope()).unwrap().into_error();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    assert!(matches!(decode_response("pend", json!({"success": "yes"})), Err(RepoError::Internal(_))));
    assert!(matches!(decode_response("nope", json!(null)), Err(RepoError::Internal(_))));
}

#[test]
fn ids_are_bounded_in_bytes() {
    assert!(BlockId::new("").is_err());
    assert!(BlockId::new("x".repeat(256)).is_ok());
    assert!(BlockId::new("x".repeat(257)).is_err());
    assert!(BlockId::new("é".repeat(128)).is_ok());
    assert!(BlockId::new(format!("{}é", "x".repeat(255))).is_err());
    assert!(TrxId::new("").is_err());
    assert!(TrxId::new("x".repeat(128)).is_ok());
    assert!(TrxId::new("x".repeat(129)).is_err());
    assert!(TrxId::new("🙂".repeat(32)).is_ok());
    assert!(TrxId::new("🙂".repeat(33)).is_err());
    let e: RepoError = BlockId::new("").unwrap_err().into();
    assert_eq!(e.code(), ErrorCode::BadRequest);
}

// =============================================================================================
// Invalid transforms through StorageRepo change nothing.

fn bid(id: &str) -> BlockId {
    BlockId::new(id).unwrap()
}

async fn seeded() -> (Arc<MiniStorage>, StorageRepo) {
    let storage = Arc::new(MiniStorage::new());
    let repo = StorageRepo::new(storage.clone());
    let insert: Transforms = serde_json::from_value(json!({
        "inserts": {
            "a": {"header": {"id": "a", "type": "t", "collectionId": "c"}, "items": [1, 2, 3], "name": "x"},
            "b": {"header": {"id": "b", "type": "t", "collectionId": "c"}, "items": []}
        }
    }))
    .unwrap();
    let o = MessageOptions::default();
    let trx = TrxId::new("t0").unwrap();
    repo.pend(&PendRequest { trx_id: trx.clone(), rev: Some(1), transforms: insert, policy: PendPolicy::Continue }, &o)
        .await
        .unwrap();
    let commit =
        CommitRequest { trx_id: trx, block_ids: vec![bid("a"), bid("b")], rev: 1, tail_id: bid("a"), header_id: None };
    assert!(repo.commit(&commit, &o).await.unwrap().is_success());
    let pending: Transforms = serde_json::from_value(json!({"updates": {"a": [["name", 0, 0, "y"]]}})).unwrap();
    let t1 = TrxId::new("t1").unwrap();
    repo.pend(&PendRequest { trx_id: t1, rev: None, transforms: pending, policy: PendPolicy::Continue }, &o)
        .await
        .unwrap();
    (storage, repo)
}

fn invalid_pends() -> Vec<Value> {
    vec![
        json!({"updates": {"a": [["header", 0, 0, {"id": "a"}]]}}),
        json!({"updates": {"a": [["nope", 0, 0, [1]]]}}),
        json!({"updates": {"a": [["name", 0, 0, [1]]]}}),
        json!({"updates": {"a": [["items", 4, 0, [1]]]}}),
        json!({"updates": {"a": [["items", 0, 0, [1]], ["items", 9, 0, []]]}}),
        json!({"updates": {"b": [["items", 1, 0, [1]]]}, "deletes": ["a"]}),
        json!({"updates": {"ghost": [["items", 0, 0, [1]]]}}),
        json!({"deletes": ["a", "ghost"]}),
        json!({"inserts": {"c": {"header": {"id": "d", "type": "t", "collectionId": "c"}}}}),
        json!({"inserts": {"c": {"header": {"id": "c", "type": "t", "collectionId": "c"}}}, "updates": {"c": [["x", 0, 0, [1]]]}}),
        json!({}),
    ]
}

#[tokio::test]
async fn invalid_transforms_through_the_repo_change_nothing() {
    let (storage, repo) = seeded().await;
    let o = MessageOptions::default();
    for (i, transforms) in invalid_pends().into_iter().enumerate() {
        for (rev, policy) in [(None, "c"), (Some(2), "f"), (Some(5), "r")] {
            let mut request = json!({"trxId": format!("bad{i}"), "transforms": transforms, "policy": policy});
            if let Some(rev) = rev {
                request["rev"] = json!(rev);
            }
            let bytes = serde_json::to_vec(&message("pend", request)).unwrap();
            let op = RepoMessage::from_slice(&bytes).unwrap().into_operation().unwrap();
            let RepoOperation::Pend(pend) = op else { panic!("a pend") };
            let before = storage.dump();
            let result = repo.pend(&pend, &o).await;
            let err = result.expect_err(&format!("pend {transforms} must fail"));
            assert_eq!(err.code(), ErrorCode::BadRequest, "{transforms}: {err}");
            assert_eq!(storage.dump(), before, "{transforms}: a refused pend changed the store");
        }
    }
    // Commits and reads that fail change nothing either.
    let before = storage.dump();
    let bad_commit = CommitRequest {
        trx_id: TrxId::new("t9").unwrap(),
        block_ids: vec![bid("a")],
        rev: 2,
        tail_id: bid("a"),
        header_id: None,
    };
    assert!(repo.commit(&bad_commit, &o).await.is_err());
    let no_blocks = CommitRequest { block_ids: Vec::new(), ..bad_commit };
    assert!(repo.commit(&no_blocks, &o).await.is_err());
    let read = BlockGets {
        block_ids: vec![bid("a"), bid("b")],
        context: Some(TrxContext { committed: Vec::new(), rev: 1, trx_id: Some(TrxId::new("t1").unwrap()) }),
        read_mode: None,
    };
    assert!(matches!(repo.get(&read, &o).await, Err(RepoError::PendingNotFound { .. })));
    let expired = MessageOptions { expiration_ms: Some(1) };
    let good: PendRequest = serde_json::from_value(
        json!({"trxId": "t5", "transforms": {"updates": {"b": [["items", 0, 0, [1]]]}}, "policy": "c"}),
    )
    .unwrap();
    assert!(matches!(repo.pend(&good, &expired).await, Err(RepoError::Expired)));
    assert_eq!(storage.dump(), before, "failed commits, reads and expired requests change nothing");
}

/// Pends `transforms` at `rev` as `trx` and commits it.
async fn write(repo: &StorageRepo, trx: &str, rev: u64, transforms: Value) -> Result<(), RepoError> {
    let o = MessageOptions::default();
    let trx_id = TrxId::new(trx).unwrap();
    let transforms: Transforms = serde_json::from_value(transforms).unwrap();
    let block_ids = transforms.block_ids();
    let pend = PendRequest { trx_id: trx_id.clone(), rev: Some(rev), transforms, policy: PendPolicy::Continue };
    assert!(matches!(repo.pend(&pend, &o).await?, PendResult::Success(_)));
    let tail_id = block_ids[0].clone();
    let commit = CommitRequest { trx_id, block_ids, rev, tail_id, header_id: None };
    assert!(repo.commit(&commit, &o).await?.is_success());
    Ok(())
}

#[tokio::test]
async fn a_pend_past_max_block_bytes_is_refused_and_an_oversize_block_can_shrink_or_go() {
    let storage = Arc::new(MiniStorage::new());
    // An older version had no limit: it wrote a block of about 3,000 bytes.
    let unlimited = StorageRepo::new(storage.clone()).with_max_block_bytes(u64::MAX);
    let header = json!({"id": "big", "type": "t", "collectionId": "c"});
    let text = "x".repeat(1_000);
    let inserts = json!({"inserts": {"big": {"header": header, "items": [text, text, text]}}});
    write(&unlimited, "t1", 1, inserts).await.unwrap();

    let repo = StorageRepo::new(storage.clone()).with_max_block_bytes(2_048);
    let before = storage.dump();
    let grow = json!({"updates": {"big": [["items", 3, 0, ["y"]]]}});
    let refused = write(&repo, "t2", 2, grow).await.unwrap_err();
    assert_eq!(refused.code(), ErrorCode::BadRequest, "{refused}");
    let said = refused.to_string();
    assert!(
        said.contains("block big") && said.contains("3076 bytes") && said.contains("limit of 2048 bytes"),
        "names the block, its size and the limit: {said}"
    );
    assert_eq!(storage.dump(), before, "a refused pend changes nothing");
    let new_block = json!({"inserts": {"other": {"header": {"id": "other", "type": "t", "collectionId": "c"}, "v": "x".repeat(3_000)}}});
    assert!(write(&repo, "t3", 1, new_block).await.is_err(), "a new block past the limit is refused");

    let gets = BlockGets { block_ids: vec![bid("big")], context: None, read_mode: None };
    let read = repo.get(&gets, &MessageOptions::default()).await.unwrap();
    assert_eq!(read[&bid("big")].block.as_ref().unwrap().fields["items"][0], json!(text), "an oversize block reads");
    write(&repo, "t4", 2, json!({"updates": {"big": [["items", 2, 1, []]]}})).await.expect("shrinking is allowed");
    write(&repo, "t5", 3, json!({"deletes": ["big"]})).await.expect("deleting is allowed");
}

fn mutate(value: &mut Value, choice: &mut impl Iterator<Item = u32>, replacement: &Value) {
    let Some(pick) = choice.next() else {
        *value = replacement.clone();
        return;
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            let n = map.len();
            let key = map.keys().nth(pick as usize % n).cloned().unwrap();
            mutate(map.get_mut(&key).unwrap(), choice, replacement);
        }
        Value::Array(items) if !items.is_empty() => {
            let n = items.len();
            mutate(&mut items[pick as usize % n], choice, replacement);
        }
        _ => *value = replacement.clone(),
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        ".{0,6}".prop_map(Value::String),
        prop::sample::select(vec!["header", "items", "name", "a", "b", "c", "t0", "t1", ""]).prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,3}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes never panic the parser.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = RepoMessage::from_slice(&bytes);
    }

    /// Arbitrary JSON never panics the parser; what parses re-serializes and parses again.
    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        for candidate in [value.clone(), json!({"operations": [value.clone()], "expiration": 1})] {
            if let Ok(message) = RepoMessage::from_value(candidate) {
                let text = serde_json::to_vec(&message).unwrap();
                prop_assert_eq!(RepoMessage::from_slice(&text).unwrap(), message);
            }
        }
    }

    /// A valid pend message with one random position replaced: parsing gives a message or a wire
    /// error; a parsed pend through the repo either succeeds or, when refused as a bad request,
    /// changes nothing.
    #[test]
    fn mutated_pends_through_the_repo(
        choice in prop::collection::vec(any::<u32>(), 0..8),
        replacement in any_json(),
        base in prop::sample::select(vec![0usize, 1, 2]),
    ) {
        let transforms = [
            json!({"updates": {"a": [["items", 1, 1, ["x"]], ["name", 0, 0, "z"]]}}),
            json!({"inserts": {"c": {"header": {"id": "c", "type": "t", "collectionId": "c"}, "l": []}}, "deletes": ["b"]}),
            json!({"updates": {"b": [["items", 0, 0, [1, 2]]]}, "inserts": {"a": block()}}),
        ];
        let mut value = message("pend", json!({"trxId": "m", "rev": 2, "transforms": transforms[base], "policy": "c"}));
        mutate(&mut value, &mut choice.into_iter(), &replacement);
        let bytes = serde_json::to_vec(&value).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let (storage, repo) = seeded().await;
            let Ok(message) = RepoMessage::from_slice(&bytes) else { return Ok(()) };
            let Ok(RepoOperation::Pend(pend)) = message.into_operation() else { return Ok(()) };
            let before = storage.dump();
            match repo.pend(&pend, &MessageOptions::default()).await {
                Ok(_) => {}
                Err(e) => {
                    prop_assert_eq!(e.code(), ErrorCode::BadRequest, "{}", e);
                    prop_assert_eq!(storage.dump(), before, "refused pend changed the store: {}", e);
                }
            }
            Ok(())
        })?;
    }
}
