//! `optimystic client`: one repo operation against a running node, or a whole `write`.
//!
//! Every JSON argument may be given inline, as `@FILE` (the file's contents) or as `-` (stdin).
//! A `write` interrupted by SIGINT or SIGTERM before its commit was sent cancels its pend, and the
//! command exits 130 either way.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use async_trait::async_trait;
use clap::{Args, Subcommand};
use optimystic_core::client::RepoClient;
use optimystic_core::model::{
    Block, BlockGets, BlockId, BlockOperation, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult,
    Transform, TrxBlocks,
};
use optimystic_core::network::PeerNetwork;
use optimystic_core::{MessageOptions, Repo, RepoError};
use optimystic_node::txn;
use serde_json::{Value, json};

use crate::{EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_OUTCOME_UNKNOWN, connect, error_text, wait_for_signal};

/// Largest JSON argument read from a file or stdin: 256 MiB, the largest frame a node accepts.
pub const MAX_JSON_ARGUMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Longest explanation of a JSON argument's parse error, in characters.
const MAX_REASON_CHARS: usize = 300;

/// Environment variable that makes `client write` stop after its pend (printing `pended <trxId> at
/// rev <rev>` on stderr) until it is interrupted: for failure tests of an interrupted write.
pub const HOLD_BEFORE_COMMIT_ENV: &str = "OPTIMYSTIC_CLIENT_HOLD_BEFORE_COMMIT";

/// Flags of `client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The node to talk to: `<multiaddr>/p2p/<peer id>`.
    #[arg(long)]
    peer: String,
    /// Deadline of each operation.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Protocol id prefix of the network.
    #[arg(long, default_value = optimystic_core::wire::DEFAULT_PROTOCOL_PREFIX)]
    protocol_prefix: String,
    #[command(subcommand)]
    op: ClientOp,
}

/// JSON arguments are the JSON text, `@FILE` or `-` (stdin).
#[derive(Debug, Subcommand)]
enum ClientOp {
    /// Read blocks: prints the GetBlockResults JSON.
    Get {
        /// Block ids; or one BlockGets JSON object with `--json`.
        ids: Vec<String>,
        /// Treat the single argument as a BlockGets JSON object (or `@FILE`, or `-` for stdin).
        #[arg(long)]
        json: bool,
    },
    /// Pend a transaction: PendRequest JSON in, PendResult JSON out.
    Pend {
        /// The PendRequest JSON, `@FILE` or `-` (stdin).
        request: String,
    },
    /// Commit a transaction: CommitRequest JSON in, CommitResult JSON out.
    Commit {
        /// The CommitRequest JSON, `@FILE` or `-` (stdin).
        request: String,
    },
    /// Cancel a transaction: TrxBlocks JSON in.
    Cancel {
        /// The TrxBlocks JSON, `@FILE` or `-` (stdin).
        request: String,
    },
    /// A whole transaction on one block; prints {"trxId", "rev"}.
    ///
    /// `--update`, `--delete` and `--append` of a block that does not exist exit 3 (`not found`).
    /// SIGINT or SIGTERM before the commit cancels the pend and exits 130.
    Write {
        /// The block.
        #[arg(long)]
        block: String,
        /// Create the block from this Block JSON (`@FILE`, `-` for stdin); refused when the block
        /// exists, unless `--replace` is given.
        #[arg(long, conflicts_with_all = ["update", "delete", "append"])]
        insert: Option<String>,
        /// With `--insert`: replace the whole value of an existing block.
        #[arg(long, requires = "insert")]
        replace: bool,
        /// Apply this [BlockOperation] JSON (`@FILE`, `-` for stdin).
        #[arg(long, conflicts_with_all = ["delete", "append"])]
        update: Option<String>,
        /// Delete the block.
        #[arg(long, conflicts_with = "append")]
        delete: bool,
        /// Append the JSON value (`@FILE`, `-` for stdin) to the end of the array field FIELD (of
        /// the latest revision, whatever its length).
        #[arg(long, num_args = 2, value_names = ["FIELD", "JSON"])]
        append: Option<Vec<String>>,
    },
}

/// Runs `optimystic client`.
pub async fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    // Installed first: from here on an interrupt ends the command through the select below.
    let interrupted = wait_for_signal()?;
    let (host, peer) = connect(&args.peer, args.timeout_ms, &args.protocol_prefix).await?;
    let network: Arc<dyn PeerNetwork> = Arc::new(host.clone());
    let repo = Tracked::new(RepoClient::new(network, peer).with_default_timeout_ms(args.timeout_ms));
    let result = tokio::select! {
        result = client_op(&repo, args.op, args.timeout_ms) => Some(result),
        signal = interrupted => {
            signal?;
            None
        }
    };
    let Some(result) = result else {
        let left = repo.outstanding();
        let said = match left {
            Some(Outstanding { trx, commit_sent: false }) => {
                match repo.inner.cancel(&trx, &MessageOptions::expiring_in(args.timeout_ms)).await {
                    Ok(()) => format!("cancelled the pend of {}", trx.trx_id),
                    Err(e) => format!("the cancel of the pend of {} failed (it expires): {e}", trx.trx_id),
                }
            }
            Some(Outstanding { trx, commit_sent: true }) => {
                format!("the commit of {} was sent and not confirmed: its outcome is unknown", trx.trx_id)
            }
            None => "nothing was pending".to_owned(),
        };
        host.shutdown().await;
        eprintln!("interrupted: {said}");
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    host.shutdown().await;
    let answer = match result {
        Ok(answer) => answer,
        Err(e) if e.downcast_ref::<txn::TxnError>().is_some_and(|t| !t.nothing_committed()) => {
            eprintln!("error: {}", error_text(&e));
            return Ok(ExitCode::from(EXIT_OUTCOME_UNKNOWN));
        }
        Err(e) => match e.downcast::<NotFound>() {
            Ok(missing) => {
                eprintln!("{missing}");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
            Err(e) => return Err(e),
        },
    };
    println!("{}", serde_json::to_string_pretty(&answer.value)?);
    for id in &answer.not_found {
        eprintln!("not found: {id}");
    }
    Ok(if answer.not_found.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_NOT_FOUND) })
}

/// A `write` named a block that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("not found: {0} (no such block; create it with --insert)")]
struct NotFound(BlockId);

/// What a client operation printed, and which asked blocks do not exist.
struct Answer {
    value: Value,
    not_found: Vec<BlockId>,
}

impl From<Value> for Answer {
    fn from(value: Value) -> Self {
        Self { value, not_found: Vec::new() }
    }
}

/// The pend a `write` has outstanding.
#[derive(Clone, Debug)]
struct Outstanding {
    trx: TrxBlocks,
    /// Its commit was sent (from then on a cancel could not undo it).
    commit_sent: bool,
}

/// The client's repo, remembering the pend a `write` has outstanding so that an interrupt can
/// cancel it.
struct Tracked {
    inner: RepoClient,
    outstanding: Mutex<Option<Outstanding>>,
    hold_before_commit: bool,
}

impl Tracked {
    fn new(inner: RepoClient) -> Self {
        let hold_before_commit = std::env::var_os(HOLD_BEFORE_COMMIT_ENV).is_some_and(|v| !v.is_empty());
        Self { inner, outstanding: Mutex::new(None), hold_before_commit }
    }

    fn outstanding(&self) -> Option<Outstanding> {
        self.outstanding.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, value: Option<Outstanding>) {
        *self.outstanding.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }
}

#[async_trait]
impl Repo for Tracked {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        self.inner.get(gets, options).await
    }

    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        let trx = TrxBlocks { trx_id: request.trx_id.clone(), block_ids: request.transforms.block_ids() };
        // Recorded before sending: a pend whose answer is lost may still be pending.
        self.set(Some(Outstanding { trx, commit_sent: false }));
        self.inner.pend(request, options).await
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        self.inner.cancel(trx, options).await?;
        if self.outstanding().is_some_and(|o| o.trx.trx_id == trx.trx_id) {
            self.set(None);
        }
        Ok(())
    }

    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        if self.hold_before_commit {
            eprintln!("pended {} at rev {}", request.trx_id, request.rev);
            std::future::pending::<()>().await;
        }
        let trx = TrxBlocks { trx_id: request.trx_id.clone(), block_ids: request.block_ids.clone() };
        self.set(Some(Outstanding { trx, commit_sent: true }));
        let result = self.inner.commit(request, options).await;
        if let Ok(CommitResult::Success(_)) = &result {
            self.set(None);
        }
        result
    }
}

/// The blocks of `gets` that the answer holds no block value for (never created, or deleted at
/// the revision read).
fn missing_blocks(gets: &BlockGets, results: &GetBlockResults) -> Vec<BlockId> {
    gets.block_ids.iter().filter(|id| results.get(*id).is_none_or(|r| r.block.is_none())).cloned().collect()
}

/// The transform appending `item` to the array field `field` of `block` (its latest value).
fn append_transform(block_id: &BlockId, block: &Block, field: &str, item: &Value) -> Result<Transform, String> {
    let len = match block.fields.get(field) {
        Some(Value::Array(items)) => items.len(),
        Some(_) => return Err(format!("field {field:?} of block {block_id} is not an array, cannot append to it")),
        None => return Err(format!("block {block_id} has no field {field:?}")),
    };
    let op = BlockOperation::splice(field, len as u64, 0, vec![item.clone()]);
    Ok(Transform { updates: Some(vec![op]), ..Transform::default() })
}

/// Reads JSON arguments: inline text, `@FILE` or `-` (stdin, which can be read only once).
#[derive(Default)]
struct JsonArgs {
    stdin_taken: Option<&'static str>,
}

impl JsonArgs {
    /// Parses the argument `what` (inline JSON, `@FILE` or `-`) as a `T`.
    fn parse<T: serde::de::DeserializeOwned>(&mut self, what: &'static str, arg: &str) -> anyhow::Result<T> {
        let (text, source) = if arg == "-" {
            if let Some(earlier) = self.stdin_taken.replace(what) {
                bail!("{what} and {earlier} both read stdin (`-`); give one of them inline or as @FILE");
            }
            (read_bounded(std::io::stdin().lock()).context("reading stdin")?, " (from stdin)".to_owned())
        } else if let Some(path) = arg.strip_prefix('@') {
            let file = std::fs::File::open(Path::new(path)).with_context(|| format!("{what}: opening {path}"))?;
            (read_bounded(file).with_context(|| format!("{what}: reading {path}"))?, format!(" (from {path})"))
        } else {
            (arg.to_owned(), String::new())
        };
        serde_json::from_str(&text).map_err(|e| {
            // serde quotes the offending value, which may be megabytes long.
            let mut reason = e.to_string();
            if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON_CHARS) {
                reason.truncate(cut);
                reason.push_str("...");
            }
            anyhow::anyhow!("{what}{source} is not valid JSON of the expected shape: {reason}")
        })
    }
}

/// All of `input` as UTF-8 text, at most [`MAX_JSON_ARGUMENT_BYTES`].
fn read_bounded(input: impl Read) -> anyhow::Result<String> {
    let mut text = String::new();
    input.take(MAX_JSON_ARGUMENT_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_JSON_ARGUMENT_BYTES {
        bail!("longer than {MAX_JSON_ARGUMENT_BYTES} bytes");
    }
    Ok(text)
}

/// Builds a `write`'s transform from the block's latest value (`None`: the block does not exist).
type Build = Box<dyn Fn(Option<&Block>) -> Result<Transform, Refused> + Send + Sync>;

/// What a `write` found when it built its transform from the block's latest value.
enum Refused {
    /// The block does not exist (never created, or deleted).
    NotFound,
    /// `--insert` without `--replace` of a block that exists.
    Exists,
    /// The transform cannot be built from the value (the text says why).
    Invalid(String),
}

async fn client_op(repo: &Tracked, op: ClientOp, timeout_ms: u64) -> anyhow::Result<Answer> {
    let options = MessageOptions::expiring_in(timeout_ms);
    let mut args = JsonArgs::default();
    Ok(Answer::from(match op {
        ClientOp::Get { ids, json } => {
            let gets: BlockGets = if json {
                match ids.as_slice() {
                    [one] => args.parse("the BlockGets", one)?,
                    _ => bail!("--json takes exactly one BlockGets JSON argument"),
                }
            } else {
                let block_ids = ids.into_iter().map(BlockId::new).collect::<Result<Vec<_>, _>>()?;
                if block_ids.is_empty() {
                    bail!("name at least one block id");
                }
                BlockGets { block_ids, context: None, read_mode: None }
            };
            let results = repo.get(&gets, &options).await?;
            let not_found = missing_blocks(&gets, &results);
            return Ok(Answer { value: serde_json::to_value(results)?, not_found });
        }
        ClientOp::Pend { request } => {
            let request: PendRequest = args.parse("the PendRequest", &request)?;
            serde_json::to_value(repo.inner.pend(&request, &options).await?)?
        }
        ClientOp::Commit { request } => {
            let request: CommitRequest = args.parse("the CommitRequest", &request)?;
            serde_json::to_value(repo.inner.commit(&request, &options).await?)?
        }
        ClientOp::Cancel { request } => {
            let request: TrxBlocks = args.parse("the TrxBlocks", &request)?;
            repo.inner.cancel(&request, &options).await?;
            Value::Null
        }
        ClientOp::Write { block, insert, replace, update, delete, append } => {
            let block_id = BlockId::new(block)?;
            let policy = txn::RetryPolicy { operation_timeout_ms: timeout_ms, ..txn::RetryPolicy::default() };
            // Built from the block's latest value: `None` is a block that does not exist.
            let build: Build = match (insert, update, delete, append.as_deref()) {
                (Some(insert), None, false, None) => {
                    let transform =
                        Transform { insert: Some(args.parse::<Block>("--insert", &insert)?), ..Transform::default() };
                    Box::new(move |latest| match latest {
                        Some(_) if !replace => Err(Refused::Exists),
                        _ => Ok(transform.clone()),
                    })
                }
                (None, Some(update), false, None) => {
                    let updates = args.parse::<Vec<BlockOperation>>("--update", &update)?;
                    let transform = Transform { updates: Some(updates), ..Transform::default() };
                    Box::new(move |latest| latest.map(|_| transform.clone()).ok_or(Refused::NotFound))
                }
                (None, None, true, None) => {
                    let transform = Transform { delete: Some(true), ..Transform::default() };
                    Box::new(move |latest| latest.map(|_| transform.clone()).ok_or(Refused::NotFound))
                }
                (None, None, false, Some([field, item])) => {
                    let item: Value = args.parse("the --append value", item)?;
                    let field = field.clone();
                    let block_id = block_id.clone();
                    Box::new(move |latest| match latest {
                        Some(block) => append_transform(&block_id, block, &field, &item).map_err(Refused::Invalid),
                        None => Err(Refused::NotFound),
                    })
                }
                _ => bail!("give exactly one of --insert, --update, --delete or --append"),
            };
            let mut refused = None;
            let written = txn::write_with(repo, &block_id, policy, |latest| {
                build(latest).map_err(|why| {
                    let text = match &why {
                        Refused::NotFound => format!("block {block_id} does not exist"),
                        Refused::Exists => format!(
                            "block {block_id} already exists; --insert creates a block, add --replace to replace \
                             its whole value"
                        ),
                        Refused::Invalid(text) => text.clone(),
                    };
                    refused = Some(why);
                    text
                })
            })
            .await;
            let done = match written {
                Ok(done) => done,
                Err(txn::TxnError::Build(_)) if matches!(refused, Some(Refused::NotFound)) => {
                    return Err(NotFound(block_id).into());
                }
                Err(e) => return Err(e.into()),
            };
            json!({ "trxId": done.trx_id, "rev": done.rev })
        }
    }))
}
