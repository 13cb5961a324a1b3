//! `optimystic-nemesis`: a soak harness that runs real `optimystic start` processes, each in its
//! own Linux network namespace, injects faults (SIGKILL and restart, SIGSTOP/SIGCONT, isolation,
//! majority/minority splits, churn), runs a Jepsen list-append workload through the `optimystic
//! client` CLI, records every operation in a JSON-lines history and checks it (see
//! [`checker`]). See RELIABILITY.md at the repository root.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod history;
pub mod net;
pub mod run;
