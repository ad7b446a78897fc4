//! A network namespace of the test's own, where 169.254.169.254 can be a
//! local address: the only way to send traffic whose original destination is
//! the metadata service without touching the machine's own network.

use std::ffi::OsStr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A namespace with loopback up; deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with `addresses` on its loopback, or `None` when
    /// this process may not (not root, or no `ip`).
    pub fn create(addresses: &[&str]) -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("imds-mesh-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let netns = Self { name };
        if !ip(&["-n", &netns.name, "link", "set", "lo", "up"]) {
            return None;
        }
        for address in addresses {
            if !ip(&["-n", &netns.name, "addr", "add", address, "dev", "lo"]) {
                return None;
            }
        }
        Some(netns)
    }

    /// `program`, to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}
