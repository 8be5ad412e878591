//! Hosts behind NAT: network namespaces made with `ip netns` and veth pairs, and nftables
//! masquerading in a router namespace (SPEC §12).
//!
//! ```text
//!   root namespace (servers: channel, cache, collector)   10.213.K.1/24
//!        │ veth
//!   router namespace "<p>r"   WAN 10.213.K.2/24, masquerade; forwards nothing inbound
//!        │ one veth pair per host, 10.(214+i/64).K.(4(i%64)+1)/30 ↔ …(4(i%64)+2)/30
//!   host namespaces "<p>h0", "<p>h1", …   default route via the router
//! ```
//!
//! Servers bind the root side's WAN address; hosts reach it only through the router, so every
//! request they make arrives from the router's WAN address, and nothing on the WAN side can open
//! a connection to them. Everything is removed on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A router namespace with hosts behind it.
pub struct NatNetwork {
    prefix: String,
    subnet: u32,
    hosts: usize,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, program: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .expect("ip netns exec runs");
    assert!(
        out.status.success(),
        "{program} {} in {ns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NatNetwork {
    /// Makes the router and `hosts` host namespaces behind it.
    pub fn new(hosts: usize) -> Self {
        assert!(hosts <= 256, "one /30 per host, 64 per /24, four /24s");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let network = Self {
            prefix: format!("f{:x}{n}", pid % 0xffff),
            // A /24 per network, different for concurrent tests and runs.
            subnet: (pid.wrapping_mul(7).wrapping_add(n * 13)) % 250 + 1,
            hosts,
        };
        network.remove();
        network.build();
        network
    }

    fn router(&self) -> String {
        format!("{}r", self.prefix)
    }

    /// The namespace of host `i`.
    pub fn host(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// The root side's WAN address, where servers listen.
    pub fn server_ip(&self) -> String {
        format!("10.213.{}.1", self.subnet)
    }

    /// The router's WAN address: what servers see hosts' requests come from.
    pub fn router_wan_ip(&self) -> String {
        format!("10.213.{}.2", self.subnet)
    }

    /// Host `i`'s own address behind the router.
    pub fn host_ip(&self, i: usize) -> String {
        let (net, base) = self.lan(i);
        format!("{net}.{}", base + 2)
    }

    /// Host `i`'s /30: the first three octets and the base of its last.
    fn lan(&self, i: usize) -> (String, usize) {
        (format!("10.{}.{}", 214 + i / 64, self.subnet), 4 * (i % 64))
    }

    fn build(&self) {
        let router = self.router();
        let wan = format!("{}w", self.prefix);
        let k = self.subnet;
        ip(&["netns", "add", &router]);
        ip(&[
            "link", "add", &wan, "type", "veth", "peer", "name", "wan", "netns", &router,
        ]);
        ip(&["addr", "add", &format!("10.213.{k}.1/24"), "dev", &wan]);
        ip(&["link", "set", &wan, "up"]);
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("10.213.{k}.2/24"),
            "dev",
            "wan",
        ]);
        ip(&["-n", &router, "link", "set", "wan", "up"]);
        ip(&["-n", &router, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &router,
            "route",
            "add",
            "default",
            "via",
            &format!("10.213.{k}.1"),
        ]);
        in_ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let rules = "table ip fleet_nat {
            chain postrouting { type nat hook postrouting priority 100; oifname \"wan\" masquerade; }
            chain forward { type filter hook forward priority 0; policy drop;
                ct state established,related accept
                iifname != \"wan\" accept
            }
        }";
        let out = Command::new("ip")
            .args(["netns", "exec", &router, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(rules.as_bytes())?;
                child.wait_with_output()
            })
            .expect("nft runs (scripts/setup installs nftables)");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..self.hosts {
            let host = self.host(i);
            let lan = format!("lan{i}");
            ip(&["netns", "add", &host]);
            ip(&[
                "link", "add", &lan, "netns", &router, "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ]);
            let (net, base) = self.lan(i);
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{net}.{}/30", base + 1),
                "dev",
                &lan,
            ]);
            ip(&["-n", &router, "link", "set", &lan, "up"]);
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("{net}.{}/30", base + 2),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &host,
                "route",
                "add",
                "default",
                "via",
                &format!("{net}.{}", base + 1),
            ]);
        }
    }

    /// Runs `program` inside host `i`'s namespace.
    pub fn command_in(&self, i: usize, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host(i)]).arg(program);
        command
    }

    /// Runs `program` inside the router's namespace.
    pub fn command_in_router(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.router(), program]);
        command
    }

    /// The TCP and UDP sockets listening in host `i`'s namespace (`ss -Hltnu`).
    pub fn listening(&self, i: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.host(i), "ss", "-Hltnu"])
            .output()
            .expect("ss runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn remove(&self) {
        for i in 0..self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.host(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.router()])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}w", self.prefix)])
            .output();
    }
}

impl Drop for NatNetwork {
    fn drop(&mut self) {
        self.remove();
    }
}
