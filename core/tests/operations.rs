//! `BlockOperation` and `Transform` application (SPEC 1.1) against a small model written here,
//! including every error case, plus JSON round trips.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use optimystic_core::{Block, BlockId, BlockOperation, Transform, TransformError, Transforms};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// The model: plain functions over a map of fields, written from SPEC 1.1.

fn model_op(fields: &Map<String, Value>, op: &BlockOperation) -> Result<Map<String, Value>, TransformError> {
    let BlockOperation(entity, index, delete_count, inserted) = op;
    if entity == "header" {
        return Err(TransformError::HeaderChange);
    }
    let mut out = fields.clone();
    let new_value = match inserted {
        Value::Array(items) => {
            let Some(current) = fields.get(entity) else {
                return Err(TransformError::MissingField { entity: entity.clone() });
            };
            let Value::Array(array) = current else {
                return Err(TransformError::NotAnArray { entity: entity.clone() });
            };
            if *index > array.len() as u64 {
                return Err(TransformError::IndexPastEnd { entity: entity.clone(), index: *index, len: array.len() });
            }
            let start = *index as usize;
            let remaining = (array.len() - start) as u64;
            let end = start + (*delete_count).min(remaining) as usize;
            let mut spliced: Vec<Value> = array[..start].to_vec();
            spliced.extend(items.iter().cloned());
            spliced.extend(array[end..].iter().cloned());
            Value::Array(spliced)
        }
        other => other.clone(),
    };
    out.insert(entity.clone(), new_value);
    Ok(out)
}

fn model_transform(
    value: Option<&Block>,
    transform: &Transform,
    block_id: &BlockId,
) -> Result<Option<Block>, TransformError> {
    let mut current: Option<Block> = transform.insert.clone().or_else(|| value.cloned());
    let updates = transform.updates.clone().unwrap_or_default();
    if !updates.is_empty() {
        let Some(block) = current.as_mut() else {
            return Err(TransformError::BlockAbsent { block_id: block_id.clone() });
        };
        for op in &updates {
            block.fields = model_op(&block.fields, op)?;
        }
    }
    if transform.delete == Some(true) {
        current = None;
    }
    Ok(current)
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1000i32..1000).prop_map(|n| json!(f64::from(n) / 8.0)),
        "[a-z\u{e9}\u{1f642}]{0,4}".prop_map(Value::String),
    ]
}

fn non_array() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => leaf(),
        1 => prop::collection::btree_map("[a-c]", leaf(), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
}

fn array() -> impl Strategy<Value = Value> {
    prop::collection::vec(leaf(), 0..6).prop_map(Value::Array)
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![array(), non_array()]
}

fn fields() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c", "d"]), field_value(), 0..4)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..8, 1 => Just(u64::MAX), 1 => any::<u64>(), 1 => Just(usize::MAX as u64)]
}

fn operation() -> impl Strategy<Value = BlockOperation> {
    (
        prop::sample::select(vec!["a", "b", "c", "d", "e", "header"]),
        number(),
        number(),
        prop_oneof![array(), non_array()],
    )
        .prop_map(|(entity, index, delete_count, inserted)| {
            BlockOperation(entity.to_owned(), index, delete_count, inserted)
        })
}

fn block_of(id: &str, fields: Map<String, Value>) -> Block {
    let mut block = Block::new(BlockId::new(id).unwrap(), "t", "c");
    block.fields = fields;
    block
}

fn transform() -> impl Strategy<Value = Transform> {
    (
        prop::option::of(fields()),
        prop::option::of(prop::collection::vec(operation(), 0..4)),
        prop::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(|(insert, updates, delete, mismatch)| Transform {
            insert: insert.map(|f| block_of(if mismatch { "other" } else { "blk" }, f)),
            updates,
            delete,
        })
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// One operation: same result or same error as the model; on error the block is unchanged.
    #[test]
    fn operation_matches_model(fields in fields(), op in operation()) {
        let mut block = block_of("blk", fields.clone());
        let original = block.clone();
        let expected = model_op(&fields, &op);
        let got = op.apply(&mut block);
        match expected {
            Ok(new_fields) => {
                prop_assert_eq!(got, Ok(()));
                prop_assert_eq!(&block.fields, &new_fields);
                prop_assert_eq!(&block.header, &original.header);
            }
            Err(e) => {
                prop_assert_eq!(got, Err(e));
                prop_assert_eq!(&block, &original);
            }
        }
    }

    /// Operations applied in sequence stop at the first error, leaving that step's input intact.
    #[test]
    fn operation_sequences_match_model(fields in fields(), ops in prop::collection::vec(operation(), 0..8)) {
        let mut block = block_of("blk", fields.clone());
        let mut model = fields;
        for op in &ops {
            let before = block.clone();
            match (model_op(&model, op), op.apply(&mut block)) {
                (Ok(next), Ok(())) => {
                    model = next;
                    prop_assert_eq!(&block.fields, &model);
                }
                (Err(e), Err(got)) => {
                    prop_assert_eq!(got, e);
                    prop_assert_eq!(&block, &before);
                    break;
                }
                (expected, got) => prop_assert!(false, "op {:?}: model {:?}, got {:?}", op, expected, got),
            }
        }
    }

    /// A whole transform (insert, then updates, then delete) on an existing or absent block.
    #[test]
    fn transform_matches_model(value in prop::option::of(fields()), transform in transform()) {
        let id = BlockId::new("blk").unwrap();
        let value = value.map(|f| block_of("blk", f));
        let expected = model_transform(value.as_ref(), &transform, &id);
        let got = transform.apply(value.as_ref(), &id);
        prop_assert_eq!(got, expected);
    }

    /// `validate_shape` refuses exactly an insert under another id and any operation on `header`.
    #[test]
    fn validate_shape_matches_model(transform in transform()) {
        let id = BlockId::new("blk").unwrap();
        let expected = if let Some(block) = transform.insert.as_ref().filter(|b| b.header.id != id) {
            Err(TransformError::InsertIdMismatch { key: id.clone(), header_id: block.header.id.clone() })
        } else if transform.updates.iter().flatten().any(|op| op.0 == "header") {
            Err(TransformError::HeaderChange)
        } else {
            Ok(())
        };
        prop_assert_eq!(transform.validate_shape(&id), expected);
    }

    /// `[entity, index, deleteCount, inserted]` on the wire, and back.
    #[test]
    fn operation_json_round_trip(op in operation()) {
        let value = serde_json::to_value(&op).unwrap();
        prop_assert_eq!(
            &value,
            &json!([op.0.clone(), op.1, op.2, op.3.clone()])
        );
        let back: BlockOperation = serde_json::from_value(value).unwrap();
        prop_assert_eq!(back, op);
    }

    /// Transforms round-trip through JSON; `deletes` is an array; a block keeps its field order.
    #[test]
    fn transforms_json_round_trip(transform in transform(), fields in fields()) {
        let id = BlockId::new("blk").unwrap();
        let mut transforms = Transforms::single(&id, &transform);
        let other = BlockId::new("zz").unwrap();
        transforms.inserts.insert(other.clone(), block_of("zz", fields));
        transforms.deletes.push(other);
        let text = serde_json::to_string(&transforms).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        prop_assert!(value["deletes"].is_array());
        let back: Transforms = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(serde_json::to_string(&back).unwrap(), text);
        prop_assert_eq!(back, transforms);
    }
}

// ---------------------------------------------------------------------------------------------
// Every error case by name, and the edge cases that are not errors.

fn base() -> Block {
    block_of("blk", json!({"items": [1, 2, 3], "name": "x"}).as_object().unwrap().clone())
}

fn apply(op: BlockOperation) -> (Result<(), TransformError>, Block) {
    let mut block = base();
    let result = op.apply(&mut block);
    (result, block)
}

#[test]
fn header_changes_are_invalid() {
    for op in [
        BlockOperation::set("header", json!({"id": "blk", "type": "t", "collectionId": "c"})),
        BlockOperation::splice("header", 0, 0, vec![json!(1)]),
        BlockOperation("header".into(), 0, 0, Value::Null),
    ] {
        assert_eq!(apply(op), (Err(TransformError::HeaderChange), base()));
    }
}

#[test]
fn a_set_creates_a_missing_field_and_a_splice_of_one_is_invalid() {
    let missing = Err(TransformError::MissingField { entity: "nope".into() });
    let (result, created) = apply(BlockOperation::set("nope", json!(1)));
    assert_eq!((result, &created.fields["nope"]), (Ok(()), &json!(1)));
    let (result, created) = apply(BlockOperation::set("nope", Value::Null));
    assert_eq!((result, &created.fields["nope"]), (Ok(()), &Value::Null));
    assert_eq!(apply(BlockOperation::splice("nope", 0, 0, vec![])), (missing, base()));
}

#[test]
fn splicing_a_non_array_is_invalid() {
    assert_eq!(
        apply(BlockOperation::splice("name", 0, 0, vec![json!(1)])),
        (Err(TransformError::NotAnArray { entity: "name".into() }), base())
    );
}

#[test]
fn splice_index_past_end_is_invalid() {
    for index in [4, 5, u64::MAX, usize::MAX as u64] {
        assert_eq!(
            apply(BlockOperation::splice("items", index, 0, vec![json!(9)])),
            (Err(TransformError::IndexPastEnd { entity: "items".into(), index, len: 3 }), base())
        );
    }
}

#[test]
fn splice_edges_are_valid() {
    let items = |block: Block| block.fields["items"].clone();
    let (r, b) = apply(BlockOperation::splice("items", 3, 0, vec![json!(4)]));
    assert_eq!((r, items(b)), (Ok(()), json!([1, 2, 3, 4])), "index == length appends");
    let (r, b) = apply(BlockOperation::splice("items", 1, u64::MAX, vec![json!("z")]));
    assert_eq!((r, items(b)), (Ok(()), json!([1, "z"])), "deleteCount past the end removes to the end");
    let (r, b) = apply(BlockOperation::splice("items", 0, 3, vec![]));
    assert_eq!((r, items(b)), (Ok(()), json!([])));
    let (r, b) = apply(BlockOperation::splice("items", 3, 5, vec![]));
    assert_eq!((r, items(b)), (Ok(()), json!([1, 2, 3])), "deleting past the end at the end is a no-op");
    let (r, b) = apply(BlockOperation("items".into(), 99, 99, json!("scalar")));
    assert_eq!((r, items(b)), (Ok(()), json!("scalar")), "a set ignores index and deleteCount");
    let (r, b) = apply(BlockOperation::set("name", json!({"nested": [1]})));
    assert_eq!((r, b.fields["name"].clone()), (Ok(()), json!({"nested": [1]})));
}

#[test]
fn transform_errors_by_name() {
    let id = BlockId::new("blk").unwrap();
    let update = Transform { updates: Some(vec![BlockOperation::set("name", json!(1))]), ..Transform::default() };
    assert_eq!(update.apply(None, &id), Err(TransformError::BlockAbsent { block_id: id.clone() }));
    let mismatch = Transform { insert: Some(block_of("other", Map::new())), ..Transform::default() };
    assert_eq!(
        mismatch.validate_shape(&id),
        Err(TransformError::InsertIdMismatch { key: id.clone(), header_id: BlockId::new("other").unwrap() })
    );
    // An empty update list on an absent block, and a delete of an absent block, are fine.
    let empty = Transform { updates: Some(vec![]), ..Transform::default() };
    assert_eq!(empty.apply(None, &id), Ok(None));
    let delete = Transform { delete: Some(true), ..Transform::default() };
    assert_eq!(delete.apply(None, &id), Ok(None));
    assert_eq!(delete.apply(Some(&base()), &id), Ok(None));
    // Insert, then updates on the inserted value, then delete.
    let all = Transform {
        insert: Some(base()),
        updates: Some(vec![BlockOperation::splice("items", 0, 1, vec![])]),
        delete: Some(false),
    };
    let got = all.apply(None, &id).unwrap().unwrap();
    assert_eq!(got.fields["items"], json!([2, 3]));
    // A failing second update leaves the input untouched (apply does not mutate its input).
    let failing = Transform {
        updates: Some(vec![
            BlockOperation::set("name", json!(2)),
            BlockOperation::splice("nope", 0, 0, vec![json!(3)]),
        ]),
        ..Transform::default()
    };
    let input = base();
    assert_eq!(failing.apply(Some(&input), &id), Err(TransformError::MissingField { entity: "nope".into() }));
    assert_eq!(input, base());
}
