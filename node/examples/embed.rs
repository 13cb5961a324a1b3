//! Embedding a node in an application: memory storage, a cluster of one, a few transactions.
//!
//! Run with `cargo run -p optimystic-node --example embed`.

use optimystic_core::MessageOptions;
use optimystic_core::model::{Block, BlockGets, BlockId, BlockOperation, Transform};
use optimystic_node::txn::{self, RetryPolicy};
use optimystic_node::{config, link_bundled_plugins, node::Node};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config::defaults();
    cfg.node.data_dir = dir.path().to_path_buf();
    cfg.node.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    cfg.storage.kind = "memory".into();
    cfg.key_network.kind = "static".into();
    cfg.key_network.options.clear();
    cfg.consensus.kind = "solo".into();
    cfg.consensus.options.clear();
    cfg.metrics.enabled = false;

    let node = Node::start(&cfg, &link_bundled_plugins()).await?;
    println!("node {} is running", node.peer_id());
    let repo = node.repo();

    let id = BlockId::new("shopping-list")?;
    let list = Block::new(id.clone(), "list", "home").with_field("items", json!([]));
    let created = txn::write_block(
        repo.as_ref(),
        &id,
        &Transform { insert: Some(list), ..Transform::default() },
        RetryPolicy::default(),
    )
    .await?;
    println!("created {id} at rev {}", created.rev);
    for item in ["bread", "milk", "apples"] {
        let add = Transform {
            updates: Some(vec![BlockOperation::splice("items", 0, 0, vec![json!(item)])]),
            ..Transform::default()
        };
        let done = txn::write_block(repo.as_ref(), &id, &add, RetryPolicy::default()).await?;
        println!("added {item} at rev {}", done.rev);
    }

    let gets = BlockGets { block_ids: vec![id.clone()], context: None, read_mode: None };
    let read = repo.get(&gets, &MessageOptions::expiring_in(5_000)).await?;
    println!("{}", serde_json::to_string_pretty(&read)?);

    node.shutdown().await?;
    Ok(())
}
