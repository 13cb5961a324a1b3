//! Network namespaces (a hub with a bridge, one namespace per node joined to it by a veth pair),
//! partitions by blackhole routes inside the node namespaces, and the [`Resources`] registry that
//! removes every process and namespace the harness made, on exit, on a signal or on a panic.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Prefix of every namespace name this harness creates (`cleanup` looks for it).
pub const NS_PREFIX: &str = "nmz";

/// Subnet of the hub bridge and the nodes (inside the harness's namespaces only).
pub const SUBNET: &str = "10.77.0";

/// Processes and namespaces to remove at the end.
#[derive(Debug, Default)]
pub struct Resources {
    inner: Mutex<ResInner>,
}

#[derive(Debug, Default)]
struct ResInner {
    pids: BTreeSet<i32>,
    namespaces: Vec<String>,
    cleaned: bool,
}

impl Resources {
    fn lock(&self) -> std::sync::MutexGuard<'_, ResInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers a child process.
    pub fn add_pid(&self, pid: i32) {
        self.lock().pids.insert(pid);
    }

    /// Forgets a child process that has exited.
    pub fn remove_pid(&self, pid: i32) {
        self.lock().pids.remove(&pid);
    }

    /// Remembers a namespace.
    pub fn add_ns(&self, name: &str) {
        self.lock().namespaces.push(name.to_owned());
    }

    /// Forgets a namespace that was removed.
    pub fn remove_ns(&self, name: &str) {
        self.lock().namespaces.retain(|n| n != name);
    }

    /// Kills every remembered process (SIGKILL, by pid) and deletes every remembered namespace
    /// (after killing what still runs inside it). Idempotent.
    pub fn cleanup(&self) {
        let (pids, namespaces) = {
            let mut inner = self.lock();
            if inner.cleaned && inner.pids.is_empty() && inner.namespaces.is_empty() {
                return;
            }
            inner.cleaned = true;
            (std::mem::take(&mut inner.pids), std::mem::take(&mut inner.namespaces))
        };
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        for ns in namespaces.iter().rev() {
            let _ = delete_namespace(ns);
        }
    }
}

/// Cleans up when dropped (including during a panic's unwinding).
#[derive(Debug)]
pub struct Guard(pub Arc<Resources>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.cleanup();
    }
}

/// Runs `ip` with `args`; an error carries its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Kills the processes inside `ns` (they are the harness's own: nodes and clients it started
/// there) and deletes it; true when it is gone.
pub fn delete_namespace(ns: &str) -> bool {
    for _ in 0..3 {
        let pids: Vec<i32> =
            ip_output(&["netns", "pids", ns]).split_whitespace().filter_map(|p| p.parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ip(&["netns", "del", ns]).is_ok()
}

/// Namespaces left by earlier runs whose harness process is gone (`nmz<pid>...`).
pub fn stale_namespaces(all: bool) -> Vec<String> {
    ip_output(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .filter(|n| {
            all || {
                let pid: String = n.trim_start_matches(NS_PREFIX).chars().take_while(char::is_ascii_digit).collect();
                // Only "no such process" proves the harness gone (EPERM means it runs as another user).
                pid.parse::<i32>().is_ok_and(|p| kill(Pid::from_raw(p), None) == Err(nix::errno::Errno::ESRCH))
            }
        })
        .map(str::to_owned)
        .collect()
}

/// A hub namespace with a bridge, and one namespace per node.
#[derive(Debug)]
pub struct Netns {
    run: String,
    hub: String,
    res: Arc<Resources>,
}

impl Netns {
    /// Creates the hub namespace `nmz<pid>h` with bridge `br0` at `10.77.0.1/24`.
    pub fn create(res: Arc<Resources>) -> anyhow::Result<Self> {
        let run = format!("{NS_PREFIX}{}", std::process::id());
        let hub = format!("{run}h");
        ip(&["netns", "add", &hub])?;
        res.add_ns(&hub);
        let net = Self { run, hub, res };
        let hub = net.hub.as_str();
        ip(&["-n", hub, "link", "set", "lo", "up"])?;
        ip(&["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", hub, "addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"])?;
        ip(&["-n", hub, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// The hub namespace (clients run there).
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// The namespace of node `slot`.
    pub fn node_ns(&self, slot: usize) -> String {
        format!("{}n{slot}", self.run)
    }

    /// The address of node `slot` (slots 0..=229).
    pub fn node_ip(slot: usize) -> String {
        format!("{SUBNET}.{}", 10 + slot)
    }

    /// Creates node `slot`'s namespace, its veth pair (`v<slot>` on the bridge, `eth0` inside)
    /// and its address.
    pub fn add_node(&self, slot: usize) -> anyhow::Result<()> {
        if slot > 229 {
            bail!("at most 230 node slots");
        }
        let ns = self.node_ns(slot);
        ip(&["netns", "add", &ns])?;
        self.res.add_ns(&ns);
        let veth = format!("v{slot}");
        ip(&["-n", &self.hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["-n", &self.hub, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", Self::node_ip(slot)), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Removes node `slot`'s namespace (its veth goes with it).
    pub fn remove_node(&self, slot: usize) {
        let ns = self.node_ns(slot);
        let _ = delete_namespace(&ns);
        self.res.remove_ns(&ns);
    }

    /// Drops every packet from node `from` to node `to` (a blackhole route in `from`'s namespace).
    pub fn block(&self, from: usize, to: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.node_ns(from), "route", "add", "blackhole", &format!("{}/32", Self::node_ip(to))])
    }

    /// Removes every blackhole route of node `slot`.
    pub fn heal(&self, slot: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.node_ns(slot), "route", "flush", "type", "blackhole"])
    }
}
