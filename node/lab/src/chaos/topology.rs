//! The chaos network: one Linux network namespace per region, each joined to
//! a bridge in the host namespace by a veth pair, and the nftables rules
//! that cut, or thin out, traffic between the regions' nodes.
//!
//! Addresses: the bridge is `10.231.0.1/24` (the harness and its clients
//! talk to every node from there); region `i`'s node is `10.231.0.(10+i)`.
//! Every fault rule matches only node-to-node traffic (source address of
//! another region's node), so clients always reach their own node. Rules are
//! applied at the receiver's input hook: the sender sees nothing, as on a
//! real network, where a partition is silent.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The bridge in the host namespace.
const BRIDGE: &str = "cw-chaos";
/// The bridge's address: where the harness and clients sit.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// The nftables table the harness owns in each region's namespace.
const TABLE: &str = "causeway_chaos";
/// The table counting what enters a region's namespace from other regions'
/// nodes: made once, never replaced by [`Topology::apply`], and after the
/// fault rules, so it counts what got through.
const WAN_TABLE: &str = "causeway_chaos_wan";
/// At most this many regions (addresses and interface names are per index).
pub const MAX_REGIONS: usize = 8;

/// Which node-to-node traffic is dropped, as the receiver sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// Directed pairs `(from, to)` of regions: every packet from `from`'s
    /// node to `to`'s node is dropped.
    pub blocked: BTreeSet<(usize, usize)>,
    /// Per region, the percentage of packets to and from its node dropped
    /// at random (nftables `numgen random`).
    pub loss: BTreeMap<usize, u8>,
}

impl NetState {
    /// The nftables rules of region `to`'s input chain for this state.
    fn input_rules(&self, to: usize, regions: usize) -> Vec<String> {
        let mut rules = Vec::new();
        for &(from, _) in self.blocked.iter().filter(|(_, t)| *t == to) {
            rules.push(format!("ip saddr {} drop", node_addr(from)));
        }
        for from in (0..regions).filter(|&r| r != to) {
            // Loss on either end thins the traffic between the two.
            let percent = [self.loss.get(&to), self.loss.get(&from)]
                .into_iter()
                .flatten()
                .copied()
                .max();
            if let Some(p) = percent {
                rules.push(format!(
                    "ip saddr {} numgen random mod 100 < {p} drop",
                    node_addr(from)
                ));
            }
        }
        rules
    }
}

/// The address of region `index`'s node.
pub fn node_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 231, 0, 10 + index as u8)
}

/// The network namespace of region `index`.
pub fn namespace(index: usize) -> String {
    format!("cw-chaos-{index}")
}

/// The namespaces, veth pairs and bridge of one chaos run. Dropping it
/// removes them.
#[derive(Debug)]
pub struct Topology {
    regions: usize,
}

impl Topology {
    /// Creates the bridge and one namespace per region, removing what a
    /// previous run that did not finish may have left behind. Needs root
    /// (CAP_NET_ADMIN), `ip` (iproute2) and `nft` (nftables).
    pub fn create(regions: usize) -> Result<Topology> {
        if regions > MAX_REGIONS {
            bail!("at most {MAX_REGIONS} regions");
        }
        for tool in ["ip", "nft"] {
            if Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
            {
                bail!("`{tool}` is not installed (Debian: apt-get install iproute2 nftables)");
            }
        }
        remove_leftovers();
        // Built first so that a failure below still removes what was made.
        let topology = Topology { regions };
        let host = format!("{HOST_ADDR}/24");
        run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        run(&["ip", "addr", "add", &host, "dev", BRIDGE])?;
        run(&["ip", "link", "set", BRIDGE, "up"])?;
        for i in 0..regions {
            let ns = namespace(i);
            let veth = format!("cw-chaos-v{i}");
            let addr = format!("{}/24", node_addr(i));
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["ip", "link", "set", &veth, "master", BRIDGE, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        topology.apply(&NetState::default())?;
        for to in 0..regions {
            let others: Vec<String> = (0..regions)
                .filter(|&r| r != to)
                .map(|r| node_addr(r).to_string())
                .collect();
            let script = format!(
                "table inet {WAN_TABLE} {{\n  counter wan_in {{ }}\n  chain input {{\n    type filter hook input priority 10; policy accept;\n    ip saddr {{ {} }} counter name wan_in\n  }}\n}}\n",
                others.join(", ")
            );
            nft(to, &script)?;
        }
        Ok(topology)
    }

    /// Packets and bytes that entered each region's namespace from another
    /// region's nodes since the network was made (what the fault rules let
    /// through), in region order.
    pub fn wan_in(&self) -> Result<Vec<Traffic>> {
        (0..self.regions)
            .map(|r| {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &namespace(r),
                        "nft",
                        "list",
                        "counter",
                        "inet",
                    ])
                    .args([WAN_TABLE, "wan_in"])
                    .output()
                    .context("cannot run nft")?;
                if !out.status.success() {
                    bail!(
                        "cannot read the WAN counter of {}: {}",
                        namespace(r),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Traffic::parse(&String::from_utf8_lossy(&out.stdout))
                    .context("the WAN counter did not parse")
            })
            .collect()
    }

    /// Replaces every region's rules with those of `state`, one atomic
    /// nftables transaction per namespace.
    pub fn apply(&self, state: &NetState) -> Result<()> {
        for to in 0..self.regions {
            let mut script = format!(
                "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n"
            );
            for rule in state.input_rules(to, self.regions) {
                script.push_str(&format!("    {rule}\n"));
            }
            script.push_str("  }\n}\n");
            nft(to, &script)?;
        }
        Ok(())
    }
}

/// Packets and bytes counted by nftables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes (IP packets, headers included).
    pub bytes: u64,
}

impl Traffic {
    /// Reads `packets N bytes M` from `nft list counter` output.
    fn parse(text: &str) -> Option<Traffic> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let after = |key: &str| {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i + 1)?.parse().ok()
        };
        Some(Traffic {
            packets: after("packets")?,
            bytes: after("bytes")?,
        })
    }
}

/// Runs an nftables script in region `to`'s namespace.
fn nft(to: usize, script: &str) -> Result<()> {
    let ns = namespace(to);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        remove_leftovers();
    }
}

/// Deletes every namespace and the bridge this harness creates (deleting a
/// namespace deletes its veth pair). Errors mean "was not there".
fn remove_leftovers() {
    for i in 0..MAX_REGIONS {
        let _ = quiet(&["ip", "netns", "del", &namespace(i)]);
    }
    let _ = quiet(&["ip", "link", "del", BRIDGE]);
}

fn quiet(args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Runs a command; an error carries its stderr.
fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_nft_output() {
        let text = "table inet causeway_chaos_wan {\n\tcounter wan_in {\n\t\tpackets 12 bytes 3456\n\t}\n}\n";
        assert_eq!(
            Traffic::parse(text),
            Some(Traffic {
                packets: 12,
                bytes: 3456
            })
        );
        assert_eq!(Traffic::parse("table inet x {}"), None);
    }

    #[test]
    fn rules_match_only_other_nodes_and_sit_at_the_receiver() {
        let mut state = NetState::default();
        state.blocked.insert((0, 1));
        state.loss.insert(2, 30);
        // Region 1 drops everything from region 0, and 30% from region 2.
        assert_eq!(
            state.input_rules(1, 3),
            vec![
                "ip saddr 10.231.0.10 drop".to_string(),
                "ip saddr 10.231.0.12 numgen random mod 100 < 30 drop".to_string(),
            ]
        );
        // Region 0 still hears region 1 (one way), and loses 30% from 2.
        assert_eq!(
            state.input_rules(0, 3),
            vec!["ip saddr 10.231.0.12 numgen random mod 100 < 30 drop".to_string()]
        );
        // Region 2 loses 30% from both others; the host is never matched.
        let rules = state.input_rules(2, 3);
        assert_eq!(
            rules,
            vec![
                "ip saddr 10.231.0.10 numgen random mod 100 < 30 drop".to_string(),
                "ip saddr 10.231.0.11 numgen random mod 100 < 30 drop".to_string(),
            ]
        );
        let host = format!("saddr {HOST_ADDR} ");
        assert!(rules.iter().all(|r| !r.contains(&host)));
    }
}
