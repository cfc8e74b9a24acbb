//! Each program run on crafted packets with `BPF_PROG_TEST_RUN`: the action it returns, the
//! bytes that come out, the marks it sets and the verdicts it counts, without a packet
//! leaving the test. Needs root.
//!
//! The datapath is loaded once per test binary (the verifier takes about half a second on
//! `to_netdev`; each test then takes milliseconds), with the agent's loader, on a thread of
//! its own in network and mount namespaces of its own: a veth pair or two give the ifindexes
//! the programs compare against (the kernel resolves `__sk_buff.ifindex` in the caller's
//! network namespace), and the pins go to a bpffs mounted in that private mount namespace.
//! Both namespaces, the devices and the pins go away with the test process, however it
//! ends. The tests' bodies run one at a time on that thread, each after the flow tables and
//! counters are emptied.
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Pod;
use mycni::datapath::{self, Maps, NatTable};
use mycni::policy_maps::{PolicyDesired, PolicyTables};
use mycni::socket_lb::{DesiredServices, ServiceTables};
use mycni_common::policy::{
    identity, PolicyCtEntry, PolicyDrops, PolicyEndpoint, PolicyEntry, PolicyKey, ENFORCE_EGRESS,
    ENFORCE_INGRESS, POLICY_EGRESS, POLICY_INGRESS,
};
use mycni_common::service::{
    Backend, ExternalNatEntry, HostPortEntry, ServiceEntry, ServiceKey, SERVICE_EXTERNAL_IP,
    SERVICE_EXTERNAL_LOCAL, SERVICE_NODE_PORT,
};
use mycni_common::{
    nat_state, verdict, Counter, Endpoint, FlowKey, FragmentEntry, FragmentKey, NatEntry,
    NodeConfig, FRAGMENT_SNAT, MAP_FRAGMENTS, MAP_NAT, MAP_POLICY_CT, MAP_STACK_FLOWS, MAP_STATS,
    MARK_FROM_POD, MARK_REVERSE_NAT, NAT_EGRESS, NAT_INGRESS, PROG_FROM_NETDEV, PROG_FROM_POD,
    PROG_TO_NETDEV, PROG_TO_POD, ROUTE_REMOTE_NODE, ROUTE_REMOTE_TUNNEL,
};
use mycni_common::{MAP_EXTERNAL_NAT, MAP_HOST_PORTS};
use mycni_tests::raw::{self, ARP_REPLY, ARP_REQUEST, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6};
use mycni_tests::{require_root, run};

// The TC actions the programs return.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_GRE: u8 = 47;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const UNASSIGNED: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 99);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const TUNNEL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 5);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const TUNNEL_PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 12);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const POD_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
const HOST_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const POD_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x02];
const HOST_B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const UPLINK_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x02];
const VNI: u32 = 7;
/// SNAT gets a single port, so the port a flow leaves with is known.
const NAT_PORT: u16 = 61000;

/// The ifindexes of the devices in the test's namespace.
#[derive(Clone, Copy)]
struct Devices {
    host_a: u32,
    host_b: u32,
    uplink: u32,
    tunnel: u32,
}

/// What one program run did.
struct Run {
    action: u32,
    frame: Vec<u8>,
    mark: u32,
}

/// The datapath as the lab thread loaded it.
struct Datapath {
    programs: Vec<(&'static str, SchedClassifier)>,
    dev: Devices,
    root: PathBuf,
    /// Holds `from_netdev` for the tunnel shim's tail call.
    _tail: OwnedFd,
}

/// Indexes of the `__sk_buff` fields a test sets or reads (u32 words).
const SKB_MARK: usize = 2;
const SKB_IFINDEX: usize = 10;
/// `cb[0]` and `cb[1]`: what the tunnel shim puts in the tunnel key.
const SKB_CB: usize = 12;
/// Room for the whole `__sk_buff`: the kernel writes all of it back.
const SKB_WORDS: usize = 64;

/// A test body, run on the lab thread.
type Job = Box<dyn FnOnce(&Datapath) + Send>;

/// The lab thread's queue, or why it could not start.
static LAB: OnceLock<Result<mpsc::Sender<Job>, String>> = OnceLock::new();

/// Runs `test` on the lab thread against the loaded datapath, with empty flow tables and
/// counters, and returns its result (a panic in it becomes an error).
fn with_datapath(test: impl FnOnce(&Datapath) -> Result<()> + Send + 'static) -> Result<()> {
    let lab = LAB
        .get_or_init(start_lab)
        .as_ref()
        .map_err(|e| anyhow!("the lab did not start: {e}"))?;
    let (done, result) = mpsc::channel();
    let job: Job = Box::new(move |dp| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dp.reset().context("emptying the maps")?;
            test(dp)
        }));
        let _ = done.send(outcome.unwrap_or_else(|_| Err(anyhow!("the test panicked"))));
    });
    lab.send(job)
        .map_err(|_| anyhow!("the lab thread is gone"))?;
    result
        .recv()
        .map_err(|_| anyhow!("the lab thread is gone"))?
}

/// Starts the lab thread: private namespaces, devices, the datapath loaded and its maps
/// filled; then it runs the jobs it is sent, one at a time, until the process ends.
fn start_lab() -> Result<mpsc::Sender<Job>, String> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready, started) = mpsc::channel();
    std::thread::Builder::new()
        .name("lab".into())
        .spawn(
            move || match enter_private_namespaces().and_then(|()| Datapath::load()) {
                Ok(dp) => {
                    let _ = ready.send(Ok(()));
                    for job in queue {
                        job(&dp);
                    }
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("{e:#}")));
                }
            },
        )
        .map_err(|e| e.to_string())?;
    started
        .recv()
        .map_err(|_| "the lab thread died starting".to_string())??;
    Ok(jobs)
}

/// Moves this thread into new network and mount namespaces (a thread may: it gets its own
/// filesystem context), keeps its mounts from propagating back, and mounts a fresh bpffs
/// over /sys/fs/bpf there.
fn enter_private_namespaces() -> Result<()> {
    // SAFETY: unshare and mount change only this thread's namespaces and their mount table;
    // the strings are NUL-terminated literals.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0 {
            bail!("unshare: {}", std::io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            bail!("making / private: {}", std::io::Error::last_os_error());
        }
        if libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            bail!("mounting a bpffs: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Datapath {
    /// Devices in the lab's namespace, the datapath loaded (pinned on the lab's bpffs) and
    /// the maps filled.
    fn load() -> Result<Datapath> {
        run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        run(Command::new("ip").args([
            "link", "add", "host-a", "type", "veth", "peer", "name", "host-b",
        ]))?;
        run(Command::new("ip").args([
            "link", "add", "uplink", "type", "veth", "peer", "name", "tunnel",
        ]))?;
        let dev = Devices {
            host_a: ifindex("host-a")?,
            host_b: ifindex("host-b")?,
            uplink: ifindex("uplink")?,
            tunnel: ifindex("tunnel")?,
        };
        let root = PathBuf::from("/sys/fs/bpf/mycni");
        datapath::load_and_pin(&root)?;
        let tail = tunnel_shim::load(&root.join(PROG_FROM_NETDEV), &root.join(TUNNEL_SHIM))?;
        let programs = [
            PROG_FROM_POD,
            PROG_TO_POD,
            PROG_FROM_NETDEV,
            PROG_TO_NETDEV,
            TUNNEL_SHIM,
        ]
        .into_iter()
        .map(|name| Ok((name, SchedClassifier::from_pin(root.join(name))?)))
        .collect::<Result<_>>()?;
        let datapath = Datapath {
            programs,
            dev,
            root,
            _tail: tail,
        };
        datapath.fill_maps()?;
        Ok(datapath)
    }

    /// Empties what the programs write: the flow tables and the counters.
    fn reset(&self) -> Result<()> {
        clear::<FlowKey, NatEntry>(&self.root, MAP_NAT)?;
        clear::<FlowKey, u64>(&self.root, MAP_STACK_FLOWS)?;
        clear::<FragmentKey, FragmentEntry>(&self.root, MAP_FRAGMENTS)?;
        // No policy: its endpoints' drop counts go with them.
        PolicyTables::open(&self.root)?.apply(&PolicyDesired::default())?;
        clear::<FlowKey, PolicyCtEntry>(&self.root, MAP_POLICY_CT)?;
        clear::<FlowKey, ExternalNatEntry>(&self.root, MAP_EXTERNAL_NAT)?;
        clear::<ServiceKey, HostPortEntry>(&self.root, MAP_HOST_PORTS)?;
        self.set_node_addresses(&[])?;
        ServiceTables::open(&self.root)?.apply(&DesiredServices::new())?;
        let mut stats: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(
            MapData::from_pin(self.root.join(MAP_STATS))?,
        ))?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        for index in 0..verdict::COUNT {
            let zero = PerCpuValues::try_from(vec![Counter::default(); cpus])?;
            stats.set(index, zero, 0)?;
        }
        Ok(())
    }

    /// A node with two pods (A and B), another node reached directly and one through
    /// VXLAN, masquerading to `NODE_IP` on the uplink with a single SNAT port.
    fn fill_maps(&self) -> Result<()> {
        let mut maps = Maps::open(&self.root)?;
        maps.write_local_cidr(Ipv4Addr::new(10, 244, 1, 0), 24)?;
        for (ip, ifindex, pod_mac, host_mac) in [
            (POD_A, self.dev.host_a, POD_A_MAC, HOST_A_MAC),
            (POD_B, self.dev.host_b, POD_B_MAC, HOST_B_MAC),
        ] {
            let endpoint = Endpoint {
                ifindex,
                pod_mac,
                host_mac,
                container_id_hash: 1,
            };
            maps.write_endpoint(ip, &endpoint)?;
        }
        maps.write_remote_route(
            Ipv4Addr::new(10, 244, 2, 0),
            24,
            ROUTE_REMOTE_NODE,
            self.dev.uplink,
            PEER_NODE,
        )?;
        maps.write_remote_route(
            Ipv4Addr::new(10, 244, 3, 0),
            24,
            ROUTE_REMOTE_TUNNEL,
            self.dev.tunnel,
            TUNNEL_PEER,
        )?;
        datapath::write_config(
            &self.root,
            &NodeConfig {
                node_ip: NODE_IP.octets(),
                uplink_ifindex: self.dev.uplink,
                tunnel_ifindex: self.dev.tunnel,
                vni: VNI,
                nat_port_min: NAT_PORT,
                nat_port_max: NAT_PORT,
                layout_version: mycni_common::LAYOUT_VERSION,
            },
        )?;
        datapath::write_no_masquerade(&self.root, &[(Ipv4Addr::new(10, 244, 0, 0), 16)])?;
        datapath::write_peers(&self.root, &[PEER_NODE, TUNNEL_PEER])?;
        Ok(())
    }

    fn program(&self, name: &str) -> Result<&SchedClassifier> {
        self.programs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p)
            .with_context(|| format!("program {name}"))
    }

    /// Runs `program` once on `frame` as if it arrived on `ifindex` with `mark`.
    fn run_marked(&self, program: &str, ifindex: u32, mark: u32, frame: &[u8]) -> Result<Run> {
        self.run_with(program, ifindex, mark, [0; 2], frame)
    }

    /// Runs `program` once on `frame` as if it arrived on `ifindex` with `mark` and
    /// `cb[0..2]` set to `cb`.
    fn run_with(
        &self,
        program: &str,
        ifindex: u32,
        mark: u32,
        cb: [u32; 2],
        frame: &[u8],
    ) -> Result<Run> {
        let program = self.program(program)?;
        let mut ctx_in = [0u32; SKB_WORDS];
        ctx_in[SKB_MARK] = mark;
        ctx_in[SKB_IFINDEX] = ifindex;
        ctx_in[SKB_CB..SKB_CB + 2].copy_from_slice(&cb);
        let ctx_in: Vec<u8> = ctx_in.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut ctx_out = vec![0u8; SKB_WORDS * 4];
        let mut data_out = vec![0u8; 4096];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })?;
        let word = |i: usize| u32::from_ne_bytes(ctx_out[i * 4..i * 4 + 4].try_into().unwrap());
        Ok(Run {
            action: result.return_value,
            frame: data_out[..result.data_size_out as usize].to_vec(),
            mark: word(SKB_MARK),
        })
    }

    fn run(&self, program: &str, ifindex: u32, frame: &[u8]) -> Result<Run> {
        self.run_marked(program, ifindex, 0, frame)
    }

    /// Packets counted under each verdict so far.
    fn counts(&self) -> Result<Vec<u64>> {
        Ok(datapath::read_stats(&self.root)?
            .iter()
            .map(|c| c.packets)
            .collect())
    }

    /// Checks that exactly the verdicts in `expected` were counted, as often as listed.
    fn expect_counts(&self, expected: &[(u32, u64)]) -> Result<()> {
        self.expect_counts_since(&vec![0; verdict::COUNT as usize], expected)
    }

    /// Checks that, since `before` was read, exactly the verdicts in `expected` were
    /// counted, as often as listed.
    fn expect_counts_since(&self, before: &[u64], expected: &[(u32, u64)]) -> Result<()> {
        let now = self.counts()?;
        let delta: Vec<u64> = now.iter().zip(before).map(|(n, b)| n - b).collect();
        for (index, count) in delta.iter().enumerate() {
            let want = expected
                .iter()
                .find(|(v, _)| *v as usize == index)
                .map_or(0, |(_, n)| *n);
            ensure!(
                *count == want,
                "verdict {} counted {count} packets, expected {want} (all: {:?})",
                verdict::NAMES[index],
                named(&delta)
            );
        }
        Ok(())
    }

    fn fragments(&self) -> Result<BpfHashMap<MapData, FragmentKey, FragmentEntry>> {
        let data = MapData::from_pin(self.root.join(MAP_FRAGMENTS))?;
        Ok(BpfHashMap::try_from(Map::LruHashMap(data))?)
    }

    /// The reply tuples `STACK_FLOWS` holds.
    fn stack_flows(&self) -> Result<Vec<FlowKey>> {
        let data = MapData::from_pin(self.root.join(MAP_STACK_FLOWS))?;
        let map: BpfHashMap<MapData, FlowKey, u64> = BpfHashMap::try_from(Map::LruHashMap(data))?;
        Ok(map.keys().collect::<Result<_, _>>()?)
    }
}

impl Datapath {
    /// Writes `desired` to the policy maps as the agent would (revision bumped).
    fn apply_policy(&self, desired: &PolicyDesired) -> Result<()> {
        PolicyTables::open(&self.root)?.apply(desired)?;
        Ok(())
    }

    /// Policy drops counted for `pod`, summed over CPUs.
    fn policy_drops(&self, pod: Ipv4Addr) -> Result<PolicyDrops> {
        Ok(PolicyTables::open(&self.root)?
            .drops()?
            .get(&pod)
            .copied()
            .unwrap_or_default())
    }

    /// The flows `POLICY_CT` tracks.
    fn tracked(&self) -> Result<Vec<(FlowKey, PolicyCtEntry)>> {
        Ok(PolicyTables::open(&self.root)?.connections()?)
    }
}

fn named(counts: &[u64]) -> Vec<(&'static str, u64)> {
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| (verdict::NAMES[i], *n))
        .collect()
}

/// The ifindex of a device in the lab's namespace.
fn ifindex(name: &str) -> Result<u32> {
    let out = run(Command::new("ip").args(["-o", "link", "show", "dev", name]))?;
    let out = String::from_utf8_lossy(&out.stdout);
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("ifindex of {name} in {out:?}"))
}

/// Removes every entry of the hash map pinned as `name`.
fn clear<K: Pod, V: Pod>(root: &Path, name: &str) -> Result<()> {
    let data = MapData::from_pin(root.join(name))?;
    let mut map: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(Map::LruHashMap(data))?;
    let keys: Vec<K> = map.keys().collect::<Result<_, _>>()?;
    for key in keys {
        map.remove(&key)?;
    }
    Ok(())
}

/// The pin of the tunnel shim, beside the datapath's programs.
const TUNNEL_SHIM: &str = "tunnel_shim";
/// What the tunnel shim returns when its tail call into `from_netdev` fails.
const SHIM_TAIL_CALL_FAILED: u32 = 99;

/// A packet the VXLAN device decapsulated carries its tunnel key as skb metadata, which
/// `BPF_PROG_TEST_RUN` cannot supply. The shim, a few hand-assembled instructions, sets the
/// key from `cb[0]` (VNI) and `cb[1]` (sender, host order) with `bpf_skb_set_tunnel_key`
/// (the kernel reports the key's `local_ipv4` as the remote end to
/// `bpf_skb_get_tunnel_key`) and tail-calls `from_netdev`, whose result is then the run's.
/// A thin adapter over the `bpf()` syscall: aya loads programs only from objects.
mod tunnel_shim {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;

    use anyhow::{bail, Context, Result};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    const HELPER_TAIL_CALL: i32 = 12;
    const HELPER_SKB_SET_TUNNEL_KEY: i32 = 21;
    /// `sizeof(struct bpf_tunnel_key)`, and where its `local_ipv4` sits.
    const TUNNEL_KEY_LEN: i32 = 44;
    const TUNNEL_KEY_LOCAL_IPV4: i16 = 28;
    /// `offsetof(struct __sk_buff, cb)`.
    const SKB_CB_OFF: i16 = 48;
    /// Where the key sits on the shim's stack (below r10).
    const KEY: i16 = -48;

    /// A `bpf()` attribute block: the kernel reads the first fields of the command's
    /// member of `union bpf_attr` and wants the rest zero.
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }

        fn u32(&mut self, offset: usize, value: u32) -> &mut Attr {
            self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
            self
        }

        fn u64(&mut self, offset: usize, value: u64) -> &mut Attr {
            self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
            self
        }
    }

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a valid, writable 128-byte block that outlives the call; every
        // pointer stored in it points to memory the caller keeps alive across the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.0.as_mut_ptr(),
                attr.0.len() as libc::c_uint,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ret)
    }

    /// Runs a `bpf()` command that returns a new fd.
    fn bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<OwnedFd> {
        let fd = bpf(cmd, attr)?;
        // SAFETY: these commands return a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// One `struct bpf_insn`.
    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut raw = [0u8; 8];
        raw[0] = code;
        raw[1] = (src << 4) | dst;
        raw[2..4].copy_from_slice(&off.to_le_bytes());
        raw[4..8].copy_from_slice(&imm.to_le_bytes());
        raw
    }

    /// The shim's instructions, tail-calling through the program array `array`.
    fn program(array: i32) -> Vec<u8> {
        const R0: u8 = 0;
        const R1: u8 = 1;
        const R2: u8 = 2;
        const R3: u8 = 3;
        const R4: u8 = 4;
        const R6: u8 = 6;
        const R10: u8 = 10;
        let mut code = vec![insn(0xbf, R6, R1, 0, 0)]; // r6 = r1 (the context)
        for off in (KEY..0).step_by(8) {
            code.push(insn(0x7a, R10, 0, off, 0)); // *(u64 *)(r10 + off) = 0
        }
        code.extend([
            insn(0x61, R2, R6, SKB_CB_OFF, 0),                   // r2 = cb[0]
            insn(0x63, R10, R2, KEY, 0),                         // key.tunnel_id = r2
            insn(0x61, R2, R6, SKB_CB_OFF + 4, 0),               // r2 = cb[1]
            insn(0x63, R10, R2, KEY + TUNNEL_KEY_LOCAL_IPV4, 0), // key.local_ipv4 = r2
            insn(0xbf, R1, R6, 0, 0),                            // r1 = ctx
            insn(0xbf, R2, R10, 0, 0),                           // r2 = r10
            insn(0x07, R2, 0, 0, KEY as i32),                    // r2 += KEY
            insn(0xb7, R3, 0, 0, TUNNEL_KEY_LEN),                // r3 = sizeof key
            insn(0xb7, R4, 0, 0, 0),                             // r4 = 0 (flags)
            insn(0x85, 0, 0, 0, HELPER_SKB_SET_TUNNEL_KEY),      // call
            insn(0xbf, R1, R6, 0, 0),                            // r1 = ctx
            insn(0x18, R2, BPF_PSEUDO_MAP_FD, 0, array),         // r2 = the array
            insn(0, 0, 0, 0, 0),                                 //   (its upper half)
            insn(0xb7, R3, 0, 0, 0),                             // r3 = 0 (the slot)
            insn(0x85, 0, 0, 0, HELPER_TAIL_CALL),               // call: no return
            insn(0xb7, R0, 0, 0, super::SHIM_TAIL_CALL_FAILED as i32), // r0 = failed
            insn(0x95, 0, 0, 0, 0),                              // exit
        ]);
        code.concat()
    }

    /// Loads the shim with a one-slot program array holding the program pinned at
    /// `from_netdev`, and pins the shim at `pin`. Returns the array (keep it open).
    pub fn load(from_netdev: &Path, pin: &Path) -> Result<OwnedFd> {
        let array = bpf_fd(
            BPF_MAP_CREATE,
            Attr::new()
                .u32(0, BPF_MAP_TYPE_PROG_ARRAY)
                .u32(4, 4)
                .u32(8, 4)
                .u32(12, 1),
        )
        .context("creating the program array")?;
        let code = program(array.as_raw_fd());
        let license = CString::new("GPL")?;
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = Attr::new();
        attr.u32(0, BPF_PROG_TYPE_SCHED_CLS)
            .u32(4, (code.len() / 8) as u32)
            .u64(8, code.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, 1)
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64);
        let shim = match bpf_fd(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => fd,
            Err(e) => {
                let log = String::from_utf8_lossy(&log);
                bail!(
                    "loading the tunnel shim: {e}\n{}",
                    log.trim_end_matches('\0')
                );
            }
        };
        let target_path = CString::new(from_netdev.as_os_str().as_encoded_bytes())?;
        let target = bpf_fd(BPF_OBJ_GET, Attr::new().u64(0, target_path.as_ptr() as u64))
            .context("opening from_netdev's pin")?;
        let slot = 0u32;
        let value = target.as_raw_fd() as u32;
        bpf(
            BPF_MAP_UPDATE_ELEM,
            Attr::new()
                .u32(0, array.as_raw_fd() as u32)
                .u64(8, &slot as *const u32 as u64)
                .u64(16, &value as *const u32 as u64),
        )
        .context("putting from_netdev in the program array")?;
        let pin_path = CString::new(pin.as_os_str().as_encoded_bytes())?;
        bpf(
            BPF_OBJ_PIN,
            Attr::new()
                .u64(0, pin_path.as_ptr() as u64)
                .u32(8, shim.as_raw_fd() as u32),
        )
        .context("pinning the tunnel shim")?;
        Ok(array)
    }
}

// ---- Crafted packets ----

/// An IPv4 header's variable parts; the rest is fixed (no options, no DF).
#[derive(Clone, Copy)]
struct Ip {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    id: u16,
    /// Flags and fragment offset (in 8-byte units), as on the wire.
    frag: u16,
}

const MORE_FRAGMENTS: u16 = 0x2000;

fn ip(src: Ipv4Addr, dst: Ipv4Addr) -> Ip {
    Ip {
        src,
        dst,
        ttl: 64,
        id: 0x4242,
        frag: 0,
    }
}

impl Ip {
    fn packet(self, proto: u8, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut header = vec![0x45, 0];
        header.extend_from_slice(&total.to_be_bytes());
        header.extend_from_slice(&self.id.to_be_bytes());
        header.extend_from_slice(&self.frag.to_be_bytes());
        header.extend_from_slice(&[self.ttl, proto, 0, 0]);
        header.extend_from_slice(&self.src.octets());
        header.extend_from_slice(&self.dst.octets());
        let sum = raw::checksum(0, &header);
        header[10..12].copy_from_slice(&sum.to_be_bytes());
        header.extend_from_slice(payload);
        header
    }

    fn tcp(self, sport: u16, dport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        let sum = raw::checksum(pseudo_sum(self.src, self.dst, IPPROTO_TCP, tcp.len()), &tcp);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        self.packet(IPPROTO_TCP, &tcp)
    }

    /// UDP with its checksum (over the whole datagram, as a first fragment carries it).
    fn udp(self, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let sum = raw::checksum(pseudo_sum(self.src, self.dst, IPPROTO_UDP, udp.len()), &udp);
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        self.packet(IPPROTO_UDP, &udp)
    }

    fn echo_request(self, id: u16) -> Vec<u8> {
        let mut rest = id.to_be_bytes().to_vec();
        rest.extend_from_slice(&[0, 1, b'p', b'i', b'n', b'g']);
        self.packet(IPPROTO_ICMP, &raw::icmp4(8, 0, &rest))
    }
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    pseudo
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum()
}

/// A pod's frame to its gateway MAC (the host veth).
fn from_pod_a(packet: &[u8]) -> Vec<u8> {
    raw::ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, packet)
}

/// A frame arriving on the uplink from the router.
fn from_router(packet: &[u8]) -> Vec<u8> {
    raw::ethernet(UPLINK_MAC, ROUTER_MAC, ETH_P_IP, packet)
}

/// The fields of an Ethernet + IPv4 frame a test checks.
#[derive(Debug, PartialEq)]
struct Seen {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    proto: u8,
    /// TCP/UDP ports or the ICMP echo identifier (as both).
    sport: u16,
    dport: u16,
}

fn seen(frame: &[u8]) -> Result<Seen> {
    ensure!(frame.len() >= 14 + 20 + 8, "frame too short: {frame:02x?}");
    let ip = &frame[14..];
    let l4 = &ip[((ip[0] & 0x0f) as usize) * 4..];
    let (sport, dport) = match ip[9] {
        IPPROTO_ICMP => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (id, id)
        }
        _ => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
    };
    Ok(Seen {
        eth_dst: frame[0..6].try_into()?,
        eth_src: frame[6..12].try_into()?,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        proto: ip[9],
        sport,
        dport,
    })
}

/// Fails unless the IPv4 header checksum and (for a packet that carries its whole L4
/// header and is not a later fragment) the TCP, UDP or ICMP checksum verify.
fn checksums_verify(frame: &[u8]) -> Result<()> {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    ensure!(
        raw::checksum(0, &ip[..ihl]) == 0,
        "IPv4 header checksum does not verify: {:02x?}",
        &ip[..ihl]
    );
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return Ok(());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    let sum = match ip[9] {
        IPPROTO_TCP | IPPROTO_UDP => raw::checksum(pseudo_sum(src, dst, ip[9], l4.len()), l4),
        IPPROTO_ICMP => raw::checksum(0, l4),
        _ => 0,
    };
    ensure!(
        sum == 0,
        "proto {} checksum does not verify: {l4:02x?}",
        ip[9]
    );
    Ok(())
}

fn expect_action(run: &Run, action: u32) -> Result<()> {
    ensure!(
        run.action == action,
        "returned {} where {action} was expected",
        run.action
    );
    Ok(())
}

// ---- from_pod ----

#[test]
fn a_pod_sending_from_another_pods_address_is_dropped_as_spoofed() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // Pod B's address, sent from pod A's veth; then an address no pod holds.
        for src in [POD_B, Ipv4Addr::new(10, 9, 9, 9)] {
            let frame = from_pod_a(&ip(src, OUTSIDE).udp(1000, 53, b"q"));
            let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &frame)?;
            expect_action(&run, TC_ACT_SHOT)?;
        }
        dp.expect_counts(&[(verdict::DROP_SPOOFED, 2)])?;
        // The same packet from the pod's own address passes (to the stack: no route).
        let frame = from_pod_a(&ip(POD_A, OUTSIDE).udp(1000, 53, b"q"));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &frame)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            run.frame == frame,
            "a packet to the stack must leave untouched"
        );
        dp.expect_counts(&[(verdict::DROP_SPOOFED, 2), (verdict::TO_STACK, 1)])
    })
}

#[test]
fn a_pods_arp_request_is_answered_with_its_host_veth_mac() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let request = raw::ethernet(
            [0xff; 6],
            POD_A_MAC,
            ETH_P_ARP,
            &raw::arp(ARP_REQUEST, POD_A_MAC, POD_A, [0; 6], GATEWAY),
        );
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &request)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let reply = raw::ethernet(
            POD_A_MAC,
            HOST_A_MAC,
            ETH_P_ARP,
            &raw::arp(ARP_REPLY, HOST_A_MAC, GATEWAY, POD_A_MAC, POD_A),
        );
        ensure!(
            run.frame == reply,
            "not the expected ARP reply:\n{:02x?}\n{reply:02x?}",
            run.frame
        );
        dp.expect_counts(&[(verdict::ARP_REPLY, 1)])
    })
}

#[test]
fn a_pods_arp_with_another_mac_or_address_is_dropped_as_spoofed() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let foreign_mac = [0x02, 0xde, 0xad, 0, 0, 1];
        for (sha, spa) in [(foreign_mac, POD_A), (POD_A_MAC, POD_B)] {
            let request = raw::ethernet(
                [0xff; 6],
                sha,
                ETH_P_ARP,
                &raw::arp(ARP_REQUEST, sha, spa, [0; 6], GATEWAY),
            );
            let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &request)?;
            expect_action(&run, TC_ACT_SHOT)?;
        }
        dp.expect_counts(&[(verdict::DROP_SPOOFED, 2)])
    })
}

#[test]
fn a_packet_for_a_local_pod_is_redirected_with_its_ttl_decremented() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let frame = from_pod_a(&ip(POD_A, POD_B).tcp(40000, 80, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &frame)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let out = seen(&run.frame)?;
        ensure!(
            (out.eth_dst, out.eth_src, out.ttl) == (POD_B_MAC, HOST_B_MAC, 63),
            "MACs or TTL not rewritten: {out:?}"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::LOCAL_REDIRECT, 1)])
    })
}

#[test]
fn a_packet_whose_ttl_expires_goes_to_the_stack_untouched() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let expiring = Ip {
            ttl: 1,
            ..ip(POD_A, POD_B)
        };
        let frame = from_pod_a(&expiring.tcp(40000, 80, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &frame)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(run.frame == frame, "the expiring packet was changed");
        dp.expect_counts(&[(verdict::TO_STACK, 1)])
    })
}

#[test]
fn a_packet_for_another_nodes_pod_goes_out_directly_or_through_vxlan() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let direct = dp.run(
            PROG_FROM_POD,
            dp.dev.host_a,
            &from_pod_a(&ip(POD_A, REMOTE_POD).udp(5000, 53, b"q")),
        )?;
        expect_action(&direct, TC_ACT_REDIRECT)?;
        let tunnel = dp.run(
            PROG_FROM_POD,
            dp.dev.host_a,
            &from_pod_a(&ip(POD_A, TUNNEL_POD).udp(5000, 53, b"q")),
        )?;
        expect_action(&tunnel, TC_ACT_REDIRECT)?;
        for run in [&direct, &tunnel] {
            // Marked so to_netdev leaves them untranslated.
            ensure!(
                run.mark & MARK_FROM_POD == MARK_FROM_POD,
                "mark {:#x}",
                run.mark
            );
            ensure!(seen(&run.frame)?.ttl == 63, "TTL not decremented");
            checksums_verify(&run.frame)?;
        }
        dp.expect_counts(&[(verdict::REMOTE_DIRECT, 1), (verdict::REMOTE_TUNNEL, 1)])
    })
}

#[test]
fn an_address_of_the_pod_cidr_no_pod_holds_goes_to_the_stack_as_unassigned() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let frame = from_pod_a(&ip(POD_A, UNASSIGNED).udp(5000, 53, b"q"));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &frame)?;
        expect_action(&run, TC_ACT_OK)?;
        dp.expect_counts(&[(verdict::TO_UNASSIGNED, 1)])
    })
}

#[test]
fn a_pods_ipv6_and_malformed_ipv4_are_dropped() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let ipv6 = raw::ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IPV6, &[0x60; 40]);
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &ipv6)?, TC_ACT_SHOT)?;
        // Version 5 in an IPv4 frame.
        let mut bad = ip(POD_A, OUTSIDE).udp(1, 2, b"x");
        bad[0] = 0x55;
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &from_pod_a(&bad))?,
            TC_ACT_SHOT,
        )?;
        dp.expect_counts(&[(verdict::DROP_IPV6, 1), (verdict::DROP_MALFORMED, 1)])
    })
}

#[test]
fn a_reply_in_a_flow_the_stack_delivered_goes_back_through_the_stack() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // The stack (say, after kube-proxy's DNAT) delivers pod B's connection to pod A.
        let delivered = raw::ethernet(
            POD_A_MAC,
            HOST_A_MAC,
            ETH_P_IP,
            &ip(POD_B, POD_A).tcp(5000, 80, TCP_SYN, 1, 0),
        );
        expect_action(&dp.run(PROG_TO_POD, dp.dev.host_a, &delivered)?, TC_ACT_OK)?;
        // Pod A's answer is not short-cut into pod B.
        let reply = from_pod_a(&ip(POD_A, POD_B).tcp(80, 5000, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &reply)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            run.frame == reply,
            "a stack flow's reply must reach the stack untouched"
        );
        // Another flow between the same pods is still redirected.
        let other = from_pod_a(&ip(POD_A, POD_B).tcp(81, 5000, TCP_SYN, 9, 0));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &other)?,
            TC_ACT_REDIRECT,
        )?;
        dp.expect_counts(&[(verdict::STACK_FLOW_REPLY, 1), (verdict::LOCAL_REDIRECT, 1)])
    })
}

#[test]
fn a_connection_a_pod_opens_directly_drops_a_stale_stack_flow_with_its_ports() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // Pod B reached pod A through the stack (a ClusterIP): A's replies to B:5000 from
        // port 80 go back through the stack while that lasts.
        let delivered = raw::ethernet(
            POD_A_MAC,
            HOST_A_MAC,
            ETH_P_IP,
            &ip(POD_B, POD_A).tcp(5000, 80, TCP_SYN, 1, 0),
        );
        expect_action(&dp.run(PROG_TO_POD, dp.dev.host_a, &delivered)?, TC_ACT_OK)?;
        ensure!(
            dp.stack_flows()?.len() == 1,
            "the stack flow was not remembered"
        );
        // Later B opens a connection straight to A from the same port: the old entry is
        // stale (the stack's conntrack would mistranslate the replies and the connection
        // would hang).
        let direct = from_pod_b(&ip(POD_B, POD_A).tcp(5000, 80, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_b, &direct)?,
            TC_ACT_REDIRECT,
        )?;
        ensure!(
            dp.stack_flows()?.is_empty(),
            "the stale stack flow was kept: {:?}",
            dp.stack_flows()?
        );
        // So A's answer goes straight back to B.
        let answer = from_pod_a(&ip(POD_A, POD_B).tcp(80, 5000, TCP_SYN | TCP_ACK, 9, 2));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &answer)?,
            TC_ACT_REDIRECT,
        )?;
        // A segment that opens nothing (an ACK) keeps a live stack flow's entry.
        expect_action(&dp.run(PROG_TO_POD, dp.dev.host_a, &delivered)?, TC_ACT_OK)?;
        let ack = from_pod_b(&ip(POD_B, POD_A).tcp(5000, 80, TCP_ACK, 2, 10));
        dp.run(PROG_FROM_POD, dp.dev.host_b, &ack)?;
        ensure!(
            dp.stack_flows()?.len() == 1,
            "an ACK dropped the stack flow"
        );
        dp.expect_counts(&[(verdict::LOCAL_REDIRECT, 3)])
    })
}

// ---- to_netdev and from_netdev: SNAT and reverse NAT ----

#[test]
fn tcp_leaving_the_cluster_is_masqueraded_and_its_reply_translated_back() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let syn = from_router(&ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_SYN, 100, 0));
        let out = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&out, TC_ACT_OK)?;
        let leaving = seen(&out.frame)?;
        ensure!(
            (leaving.src, leaving.sport, leaving.dst, leaving.dport)
                == (NODE_IP, NAT_PORT, OUTSIDE, 443),
            "not masqueraded: {leaving:?}"
        );
        checksums_verify(&out.frame)?;
        // Both halves of the flow are recorded, with the SYN seen.
        let entries = NatTable::open(&dp.root)?.entries()?;
        let forward = entries
            .iter()
            .find(|(k, e)| e.direction == NAT_EGRESS && k.saddr == POD_A.octets())
            .context("no egress NAT entry")?;
        ensure!(forward.1.port == NAT_PORT && forward.1.state & nat_state::TCP_SYN != 0);
        ensure!(
            entries.iter().any(|(_, e)| e.direction == NAT_INGRESS),
            "no ingress entry"
        );

        let syn_ack =
            from_router(&ip(OUTSIDE, NODE_IP).tcp(443, NAT_PORT, TCP_SYN | TCP_ACK, 7, 101));
        let back = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn_ack)?;
        expect_action(&back, TC_ACT_OK)?;
        let arriving = seen(&back.frame)?;
        ensure!(
            (arriving.src, arriving.sport, arriving.dst, arriving.dport)
                == (OUTSIDE, 443, POD_A, 40000),
            "not translated back: {arriving:?}"
        );
        checksums_verify(&back.frame)?;
        ensure!(
            back.mark & MARK_REVERSE_NAT == MARK_REVERSE_NAT,
            "reverse-NATed packets are marked for to_pod, mark {:#x}",
            back.mark
        );
        let replied = NatTable::open(&dp.root)?
            .entries()?
            .into_iter()
            .all(|(_, e)| e.state & nat_state::REPLIED != 0);
        ensure!(replied, "the reply is not recorded in both entries");
        dp.expect_counts(&[(verdict::SNAT, 1), (verdict::REVERSE_NAT, 1)])
    })
}

#[test]
fn udp_and_icmp_echo_are_masqueraded_and_translated_back() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let udp = from_router(&ip(POD_A, OUTSIDE).udp(5353, 53, b"query"));
        let out = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &udp)?;
        expect_action(&out, TC_ACT_OK)?;
        ensure!(
            seen(&out.frame)?.src == NODE_IP && seen(&out.frame)?.sport == NAT_PORT,
            "UDP not masqueraded: {:?}",
            seen(&out.frame)?
        );
        checksums_verify(&out.frame)?;
        let answer = from_router(&ip(OUTSIDE, NODE_IP).udp(53, NAT_PORT, b"answer"));
        let back = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &answer)?;
        expect_action(&back, TC_ACT_OK)?;
        let arriving = seen(&back.frame)?;
        ensure!(
            (arriving.dst, arriving.dport) == (POD_A, 5353),
            "{arriving:?}"
        );
        checksums_verify(&back.frame)?;

        // An echo request: its identifier is the "port" (the same single port: another proto).
        let ping = from_router(&ip(POD_A, OUTSIDE).echo_request(0x77));
        let out = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &ping)?;
        expect_action(&out, TC_ACT_OK)?;
        let leaving = seen(&out.frame)?;
        ensure!(
            (leaving.src, leaving.sport) == (NODE_IP, NAT_PORT),
            "{leaving:?}"
        );
        checksums_verify(&out.frame)?;
        let mut rest = NAT_PORT.to_be_bytes().to_vec();
        rest.extend_from_slice(&[0, 1, b'p', b'i', b'n', b'g']);
        let pong =
            from_router(&ip(OUTSIDE, NODE_IP).packet(IPPROTO_ICMP, &raw::icmp4(0, 0, &rest)));
        let back = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &pong)?;
        expect_action(&back, TC_ACT_OK)?;
        let arriving = seen(&back.frame)?;
        ensure!(
            (arriving.dst, arriving.dport) == (POD_A, 0x77),
            "{arriving:?}"
        );
        checksums_verify(&back.frame)?;
        dp.expect_counts(&[(verdict::SNAT, 2), (verdict::REVERSE_NAT, 2)])
    })
}

#[test]
fn traffic_to_the_cluster_or_from_the_node_is_not_masqueraded() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // A pod's packet to another node's pod that the stack routed (NO_MASQ, and a route).
        let to_cluster = from_router(&ip(POD_A, REMOTE_POD).udp(5000, 53, b"q"));
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &to_cluster)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(run.frame == to_cluster, "cluster traffic was changed");
        // The node's own packet.
        let own = from_router(&ip(NODE_IP, OUTSIDE).udp(5000, 53, b"q"));
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &own)?;
        ensure!(run.frame == own, "the node's own traffic was changed");
        // What from_pod sent to another node itself.
        let marked = from_router(&ip(POD_A, OUTSIDE).udp(5000, 53, b"q"));
        let run = dp.run_marked(PROG_TO_NETDEV, dp.dev.uplink, MARK_FROM_POD, &marked)?;
        ensure!(
            run.frame == marked && run.mark & MARK_FROM_POD == 0,
            "mark {:#x}",
            run.mark
        );
        // to_netdev counts only what it does (the uncounted verdict is to_stack).
        dp.expect_counts(&[])
    })
}

#[test]
fn what_snat_cannot_translate_is_dropped_not_leaked() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let gre = from_router(&ip(POD_A, OUTSIDE).packet(IPPROTO_GRE, &[0; 24]));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &gre)?, TC_ACT_SHOT)?;
        dp.expect_counts(&[(verdict::DROP_UNTRANSLATABLE, 1)])
    })
}

#[test]
fn a_new_tcp_flow_without_a_free_port_is_refused_with_a_reset() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // The single port goes to the first flow (still open).
        let first = from_router(&ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_SYN, 100, 0));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &first)?, TC_ACT_OK)?;
        // A second connection to the same peer and port: pod B is told at once.
        let second = from_router(&ip(POD_B, OUTSIDE).tcp(40001, 443, TCP_SYN, 555, 0));
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &second)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let rst = seen(&run.frame)?;
        ensure!(
            (
                rst.eth_dst,
                rst.eth_src,
                rst.src,
                rst.dst,
                rst.sport,
                rst.dport
            ) == (POD_B_MAC, HOST_B_MAC, OUTSIDE, POD_B, 443, 40001),
            "not a reset to pod B: {rst:?}"
        );
        let tcp = &run.frame[14 + 20..];
        ensure!(
            tcp[13] == TCP_RST | TCP_ACK && tcp[8..12] == 556u32.to_be_bytes(),
            "flags {:#x}, ack {:02x?}",
            tcp[13],
            &tcp[8..12]
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::SNAT, 1), (verdict::DROP_NAT_EXHAUSTED, 1)])
    })
}

#[test]
fn a_new_udp_flow_without_a_free_port_is_refused_with_icmp_prohibited() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let first = from_router(&ip(POD_A, OUTSIDE).udp(5353, 53, b"first"));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &first)?, TC_ACT_OK)?;
        let datagram = ip(POD_B, OUTSIDE).udp(5354, 53, b"second query");
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &from_router(&datagram))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let out = seen(&run.frame)?;
        ensure!(
            (out.eth_dst, out.eth_src, out.src, out.dst, out.proto)
                == (POD_B_MAC, HOST_B_MAC, NODE_IP, POD_B, IPPROTO_ICMP),
            "not an ICMP error to pod B: {out:?}"
        );
        let icmp = &run.frame[14 + 20..];
        ensure!(
            icmp[..2] == [3, 13] && icmp[8..] == datagram[..28],
            "not a \"communication administratively prohibited\" quoting the datagram: {icmp:02x?}"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::SNAT, 1), (verdict::DROP_NAT_EXHAUSTED, 1)])
    })
}

#[test]
fn a_new_tcp_connection_takes_over_the_port_of_a_reset_one() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let syn = from_router(&ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_SYN, 100, 0));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &syn)?, TC_ACT_OK)?;
        let rst = from_router(&ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_RST, 101, 0));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &rst)?, TC_ACT_OK)?;
        // The only port is held by a closed connection: pod B's SYN gets it.
        let other = from_router(&ip(POD_B, OUTSIDE).tcp(40001, 443, TCP_SYN, 555, 0));
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &other)?;
        expect_action(&run, TC_ACT_OK)?;
        let leaving = seen(&run.frame)?;
        ensure!(
            (leaving.src, leaving.sport) == (NODE_IP, NAT_PORT),
            "not masqueraded to the freed port: {leaving:?}"
        );
        let entries = NatTable::open(&dp.root)?.entries()?;
        ensure!(
            entries.len() == 2
                && entries
                    .iter()
                    .all(|(k, e)| k.saddr == POD_B.octets() || e.addr == POD_B.octets()),
            "the reset flow's entries are still there: {entries:?}"
        );
        dp.expect_counts(&[(verdict::SNAT, 3)])
    })
}

#[test]
fn a_pods_icmp_error_about_a_masqueraded_flow_leaves_from_the_node_ip() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let query = from_router(&ip(POD_A, OUTSIDE).udp(5353, 53, b"q"));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &query)?, TC_ACT_OK)?;
        // The answer, translated back, reaches the pod, whose socket is gone by then.
        let answer = ip(OUTSIDE, POD_A).udp(53, 5353, b"late answer");
        let mut rest = vec![0; 4];
        rest.extend_from_slice(&answer[..28]);
        let unreachable = ip(POD_A, OUTSIDE).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &rest));
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &from_router(&unreachable))?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            seen(&run.frame)?.src == NODE_IP,
            "the error leaks the pod's address"
        );
        let inner = &run.frame[14 + 20 + 8..];
        ensure!(
            inner[16..20] == NODE_IP.octets() && inner[22..24] == NAT_PORT.to_be_bytes(),
            "the quote still names the pod: {inner:02x?}"
        );
        ensure!(
            raw::checksum(0, &inner[..20]) == 0,
            "quoted IP header checksum"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::SNAT, 1), (verdict::ICMP_ERROR_TRANSLATED, 1)])
    })
}

#[test]
fn to_pod_remembers_what_the_stack_delivers_but_not_reverse_nat_replies() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let reply = raw::ethernet(
            POD_A_MAC,
            HOST_A_MAC,
            ETH_P_IP,
            &ip(OUTSIDE, POD_A).tcp(443, 40000, TCP_SYN | TCP_ACK, 7, 101),
        );
        let run = dp.run_marked(PROG_TO_POD, dp.dev.host_a, MARK_REVERSE_NAT, &reply)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            run.mark & MARK_REVERSE_NAT == 0,
            "mark {:#x} kept",
            run.mark
        );
        ensure!(
            dp.stack_flows()?.is_empty(),
            "a reverse-NATed reply was remembered"
        );
        expect_action(&dp.run(PROG_TO_POD, dp.dev.host_a, &reply)?, TC_ACT_OK)?;
        let remembered = dp.stack_flows()?;
        let expected = FlowKey {
            saddr: POD_A.octets(),
            daddr: OUTSIDE.octets(),
            sport: 40000,
            dport: 443,
            proto: IPPROTO_TCP,
            pad: [0; 3],
        };
        ensure!(remembered == [expected], "remembered {remembered:?}");
        // to_pod counts nothing.
        dp.expect_counts(&[])
    })
}

// ---- Fragments ----

#[test]
fn a_later_fragment_follows_its_first_and_an_untracked_one_is_dropped() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let first = Ip {
            frag: MORE_FRAGMENTS,
            id: 0x1111,
            ..ip(POD_A, OUTSIDE)
        };
        // The first fragment carries the UDP header (its checksum covers the whole datagram).
        let run = dp.run(
            PROG_TO_NETDEV,
            dp.dev.uplink,
            &from_router(&first.udp(5353, 53, &[0xab; 16])),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            seen(&run.frame)?.src == NODE_IP,
            "first fragment not masqueraded"
        );
        let key = FragmentKey {
            saddr: POD_A.octets(),
            daddr: OUTSIDE.octets(),
            id: 0x1111,
            proto: IPPROTO_UDP,
            pad: 0,
        };
        let tracked = dp.fragments()?.get(&key, 0)?;
        ensure!(
            tracked.action == FRAGMENT_SNAT && tracked.addr == NODE_IP.octets(),
            "first fragment recorded as {tracked:?}"
        );
        // Offset 24 bytes (3 units), no more fragments: no L4 header.
        let later = Ip { frag: 3, ..first };
        let run = dp.run(
            PROG_TO_NETDEV,
            dp.dev.uplink,
            &from_router(&later.packet(IPPROTO_UDP, &[0xcd; 16])),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        let ip_out = &run.frame[14..];
        ensure!(
            ip_out[12..16] == NODE_IP.octets() && ip_out[20..] == [0xcd; 16],
            "later fragment not given the node IP: {ip_out:02x?}"
        );
        checksums_verify(&run.frame)?;
        // A later fragment of a datagram whose first fragment never passed.
        let stray = Ip {
            id: 0x2222,
            ..later
        };
        let run = dp.run(
            PROG_TO_NETDEV,
            dp.dev.uplink,
            &from_router(&stray.packet(IPPROTO_UDP, &[0xcd; 16])),
        )?;
        expect_action(&run, TC_ACT_SHOT)?;
        dp.expect_counts(&[
            (verdict::SNAT, 1),
            (verdict::FRAGMENT_TRANSLATED, 1),
            (verdict::DROP_FRAGMENT_UNTRACKED, 1),
        ])
    })
}

#[test]
fn a_later_fragment_of_a_reply_is_translated_back_like_its_first() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let query = from_router(&ip(POD_A, OUTSIDE).udp(5353, 53, b"q"));
        expect_action(&dp.run(PROG_TO_NETDEV, dp.dev.uplink, &query)?, TC_ACT_OK)?;
        let first = Ip {
            frag: MORE_FRAGMENTS,
            id: 0x3333,
            ..ip(OUTSIDE, NODE_IP)
        };
        let run = dp.run(
            PROG_FROM_NETDEV,
            dp.dev.uplink,
            &from_router(&first.udp(53, NAT_PORT, &[1; 16])),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(seen(&run.frame)?.dst == POD_A);
        let later = Ip { frag: 3, ..first };
        let run = dp.run(
            PROG_FROM_NETDEV,
            dp.dev.uplink,
            &from_router(&later.packet(IPPROTO_UDP, &[2; 16])),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            run.frame[14 + 16..14 + 20] == POD_A.octets(),
            "later fragment not translated"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[
            (verdict::SNAT, 1),
            (verdict::REVERSE_NAT, 1),
            (verdict::FRAGMENT_TRANSLATED, 1),
        ])
    })
}

// ---- ICMP errors ----

#[test]
fn an_icmp_error_about_a_masqueraded_flow_is_translated_to_the_pod() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let syn = ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_SYN, 100, 0);
        let out = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &from_router(&syn))?;
        expect_action(&out, TC_ACT_OK)?;
        // The router's "port unreachable" quotes the packet as it left: IP header + 8 bytes.
        let quoted = &out.frame[14..14 + 28];
        let mut rest = vec![0; 4];
        rest.extend_from_slice(quoted);
        let error =
            from_router(&ip(OUTSIDE, NODE_IP).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &rest)));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &error)?;
        expect_action(&run, TC_ACT_OK)?;
        let outer = seen(&run.frame)?;
        ensure!(outer.dst == POD_A, "outer destination: {outer:?}");
        // The quote now shows the packet as the pod sent it.
        let inner = &run.frame[14 + 20 + 8..];
        ensure!(
            inner[12..16] == POD_A.octets() && inner[20..22] == 40000u16.to_be_bytes(),
            "quote not translated: {inner:02x?}"
        );
        ensure!(
            raw::checksum(0, &inner[..20]) == 0,
            "quoted IP header checksum"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::SNAT, 1), (verdict::ICMP_ERROR_TRANSLATED, 1)])
    })
}

// ---- from_netdev: other nodes and VXLAN ----

#[test]
fn a_packet_from_another_nodes_pod_is_delivered_into_the_local_pod() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let frame = from_router(&ip(REMOTE_POD, POD_A).udp(5000, 53, b"q"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &frame)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let out = seen(&run.frame)?;
        ensure!(
            (out.eth_dst, out.eth_src) == (POD_A_MAC, HOST_A_MAC),
            "MACs not rewritten: {out:?}"
        );
        // From outside the cluster: the node stack handles it.
        let outside = from_router(&ip(OUTSIDE, POD_A).udp(5000, 53, b"q"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &outside)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(run.frame == outside);
        dp.expect_counts(&[(verdict::DELIVERED_FROM_NETDEV, 1), (verdict::TO_STACK, 1)])
    })
}

#[test]
fn a_packet_on_the_vxlan_device_without_tunnel_metadata_is_dropped() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let frame = from_router(&ip(TUNNEL_POD, POD_A).udp(5000, 53, b"q"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.tunnel, &frame)?;
        expect_action(&run, TC_ACT_SHOT)?;
        dp.expect_counts(&[(verdict::DROP_TUNNEL_FOREIGN, 1)])
    })
}

#[test]
fn vxlan_from_a_foreign_vni_or_sender_is_dropped_and_from_a_peer_delivered() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let frame = from_router(&ip(TUNNEL_POD, POD_A).udp(5000, 53, b"q"));
        let cases = [
            (VNI, TUNNEL_PEER, TC_ACT_REDIRECT),
            (VNI + 1, TUNNEL_PEER, TC_ACT_SHOT),
            (VNI, OUTSIDE, TC_ACT_SHOT),
        ];
        for (vni, sender, action) in cases {
            let run = dp.run_with(TUNNEL_SHIM, dp.dev.tunnel, 0, [vni, sender.into()], &frame)?;
            ensure!(
                run.action != SHIM_TAIL_CALL_FAILED,
                "the shim could not tail-call from_netdev"
            );
            ensure!(
                run.action == action,
                "VNI {vni} from {sender}: returned {}, expected {action}",
                run.action
            );
        }
        dp.expect_counts(&[
            (verdict::DELIVERED_FROM_NETDEV, 1),
            (verdict::DROP_TUNNEL_FOREIGN, 2),
        ])
    })
}

#[test]
fn the_programs_pass_the_verifier_and_report_their_size() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        for (name, program) in dp.programs.iter().filter(|(n, _)| *n != TUNNEL_SHIM) {
            let info = program.info()?;
            let translated = info.size_translated().unwrap_or(0);
            eprintln!(
                "{name}: {translated} bytes translated, {} instructions verified",
                info.verified_instruction_count().unwrap_or(0),
            );
            if translated == 0 {
                bail!("{name} has no translated instructions");
            }
        }
        Ok(())
    })
}

// ---- NetworkPolicy ----

/// Identities: pod A, pod B, and the other node's pod CIDR.
const ID_A: u32 = 256;
const ID_B: u32 = 257;
const ID_REMOTE: u32 = 300;
/// A ClusterIP, which only the node stack (kube-proxy) translates.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Pods A and B with what each enforces, the cluster's identities (the node as `HOST`,
/// the peer node as `REMOTE_NODE`, anything else `WORLD`), and no rule yet.
fn policy(enforce_a: u8, enforce_b: u8) -> PolicyDesired {
    let mut desired = PolicyDesired::default();
    for (pod, identity, enforce) in [(POD_A, ID_A, enforce_a), (POD_B, ID_B, enforce_b)] {
        desired.endpoints.insert(
            pod,
            PolicyEndpoint {
                identity,
                enforce,
                pad: [0; 3],
            },
        );
    }
    for (net, id) in [
        ("10.244.1.2/32", ID_A),
        ("10.244.1.3/32", ID_B),
        ("10.244.2.0/24", ID_REMOTE),
        ("192.168.50.10/32", identity::HOST),
        ("192.168.50.11/32", identity::REMOTE_NODE),
    ] {
        desired
            .identities
            .insert(net.parse().expect("a test prefix"), id);
    }
    desired
}

/// Adds the key `(endpoint, peer, port, protocol, direction)` to `desired`.
fn allow(
    desired: &mut PolicyDesired,
    endpoint: Ipv4Addr,
    peer_identity: u32,
    port: u16,
    protocol: u8,
    direction: u8,
) {
    let key = PolicyKey {
        endpoint: endpoint.octets(),
        peer_identity,
        port,
        protocol,
        direction,
    };
    desired.rules.insert(key, PolicyEntry { rules: 1 });
}

fn from_pod_b(packet: &[u8]) -> Vec<u8> {
    raw::ethernet(HOST_B_MAC, POD_B_MAC, ETH_P_IP, packet)
}

/// A frame the node stack sends down a host veth to its pod.
fn to_pod_frame(pod_mac: [u8; 6], host_mac: [u8; 6], packet: &[u8]) -> Vec<u8> {
    raw::ethernet(pod_mac, host_mac, ETH_P_IP, packet)
}

#[test]
fn without_policy_every_path_passes_and_no_flow_is_tracked() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // Endpoints no policy selects: still inactive.
        dp.apply_policy(&policy(0, 0))?;
        let syn = ip(POD_A, POD_B).tcp(40000, 80, TCP_SYN, 1, 0);
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &from_pod_a(&syn))?,
            TC_ACT_REDIRECT,
        )?;
        let remote = ip(REMOTE_POD, POD_A).udp(5000, 53, b"q");
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&remote))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let probe = ip(NODE_IP, POD_B).tcp(50000, 8080, TCP_SYN, 1, 0);
        let run = dp.run(
            PROG_TO_POD,
            dp.dev.host_b,
            &to_pod_frame(POD_B_MAC, HOST_B_MAC, &probe),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            dp.tracked()?.is_empty(),
            "tracked without policy: {:?}",
            dp.tracked()?
        );
        dp.expect_counts(&[
            (verdict::LOCAL_REDIRECT, 1),
            (verdict::DELIVERED_FROM_NETDEV, 1),
        ])
    })
}

#[test]
fn default_deny_ingress_drops_a_same_node_flow_until_a_rule_allows_its_port() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let mut desired = policy(0, ENFORCE_INGRESS);
        dp.apply_policy(&desired)?;
        let syn = |dport| from_pod_a(&ip(POD_A, POD_B).tcp(40000, dport, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &syn(80))?,
            TC_ACT_SHOT,
        )?;
        ensure!(
            dp.policy_drops(POD_B)?.ingress_packets == 1,
            "B's ingress drop not counted"
        );
        ensure!(
            dp.policy_drops(POD_A)? == PolicyDrops::default(),
            "A's drops counted"
        );
        allow(&mut desired, POD_B, ID_A, 80, IPPROTO_TCP, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &syn(80))?,
            TC_ACT_REDIRECT,
        )?;
        // Another port, and another peer on the allowed port, are still denied.
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &syn(81))?,
            TC_ACT_SHOT,
        )?;
        let remote = from_router(&ip(REMOTE_POD, POD_B).tcp(40000, 80, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &remote)?,
            TC_ACT_SHOT,
        )?;
        ensure!(dp.policy_drops(POD_B)?.ingress_packets == 3);
        dp.expect_counts(&[
            (verdict::DROP_POLICY_INGRESS, 3),
            (verdict::LOCAL_REDIRECT, 1),
        ])
    })
}

#[test]
fn default_deny_egress_drops_a_pods_flows_on_every_path_out() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.apply_policy(&policy(ENFORCE_EGRESS, 0))?;
        // Redirected by from_pod: to another node's pod, directly and through VXLAN.
        for dst in [REMOTE_POD, TUNNEL_POD] {
            let frame = from_pod_a(&ip(POD_A, dst).udp(5000, 53, b"q"));
            expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &frame)?, TC_ACT_SHOT)?;
        }
        // Routed by the stack: from_pod decides nothing, to_netdev drops it...
        let out = ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_SYN, 1, 0);
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &from_pod_a(&out))?,
            TC_ACT_OK,
        )?;
        expect_action(
            &dp.run(PROG_TO_NETDEV, dp.dev.uplink, &from_pod_a(&out))?,
            TC_ACT_SHOT,
        )?;
        // ...or to_pod, for a same-node backend after kube-proxy's DNAT.
        let dnat = ip(POD_A, POD_B).tcp(40001, 8080, TCP_SYN, 1, 0);
        let run = dp.run(
            PROG_TO_POD,
            dp.dev.host_b,
            &to_pod_frame(POD_B_MAC, HOST_B_MAC, &dnat),
        )?;
        expect_action(&run, TC_ACT_SHOT)?;
        ensure!(dp.policy_drops(POD_A)?.egress_packets == 4);
        ensure!(
            !dp.tracked()?
                .iter()
                .any(|(flow, _)| flow.daddr == OUTSIDE.octets()),
            "the denied flow's entry outlived the drop"
        );
        dp.expect_counts(&[(verdict::DROP_POLICY_EGRESS, 4), (verdict::TO_STACK, 1)])
    })
}

#[test]
fn an_allowed_flow_out_of_the_cluster_is_masqueraded_and_its_reply_passes_ingress() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let mut desired = policy(ENFORCE_INGRESS | ENFORCE_EGRESS, 0);
        allow(
            &mut desired,
            POD_A,
            identity::WORLD,
            443,
            IPPROTO_TCP,
            POLICY_EGRESS,
        );
        dp.apply_policy(&desired)?;
        let out = ip(POD_A, OUTSIDE).tcp(40000, 443, TCP_SYN, 1, 0);
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &from_pod_a(&out))?,
            TC_ACT_OK,
        )?;
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &from_pod_a(&out))?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(seen(&run.frame)?.src == NODE_IP, "not masqueraded");
        // The answer, translated back by from_netdev and delivered by the stack.
        let back = ip(OUTSIDE, NODE_IP).tcp(443, NAT_PORT, TCP_SYN | TCP_ACK, 9, 2);
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&back))?;
        expect_action(&run, TC_ACT_OK)?;
        let mut delivered = run.frame.clone();
        delivered[..6].copy_from_slice(&POD_A_MAC);
        let run = dp.run_marked(PROG_TO_POD, dp.dev.host_a, run.mark, &delivered)?;
        expect_action(&run, TC_ACT_OK)?;
        // Another port of the same host stays denied.
        let other = ip(POD_A, OUTSIDE).tcp(40001, 80, TCP_SYN, 1, 0);
        expect_action(
            &dp.run(PROG_TO_NETDEV, dp.dev.uplink, &from_pod_a(&other))?,
            TC_ACT_SHOT,
        )?;
        dp.expect_counts(&[
            (verdict::TO_STACK, 1),
            (verdict::SNAT, 1),
            (verdict::REVERSE_NAT, 1),
            (verdict::DROP_POLICY_EGRESS, 1),
        ])
    })
}

#[test]
fn each_key_of_the_lookup_order_allows_and_nothing_else_does() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // (peer identity, port, protocol) of the one key written, and whether a UDP packet
        // from the other node's pod to port 53 passes with it.
        let cases = [
            (ID_REMOTE, 53, IPPROTO_UDP, true),
            (ID_REMOTE, 0, IPPROTO_UDP, true),
            (ID_REMOTE, 0, 0, true),
            (identity::ANY, 53, IPPROTO_UDP, true),
            (identity::ANY, 0, IPPROTO_UDP, true),
            (identity::ANY, 0, 0, true),
            (ID_REMOTE, 54, IPPROTO_UDP, false),
            (ID_REMOTE, 53, IPPROTO_TCP, false),
            (ID_REMOTE, 0, IPPROTO_TCP, false),
            (ID_A, 0, 0, false),
            (identity::WORLD, 53, IPPROTO_UDP, false),
            (identity::ANY, 54, 0, false),
        ];
        let frame = from_router(&ip(REMOTE_POD, POD_A).udp(5000, 53, b"q"));
        let (mut passed, mut dropped) = (0, 0);
        for (peer, port, proto, allowed) in cases {
            let mut desired = policy(ENFORCE_INGRESS, 0);
            allow(&mut desired, POD_A, peer, port, proto, POLICY_INGRESS);
            dp.apply_policy(&desired)?;
            let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &frame)?;
            let want = if allowed {
                TC_ACT_REDIRECT
            } else {
                TC_ACT_SHOT
            };
            ensure!(
                run.action == want,
                "key ({peer}, {port}, {proto}): returned {}, expected {want}",
                run.action
            );
            if allowed {
                passed += 1;
            } else {
                dropped += 1;
            }
            clear::<FlowKey, PolicyCtEntry>(&dp.root, MAP_POLICY_CT)?;
        }
        // A peer no prefix covers is WORLD.
        let mut desired = policy(ENFORCE_INGRESS, 0);
        allow(&mut desired, POD_A, identity::WORLD, 0, 0, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        let outside = ip(OUTSIDE, POD_A).tcp(443, 40000, TCP_SYN, 1, 0);
        let run = dp.run(
            PROG_TO_POD,
            dp.dev.host_a,
            &to_pod_frame(POD_A_MAC, HOST_A_MAC, &outside),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        dp.expect_counts(&[
            (verdict::DELIVERED_FROM_NETDEV, passed),
            (verdict::DROP_POLICY_INGRESS, dropped),
        ])
    })
}

#[test]
fn replies_of_an_allowed_flow_pass_a_default_deny_both_ways() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // Both pods deny everything but A's connections to B's port 80.
        let mut desired = policy(
            ENFORCE_INGRESS | ENFORCE_EGRESS,
            ENFORCE_INGRESS | ENFORCE_EGRESS,
        );
        allow(&mut desired, POD_A, ID_B, 80, IPPROTO_TCP, POLICY_EGRESS);
        allow(&mut desired, POD_B, ID_A, 80, IPPROTO_TCP, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        let syn = from_pod_a(&ip(POD_A, POD_B).tcp(40000, 80, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &syn)?,
            TC_ACT_REDIRECT,
        )?;
        let syn_ack = from_pod_b(&ip(POD_B, POD_A).tcp(80, 40000, TCP_SYN | TCP_ACK, 9, 2));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_b, &syn_ack)?,
            TC_ACT_REDIRECT,
        )?;
        let ack = from_pod_a(&ip(POD_A, POD_B).tcp(40000, 80, TCP_ACK, 2, 10));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &ack)?,
            TC_ACT_REDIRECT,
        )?;
        // B opening its own connection to A is not a reply.
        let from_b = from_pod_b(&ip(POD_B, POD_A).tcp(40001, 80, TCP_SYN, 1, 0));
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_b, &from_b)?, TC_ACT_SHOT)?;
        // Across nodes: A's egress allows UDP to the other node's pods; their answers come
        // back through from_netdev past A's default-deny ingress.
        allow(
            &mut desired,
            POD_A,
            ID_REMOTE,
            53,
            IPPROTO_UDP,
            POLICY_EGRESS,
        );
        dp.apply_policy(&desired)?;
        let query = from_pod_a(&ip(POD_A, REMOTE_POD).udp(5000, 53, b"q"));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &query)?,
            TC_ACT_REDIRECT,
        )?;
        let answer = from_router(&ip(REMOTE_POD, POD_A).udp(53, 5000, b"a"));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &answer)?,
            TC_ACT_REDIRECT,
        )?;
        let unasked = from_router(&ip(REMOTE_POD, POD_A).udp(53, 5001, b"a"));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &unasked)?,
            TC_ACT_SHOT,
        )?;
        dp.expect_counts(&[
            (verdict::LOCAL_REDIRECT, 3),
            (verdict::REMOTE_DIRECT, 1),
            (verdict::DELIVERED_FROM_NETDEV, 1),
            (verdict::DROP_POLICY_EGRESS, 1),
            (verdict::DROP_POLICY_INGRESS, 1),
        ])
    })
}

#[test]
fn a_revision_bump_cuts_an_established_flow_the_new_policy_denies() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let mut desired = policy(0, ENFORCE_INGRESS);
        allow(&mut desired, POD_B, ID_A, 80, IPPROTO_TCP, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        let syn = from_pod_a(&ip(POD_A, POD_B).tcp(40000, 80, TCP_SYN, 1, 0));
        let ack = from_pod_a(&ip(POD_A, POD_B).tcp(40000, 80, TCP_ACK, 2, 10));
        let reply = from_pod_b(&ip(POD_B, POD_A).tcp(80, 40000, TCP_ACK, 10, 2));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &syn)?,
            TC_ACT_REDIRECT,
        )?;
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_b, &reply)?,
            TC_ACT_REDIRECT,
        )?;
        // An unrelated change bumps the revision too: the flow is checked again and passes.
        let before = PolicyTables::open(&dp.root)?.state()?.revision;
        allow(&mut desired, POD_B, ID_A, 81, IPPROTO_TCP, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        ensure!(PolicyTables::open(&dp.root)?.state()?.revision == before + 1);
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_b, &reply)?,
            TC_ACT_REDIRECT,
        )?;
        // The rule goes: the established connection is cut in both directions, the reply
        // checked in the flow's original direction (B's ingress from A).
        let mut denied = policy(0, ENFORCE_INGRESS);
        allow(&mut denied, POD_B, ID_A, 81, IPPROTO_TCP, POLICY_INGRESS);
        dp.apply_policy(&denied)?;
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_b, &reply)?, TC_ACT_SHOT)?;
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &ack)?, TC_ACT_SHOT)?;
        ensure!(dp.policy_drops(POD_B)?.ingress_packets == 2);
        dp.expect_counts(&[
            (verdict::LOCAL_REDIRECT, 3),
            (verdict::DROP_POLICY_INGRESS, 2),
        ])
    })
}

#[test]
fn the_nodes_probes_pass_a_default_deny_that_allows_host_and_others_do_not() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // What the agent writes for every pod that enforces ingress.
        let mut desired = policy(ENFORCE_INGRESS, 0);
        allow(&mut desired, POD_A, identity::HOST, 0, 0, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        let frame = |src| {
            to_pod_frame(
                POD_A_MAC,
                HOST_A_MAC,
                &ip(src, POD_A).tcp(50000, 8080, TCP_SYN, 1, 0),
            )
        };
        expect_action(
            &dp.run(PROG_TO_POD, dp.dev.host_a, &frame(NODE_IP))?,
            TC_ACT_OK,
        )?;
        // The pod's answer goes back to the node through the stack.
        let answer = from_pod_a(&ip(POD_A, NODE_IP).tcp(8080, 50000, TCP_SYN | TCP_ACK, 5, 2));
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &answer)?, TC_ACT_OK)?;
        // Another node's address, and the outside through a NodePort, are not the host.
        expect_action(
            &dp.run(PROG_TO_POD, dp.dev.host_a, &frame(PEER_NODE))?,
            TC_ACT_SHOT,
        )?;
        expect_action(
            &dp.run(PROG_TO_POD, dp.dev.host_a, &frame(OUTSIDE))?,
            TC_ACT_SHOT,
        )?;
        dp.expect_counts(&[(verdict::TO_STACK, 1), (verdict::DROP_POLICY_INGRESS, 2)])
    })
}

#[test]
fn a_clusterip_flow_is_decided_after_the_stacks_dnat_and_its_replies_come_back() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // A may talk to B's port 8080 only; both deny ingress.
        let mut desired = policy(ENFORCE_INGRESS | ENFORCE_EGRESS, ENFORCE_INGRESS);
        allow(&mut desired, POD_A, ID_B, 8080, IPPROTO_TCP, POLICY_EGRESS);
        allow(&mut desired, POD_B, ID_A, 8080, IPPROTO_TCP, POLICY_INGRESS);
        dp.apply_policy(&desired)?;
        // A to the ClusterIP: handed to the stack, nothing decided yet.
        let to_vip = from_pod_a(&ip(POD_A, CLUSTER_IP).tcp(40000, 80, TCP_SYN, 1, 0));
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &to_vip)?, TC_ACT_OK)?;
        // After kube-proxy's DNAT to B: A's egress and B's ingress are checked in to_pod.
        let dnat = ip(POD_A, POD_B).tcp(40000, 8080, TCP_SYN, 1, 0);
        let run = dp.run(
            PROG_TO_POD,
            dp.dev.host_b,
            &to_pod_frame(POD_B_MAC, HOST_B_MAC, &dnat),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        // B's answer goes back through the stack, which un-DNATs it toward A.
        let answer = from_pod_b(&ip(POD_B, POD_A).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2));
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_b, &answer)?, TC_ACT_OK)?;
        let un_dnat = ip(CLUSTER_IP, POD_A).tcp(80, 40000, TCP_SYN | TCP_ACK, 9, 2);
        let run = dp.run(
            PROG_TO_POD,
            dp.dev.host_a,
            &to_pod_frame(POD_A_MAC, HOST_A_MAC, &un_dnat),
        )?;
        expect_action(&run, TC_ACT_OK)?;
        // The same ClusterIP translated to a port A may not reach is dropped after DNAT.
        let to_vip = from_pod_a(&ip(POD_A, CLUSTER_IP).tcp(40001, 80, TCP_SYN, 1, 0));
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &to_vip)?, TC_ACT_OK)?;
        let dnat = ip(POD_A, POD_B).tcp(40001, 9090, TCP_SYN, 1, 0);
        let run = dp.run(
            PROG_TO_POD,
            dp.dev.host_b,
            &to_pod_frame(POD_B_MAC, HOST_B_MAC, &dnat),
        )?;
        expect_action(&run, TC_ACT_SHOT)?;
        dp.expect_counts(&[
            (verdict::TO_STACK, 2),
            (verdict::STACK_FLOW_REPLY, 1),
            (verdict::DROP_POLICY_EGRESS, 1),
        ])
    })
}

#[test]
fn icmp_errors_about_an_allowed_flow_pass_and_others_are_checked() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let mut desired = policy(ENFORCE_INGRESS, 0);
        allow(&mut desired, POD_A, identity::ANY, 0, 0, POLICY_EGRESS);
        dp.apply_policy(&desired)?;
        let query = ip(POD_A, REMOTE_POD).udp(5000, 53, b"q");
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &from_pod_a(&query))?,
            TC_ACT_REDIRECT,
        )?;
        // Port unreachable from the peer, quoting the query (IP header and 8 bytes).
        let quote = |packet: &[u8]| {
            let mut rest = vec![0u8; 4];
            rest.extend_from_slice(&packet[..28]);
            rest
        };
        let error = ip(REMOTE_POD, POD_A).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &quote(&query)));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&error))?,
            TC_ACT_REDIRECT,
        )?;
        // One about a flow A never had is ICMP from the peer, which A's ingress denies.
        let other = ip(POD_A, REMOTE_POD).udp(5001, 53, b"q");
        let error = ip(REMOTE_POD, POD_A).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &quote(&other)));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&error))?,
            TC_ACT_SHOT,
        )?;
        dp.expect_counts(&[
            (verdict::REMOTE_DIRECT, 1),
            (verdict::DELIVERED_FROM_NETDEV, 1),
            (verdict::DROP_POLICY_INGRESS, 1),
        ])
    })
}

#[test]
fn later_fragments_pass_when_their_first_did_and_are_checked_portless_otherwise() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let mut desired = policy(ENFORCE_INGRESS, 0);
        allow(
            &mut desired,
            POD_A,
            ID_REMOTE,
            53,
            IPPROTO_UDP,
            POLICY_INGRESS,
        );
        dp.apply_policy(&desired)?;
        let mut first = ip(REMOTE_POD, POD_A);
        first.frag = MORE_FRAGMENTS;
        let first = first.udp(5000, 53, &[7u8; 32]);
        let mut later = ip(REMOTE_POD, POD_A);
        later.frag = 5;
        let later = later.packet(IPPROTO_UDP, &[7u8; 16]);
        // Before its first: no port to match the rule.
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&later))?,
            TC_ACT_SHOT,
        )?;
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&first))?,
            TC_ACT_REDIRECT,
        )?;
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&later))?,
            TC_ACT_REDIRECT,
        )?;
        dp.expect_counts(&[
            (verdict::DELIVERED_FROM_NETDEV, 2),
            (verdict::DROP_POLICY_INGRESS, 1),
        ])
    })
}

// ---- Services from outside the node (NodePort, externalIP) ----

const NODE_PORT: u16 = 30080;
const EXTERNAL_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

impl Datapath {
    /// One frontend with `backends` (address, port), written as the agent writes it.
    fn serve(
        &self,
        frontend: (Ipv4Addr, u16, u8),
        flags: u32,
        backends: &[(Ipv4Addr, u16)],
    ) -> Result<()> {
        let key = ServiceKey {
            address: frontend.0.octets(),
            port: frontend.1,
            protocol: frontend.2,
            scope: 0,
        };
        let entry = ServiceEntry {
            service_id: 1,
            backend_count: backends.len() as u32,
            affinity_timeout_s: 0,
            flags,
        };
        let backends = backends
            .iter()
            .map(|(address, port)| Backend {
                address: address.octets(),
                port: *port,
                pad: 0,
            })
            .collect();
        let desired: DesiredServices = [(key, (entry, backends))].into();
        ServiceTables::open(&self.root)?.apply(&desired)?;
        Ok(())
    }
}

impl Datapath {
    /// `NODE_ADDRESSES` as the agent writes it (127.0.0.1 comes with any list).
    fn set_node_addresses(&self, addresses: &[Ipv4Addr]) -> Result<()> {
        let mut table = mycni::node_addresses::NodeAddressTable::open(&self.root)?;
        let wanted = if addresses.is_empty() {
            Default::default()
        } else {
            mycni::node_addresses::wanted(addresses)
        };
        table.apply(&wanted)?;
        Ok(())
    }
}

/// Another address of the node, beside `NODE_IP` (added after the Service, say).
const SECOND_NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

fn addresses(frame: &[u8]) -> Result<(Ipv4Addr, u16, Ipv4Addr, u16)> {
    let seen = seen(frame)?;
    Ok((seen.src, seen.sport, seen.dst, seen.dport))
}

#[test]
fn a_node_port_packet_from_outside_reaches_a_local_backend_with_its_source_and_the_reply_leaves_as_the_frontend(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL,
            &[(POD_A, 8080)],
        )?;
        let syn = from_router(&ip(OUTSIDE, NODE_IP).tcp(40000, NODE_PORT, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (OUTSIDE, 40000, POD_A, 8080),
            "not sent to the backend with the client's source: {:?}",
            seen(&run.frame)?
        );
        ensure!(
            seen(&run.frame)?.eth_dst == POD_A_MAC,
            "not addressed to the pod"
        );
        checksums_verify(&run.frame)?;
        // The backend's answer leaves straight out of the uplink, from the frontend.
        let syn_ack = from_pod_a(&ip(POD_A, OUTSIDE).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &syn_ack)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40000),
            "the reply does not come from the frontend: {:?}",
            seen(&run.frame)?
        );
        ensure!(
            run.mark & MARK_FROM_POD == MARK_FROM_POD,
            "to_netdev would masquerade it"
        );
        checksums_verify(&run.frame)?;
        // The flow keeps its backend.
        let ack = from_router(&ip(OUTSIDE, NODE_IP).tcp(40000, NODE_PORT, TCP_ACK, 2, 10));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &ack)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 40000, POD_A, 8080));
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 3)])
    })
}

/// A pod's hostPort (written by the plugin into `HOST_PORTS`, as CNI ADD does) reached from
/// outside: the same TC path as a NodePort with the pod as its one backend.
#[test]
fn a_host_port_packet_from_outside_reaches_its_pod_with_its_source_and_the_reply_leaves_as_the_host_port(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let key = ServiceKey {
            address: NODE_IP.octets(),
            port: 8443,
            protocol: IPPROTO_TCP,
            scope: 0,
        };
        let entry = HostPortEntry {
            backend: Backend {
                address: POD_A.octets(),
                port: 443,
                pad: 0,
            },
            attachment_hash: 7,
        };
        let mut table = mycni::host_ports::HostPortTable::open(&dp.root)?;
        ensure!(matches!(
            table.claim(&key, &entry)?,
            mycni::host_ports::Claim::New
        ));
        let syn = from_router(&ip(OUTSIDE, NODE_IP).tcp(40001, 8443, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (OUTSIDE, 40001, POD_A, 443),
            "not sent to the pod with the client's source: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        let syn_ack = from_pod_a(&ip(POD_A, OUTSIDE).tcp(443, 40001, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &syn_ack)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (NODE_IP, 8443, OUTSIDE, 40001),
            "the reply does not come from the hostPort: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        // Another port of the node is no frontend: the packet goes on to the stack.
        table.remove(&key)?;
        let other = from_router(&ip(OUTSIDE, NODE_IP).tcp(40002, 8443, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &other)?;
        ensure!(
            addresses(&run.frame)? == (OUTSIDE, 40002, NODE_IP, 8443),
            "a removed hostPort still translated: {:?}",
            seen(&run.frame)?
        );
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 2), (verdict::TO_STACK, 1)])
    })
}

#[test]
fn a_node_port_backend_on_another_node_gets_the_nodes_address_and_its_reply_reaches_the_client(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT,
            &[(REMOTE_POD, 8080)],
        )?;
        let syn = from_router(&ip(OUTSIDE, NODE_IP).tcp(40000, NODE_PORT, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (NODE_IP, NAT_PORT, REMOTE_POD, 8080),
            "not sent to the remote backend from the node: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        let syn_ack =
            from_router(&ip(REMOTE_POD, NODE_IP).tcp(8080, NAT_PORT, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn_ack)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40000),
            "the reply does not come from the frontend to the client: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 2)])
    })
}

#[test]
fn an_external_ip_datagram_goes_through_vxlan_to_its_backend_and_back() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (EXTERNAL_SERVICE_IP, 53, IPPROTO_UDP),
            SERVICE_EXTERNAL_IP,
            &[(TUNNEL_POD, 5353)],
        )?;
        let query = from_router(&ip(OUTSIDE, EXTERNAL_SERVICE_IP).udp(5000, 53, b"q"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &query)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (NODE_IP, NAT_PORT, TUNNEL_POD, 5353),
            "{:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        let answer = from_router(&ip(TUNNEL_POD, NODE_IP).udp(5353, NAT_PORT, b"a"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &answer)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (EXTERNAL_SERVICE_IP, 53, OUTSIDE, 5000),
            "{:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 2)])
    })
}

#[test]
fn a_remote_backends_icmp_error_reaches_the_client_from_the_frontend() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_UDP),
            SERVICE_NODE_PORT,
            &[(REMOTE_POD, 5353)],
        )?;
        let query = from_router(&ip(OUTSIDE, NODE_IP).udp(5000, NODE_PORT, b"q"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &query)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NAT_PORT, REMOTE_POD, 5353));
        // The backend has no socket there: port unreachable, quoting what it received.
        let received = &run.frame[14..];
        let mut rest = vec![0; 4];
        rest.extend_from_slice(&received[..28]);
        let unreachable = ip(REMOTE_POD, NODE_IP).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &rest));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&unreachable))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let outer = seen(&run.frame)?;
        ensure!(
            (outer.src, outer.dst) == (NODE_IP, OUTSIDE),
            "the error does not come from the frontend to the client: {outer:?}"
        );
        let inner = &run.frame[14 + 20 + 8..];
        ensure!(
            inner[12..16] == OUTSIDE.octets()
                && inner[20..22] == 5000u16.to_be_bytes()
                && inner[16..20] == NODE_IP.octets()
                && inner[22..24] == NODE_PORT.to_be_bytes(),
            "the quote is not client -> frontend: {inner:02x?}"
        );
        ensure!(
            raw::checksum(0, &inner[..20]) == 0,
            "quoted IP header checksum"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[
            (verdict::EXTERNAL_TRANSLATED, 1),
            (verdict::ICMP_ERROR_TRANSLATED, 1),
        ])
    })
}

#[test]
fn a_frontend_without_a_backend_here_drops_and_counts_and_a_cluster_ip_is_not_served_from_outside(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL,
            &[],
        )?;
        let syn = from_router(&ip(OUTSIDE, NODE_IP).tcp(40000, NODE_PORT, TCP_SYN, 1, 0));
        expect_action(&dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?, TC_ACT_SHOT)?;
        dp.expect_counts(&[(verdict::EXTERNAL_NO_BACKEND, 1)])?;
        let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
        dp.serve((cluster_ip, 80, IPPROTO_TCP), 0, &[(POD_A, 8080)])?;
        let syn = from_router(&ip(OUTSIDE, cluster_ip).tcp(40000, 80, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 40000, cluster_ip, 80));
        dp.expect_counts(&[(verdict::EXTERNAL_NO_BACKEND, 1), (verdict::TO_STACK, 1)])
    })
}

#[test]
fn fragments_and_icmp_errors_of_a_node_port_flow_follow_it() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_UDP),
            SERVICE_NODE_PORT,
            &[(POD_A, 5353)],
        )?;
        let first = Ip {
            frag: MORE_FRAGMENTS,
            id: 0x5151,
            ..ip(OUTSIDE, NODE_IP)
        };
        let run = dp.run(
            PROG_FROM_NETDEV,
            dp.dev.uplink,
            &from_router(&first.udp(5000, NODE_PORT, &[1; 16])),
        )?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 5000, POD_A, 5353));
        let later = Ip { frag: 3, ..first };
        let run = dp.run(
            PROG_FROM_NETDEV,
            dp.dev.uplink,
            &from_router(&later.packet(IPPROTO_UDP, &[2; 16])),
        )?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            run.frame[14 + 16..14 + 20] == POD_A.octets(),
            "the later fragment does not follow its first"
        );
        checksums_verify(&run.frame)?;
        // The backend's large answer, in two fragments, leaves from the frontend.
        let first = Ip {
            frag: MORE_FRAGMENTS,
            id: 0x6161,
            ..ip(POD_A, OUTSIDE)
        };
        let run = dp.run(
            PROG_FROM_POD,
            dp.dev.host_a,
            &from_pod_a(&first.udp(5353, 5000, &[3; 16])),
        )?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 5000));
        let later = Ip { frag: 3, ..first };
        let run = dp.run(
            PROG_FROM_POD,
            dp.dev.host_a,
            &from_pod_a(&later.packet(IPPROTO_UDP, &[4; 16])),
        )?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            run.frame[14 + 12..14 + 16] == NODE_IP.octets(),
            "the reply's later fragment leaks the backend"
        );
        checksums_verify(&run.frame)?;
        // The backend's port unreachable about a datagram quotes the frontend.
        let datagram = ip(OUTSIDE, POD_A).udp(5000, 5353, b"late");
        let mut rest = vec![0; 4];
        rest.extend_from_slice(&datagram[..28]);
        let unreachable = ip(POD_A, OUTSIDE).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &rest));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &from_pod_a(&unreachable))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            seen(&run.frame)?.src == NODE_IP,
            "the error leaks the backend"
        );
        let inner = &run.frame[14 + 20 + 8..];
        ensure!(
            inner[16..20] == NODE_IP.octets() && inner[22..24] == NODE_PORT.to_be_bytes(),
            "the quote still names the backend: {inner:02x?}"
        );
        ensure!(
            raw::checksum(0, &inner[..20]) == 0,
            "quoted IP header checksum"
        );
        checksums_verify(&run.frame)?;
        dp.expect_counts(&[
            (verdict::EXTERNAL_TRANSLATED, 2),
            (verdict::FRAGMENT_TRANSLATED, 2),
            (verdict::ICMP_ERROR_TRANSLATED, 1),
        ])
    })
}

/// A router on the client's path: it reports "fragmentation needed" about packets it
/// cannot forward.
const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// An ICMP "fragmentation needed" (next-hop MTU `mtu`) from `from` to `to`, quoting the
/// first 28 bytes of `packet` (an IPv4 packet as the router got it).
fn fragmentation_needed(from: Ipv4Addr, to: Ipv4Addr, mtu: u16, packet: &[u8]) -> Vec<u8> {
    let mut rest = vec![0, 0];
    rest.extend_from_slice(&mtu.to_be_bytes());
    rest.extend_from_slice(&packet[..28]);
    ip(from, to).packet(IPPROTO_ICMP, &raw::icmp4(3, 4, &rest))
}

/// The quoted packet's (source, source port, destination, destination port) in an ICMP
/// error frame, after checking the quoted header's checksum.
fn quoted(frame: &[u8]) -> Result<(Ipv4Addr, u16, Ipv4Addr, u16)> {
    let inner = &frame[14 + 20 + 8..];
    ensure!(
        raw::checksum(0, &inner[..20]) == 0,
        "quoted IP header checksum: {:02x?}",
        &inner[..20]
    );
    let port = |at: usize| u16::from_be_bytes([inner[at], inner[at + 1]]);
    Ok((
        Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
        port(20),
        Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
        port(22),
    ))
}

#[test]
fn a_routers_fragmentation_needed_about_a_local_backends_reply_reaches_the_backend_quoting_its_packet(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT,
            &[(POD_A, 8080)],
        )?;
        let syn = from_router(&ip(OUTSIDE, NODE_IP).tcp(40000, NODE_PORT, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?,
            TC_ACT_REDIRECT,
        )?;
        let reply = from_pod_a(&ip(POD_A, OUTSIDE).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &reply)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40000));
        // A router on the way to the client cannot forward the reply as it got it.
        let error = fragmentation_needed(CLIENT_ROUTER, NODE_IP, 1280, &run.frame[14..]);
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&error))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let outer = seen(&run.frame)?;
        ensure!(
            (outer.src, outer.dst, outer.eth_dst) == (CLIENT_ROUTER, POD_A, POD_A_MAC),
            "the error does not go into the backend's pod: {outer:?}"
        );
        ensure!(
            quoted(&run.frame)? == (POD_A, 8080, OUTSIDE, 40000),
            "the quote is not the backend's own packet: {:?}",
            quoted(&run.frame)?
        );
        ensure!(
            run.frame[14 + 20 + 4..14 + 20 + 8] == [0, 0, 0x05, 0x00],
            "the next-hop MTU changed"
        );
        checksums_verify(&run.frame)?;
        // The client's own port unreachable, about a reply on ports of no flow: the node's.
        let stray = ip(NODE_IP, OUTSIDE).tcp(NODE_PORT, 40001, TCP_SYN | TCP_ACK, 9, 2);
        let mut rest = vec![0; 4];
        rest.extend_from_slice(&stray[..28]);
        let error = ip(OUTSIDE, NODE_IP).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &rest));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&error))?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            quoted(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40001),
            "an error about no flow was rewritten"
        );
        dp.expect_counts(&[
            (verdict::EXTERNAL_TRANSLATED, 2),
            (verdict::ICMP_ERROR_TRANSLATED, 1),
            (verdict::TO_STACK, 1),
        ])
    })
}

#[test]
fn a_clients_icmp_error_about_a_remote_backends_reply_reaches_its_node_quoting_what_it_sent(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (EXTERNAL_SERVICE_IP, 53, IPPROTO_UDP),
            SERVICE_EXTERNAL_IP,
            &[(REMOTE_POD, 5353)],
        )?;
        let query = from_router(&ip(OUTSIDE, EXTERNAL_SERVICE_IP).udp(5000, 53, b"q"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &query)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NAT_PORT, REMOTE_POD, 5353));
        let answer = from_router(&ip(REMOTE_POD, NODE_IP).udp(5353, NAT_PORT, b"a"));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &answer)?;
        ensure!(addresses(&run.frame)? == (EXTERNAL_SERVICE_IP, 53, OUTSIDE, 5000));
        // The client's socket is gone: port unreachable, quoting the answer it got.
        let mut rest = vec![0; 4];
        rest.extend_from_slice(&run.frame[14..14 + 28]);
        let error = ip(OUTSIDE, EXTERNAL_SERVICE_IP).packet(IPPROTO_ICMP, &raw::icmp4(3, 3, &rest));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&error))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let outer = seen(&run.frame)?;
        ensure!(
            (outer.src, outer.dst) == (OUTSIDE, REMOTE_POD),
            "the error does not go to the backend: {outer:?}"
        );
        ensure!(
            quoted(&run.frame)? == (REMOTE_POD, 5353, NODE_IP, NAT_PORT),
            "the quote is not what the backend's node sent: {:?}",
            quoted(&run.frame)?
        );
        ensure!(
            run.mark & MARK_FROM_POD == MARK_FROM_POD,
            "to_netdev would masquerade it"
        );
        checksums_verify(&run.frame)?;
        // Without the flow's SNAT entry the backend's node would not know the quote: the
        // error is dropped, not sent about the client's address.
        clear::<FlowKey, NatEntry>(&dp.root, MAP_NAT)?;
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&error))?;
        expect_action(&run, TC_ACT_SHOT)?;
        dp.expect_counts(&[
            (verdict::EXTERNAL_TRANSLATED, 2),
            (verdict::ICMP_ERROR_TRANSLATED, 1),
            (verdict::DROP_EXTERNAL_UNTRACKED, 1),
        ])
    })
}

impl Datapath {
    fn external_nat(&self) -> Result<BpfHashMap<MapData, FlowKey, ExternalNatEntry>> {
        let data = MapData::from_pin(self.root.join(MAP_EXTERNAL_NAT))?;
        Ok(BpfHashMap::try_from(Map::LruHashMap(data))?)
    }

    /// Whether `EXTERNAL_NAT` still holds any of `flows`.
    fn holds_any(&self, flows: &[FlowKey]) -> Result<bool> {
        let map = self.external_nat()?;
        Ok(flows.iter().any(|flow| map.get(flow, 0).is_ok()))
    }

    /// `count` one-packet flows written straight into `EXTERNAL_NAT`, as a SYN flood from
    /// spoofed sources leaves them: recorded, never seen again.
    fn flood_with_one_packet_flows(&self, count: u32) -> Result<()> {
        let mut map = self.external_nat()?;
        let entry = ExternalNatEntry {
            address: POD_B.octets(),
            port: 8080,
            direction: mycni_common::service::EXTERNAL_TO_BACKEND,
            flags: 0,
            last_seen_ns: 0,
        };
        for i in 0..count {
            let [_, b, c, d] = i.to_be_bytes();
            let key = FlowKey {
                saddr: [198, 19, b, c],
                daddr: NODE_IP.octets(),
                sport: 1024 + d as u16,
                dport: 9,
                proto: IPPROTO_TCP,
                pad: [0; 3],
            };
            map.insert(key, entry, 0)?;
        }
        Ok(())
    }

    /// Live flows from new clients through `from_netdev` to `frontend_port` (a SYN, then
    /// an ACK that finds the flow, as a busy NodePort sees them) until none of `flows` is
    /// left in `EXTERNAL_NAT`; returns how many it took.
    fn flood_with_live_flows(&self, frontend_port: u16, flows: &[FlowKey]) -> Result<u32> {
        let limit = 4 * mycni_common::MAX_EXTERNAL_NAT;
        for i in 0..limit {
            let [_, b, c, d] = i.to_be_bytes();
            let client = Ipv4Addr::new(198, 18, b, c);
            for flags in [TCP_SYN, TCP_ACK] {
                let packet = ip(client, NODE_IP).tcp(1024 + d as u16, frontend_port, flags, 1, 0);
                let run = self.run(PROG_FROM_NETDEV, self.dev.uplink, &from_router(&packet))?;
                expect_action(&run, TC_ACT_REDIRECT)?;
            }
            if i % 1024 == 1023 && !self.holds_any(flows)? {
                return Ok(i + 1);
            }
        }
        bail!("{limit} live flows did not evict the flows from EXTERNAL_NAT")
    }
}

/// The calling thread kept on the CPU it runs on until dropped.
struct PinnedToOneCpu {
    before: libc::cpu_set_t,
}

impl PinnedToOneCpu {
    fn new() -> Result<PinnedToOneCpu> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: the sets are plain bitmaps of the size given; pid 0 is this thread.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size, &mut before) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let cpu = libc::sched_getcpu();
            ensure!(
                cpu >= 0,
                "sched_getcpu: {}",
                std::io::Error::last_os_error()
            );
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
            }
            Ok(PinnedToOneCpu { before })
        }
    }
}

impl Drop for PinnedToOneCpu {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.before);
        }
    }
}

/// The port of the frontend the live flood goes to (a local backend: no SNAT port).
const FLOOD_PORT: u16 = 30999;

/// The LRU full. A flood of one-packet flows (spoofed SYNs) evicts only its own kind: the
/// kernel's LRU keeps entries that were looked up again. A flood of live flows evicts a
/// live flow's entries. The client's next packet (no SYN) picks a backend again and
/// records the flow anew; a remote backend's reply that arrives first is dropped and
/// counted, not sent to the client with the backend's address; a local backend's goes
/// through masquerading (the node's address, never the pod's).
#[test]
fn a_flow_evicted_from_a_full_external_nat_picks_a_backend_again_and_no_reply_leaks_it(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // The kernel's LRU keeps new entries on the inserting CPU's pending list, which
        // only that CPU's next evictions flush: the programs' runs and the floods share one.
        let _pinned = PinnedToOneCpu::new()?;
        let frontends = |backend: (Ipv4Addr, u16)| -> Result<()> {
            let key = |port| ServiceKey {
                address: NODE_IP.octets(),
                port,
                protocol: IPPROTO_TCP,
                scope: 0,
            };
            let entry = |service_id| ServiceEntry {
                service_id,
                backend_count: 1,
                affinity_timeout_s: 0,
                flags: SERVICE_NODE_PORT,
            };
            let to = |(address, port): (Ipv4Addr, u16)| {
                vec![Backend {
                    address: address.octets(),
                    port,
                    pad: 0,
                }]
            };
            let desired: DesiredServices = [
                (key(NODE_PORT), (entry(1), to(backend))),
                (key(FLOOD_PORT), (entry(2), to((POD_B, 8080)))),
            ]
            .into();
            ServiceTables::open(&dp.root)?.apply(&desired)?;
            Ok(())
        };
        frontends((REMOTE_POD, 8080))?;
        let client =
            |sport, flags| from_router(&ip(OUTSIDE, NODE_IP).tcp(sport, NODE_PORT, flags, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &client(40000, TCP_SYN))?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NAT_PORT, REMOTE_POD, 8080));
        let backend_reply =
            from_router(&ip(REMOTE_POD, NODE_IP).tcp(8080, NAT_PORT, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &backend_reply)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40000));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &client(40000, TCP_ACK))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let forward = FlowKey {
            saddr: OUTSIDE.octets(),
            daddr: NODE_IP.octets(),
            sport: 40000,
            dport: NODE_PORT,
            proto: IPPROTO_TCP,
            pad: [0; 3],
        };
        let reverse = FlowKey {
            saddr: REMOTE_POD.octets(),
            daddr: OUTSIDE.octets(),
            sport: 8080,
            dport: 40000,
            ..forward
        };
        let flood = 4 * mycni_common::MAX_EXTERNAL_NAT;
        dp.flood_with_one_packet_flows(flood)?;
        ensure!(
            dp.holds_any(&[forward])? && dp.holds_any(&[reverse])?,
            "{flood} one-packet flows evicted a live flow"
        );
        let flows = dp.flood_with_live_flows(FLOOD_PORT, &[forward, reverse])?;
        eprintln!("{flood} one-packet flows left the live flow; {flows} live flows evicted it");
        let before = dp.counts()?;
        // The backend's retransmission finds no flow: dropped, never leaked.
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &backend_reply)?;
        expect_action(&run, TC_ACT_SHOT)?;
        // The client's next segment picks the backend again, on the same SNAT port.
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &client(40000, TCP_ACK))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NAT_PORT, REMOTE_POD, 8080));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &backend_reply)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40000));
        dp.expect_counts_since(
            &before,
            &[
                (verdict::EXTERNAL_TRANSLATED, 2),
                (verdict::DROP_EXTERNAL_UNTRACKED, 1),
            ],
        )?;

        // A local backend.
        frontends((POD_A, 8080))?;
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &client(40001, TCP_SYN))?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 40001, POD_A, 8080));
        let pod_reply = from_pod_a(&ip(POD_A, OUTSIDE).tcp(8080, 40001, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &pod_reply)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        let forward = FlowKey {
            sport: 40001,
            ..forward
        };
        let reverse = FlowKey {
            saddr: POD_A.octets(),
            dport: 40001,
            ..reverse
        };
        dp.flood_with_live_flows(FLOOD_PORT, &[forward, reverse])?;
        let before = dp.counts()?;
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &pod_reply)?;
        expect_action(&run, TC_ACT_OK)?;
        let out = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &run.frame)?;
        expect_action(&out, TC_ACT_OK)?;
        ensure!(
            addresses(&out.frame)? == (NODE_IP, NAT_PORT, OUTSIDE, 40001),
            "the untracked reply does not leave masqueraded: {:?}",
            seen(&out.frame)?
        );
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &client(40001, TCP_ACK))?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 40001, POD_A, 8080));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &pod_reply)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, NODE_PORT, OUTSIDE, 40001));
        dp.expect_counts_since(
            &before,
            &[
                (verdict::EXTERNAL_TRANSLATED, 2),
                (verdict::TO_STACK, 1),
                (verdict::SNAT, 1),
            ],
        )
    })
}

/// Forged replies on the outside path. From a pod: the source check runs before anything
/// else, so another pod cannot answer as the backend or as the frontend; a pod answering
/// on a flow's ports with its own address is no backend of it and is not translated. From
/// the wire: a local pod's address never arrives there, so a "reply" of a local backend
/// forged outside is dropped as spoofed; a remote backend's reply is taken only on the
/// exact tuple of a flow (as conntrack takes it), anything else goes to the node's stack.
#[test]
fn forged_replies_on_the_outside_path_are_dropped_or_never_leave_as_the_frontend() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            (NODE_IP, NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT,
            &[(POD_A, 8080)],
        )?;
        let syn = from_router(&ip(OUTSIDE, NODE_IP).tcp(40000, NODE_PORT, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?,
            TC_ACT_REDIRECT,
        )?;
        let flows = dp.external_nat()?.iter().collect::<Result<Vec<_>, _>>()?;
        ensure!(flows.len() == 2, "{flows:?}");
        // Pod B (raw sockets) answers as the backend, then as the frontend.
        for forged in [
            ip(POD_A, OUTSIDE).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2),
            ip(NODE_IP, OUTSIDE).tcp(NODE_PORT, 40000, TCP_SYN | TCP_ACK, 9, 2),
        ] {
            let run = dp.run(PROG_FROM_POD, dp.dev.host_b, &from_pod_b(&forged))?;
            expect_action(&run, TC_ACT_SHOT)?;
        }
        // With its own address on the flow's ports: not the flow's backend.
        let own = from_pod_b(&ip(POD_B, OUTSIDE).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_b, &own)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            addresses(&run.frame)? == (POD_B, 8080, OUTSIDE, 40000),
            "translated as the frontend: {:?}",
            seen(&run.frame)?
        );
        // From the wire, as the local backend: to the client, and into pod B.
        for forged in [
            ip(POD_A, OUTSIDE).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2),
            ip(POD_A, POD_B).tcp(8080, 40000, TCP_SYN | TCP_ACK, 9, 2),
        ] {
            let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &from_router(&forged))?;
            expect_action(&run, TC_ACT_SHOT)?;
        }
        // From the wire, as a remote backend on ports of no flow: the node's stack's.
        let stray = from_router(&ip(REMOTE_POD, NODE_IP).tcp(8080, NAT_PORT, TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &stray)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(addresses(&run.frame)? == (REMOTE_POD, 8080, NODE_IP, NAT_PORT));
        let after = dp.external_nat()?.iter().collect::<Result<Vec<_>, _>>()?;
        ensure!(
            after.len() == 2 && after.iter().all(|entry| flows.contains(entry)),
            "the forgeries changed EXTERNAL_NAT: {after:?}"
        );
        dp.expect_counts(&[
            (verdict::EXTERNAL_TRANSLATED, 1),
            (verdict::DROP_SPOOFED, 4),
            (verdict::TO_STACK, 2),
        ])
    })
}

/// Every verdict is named in some test that reaches it (this file, or services.rs and
/// host_ports.rs for the socket-level ones): a verdict no crafted packet produces is a
/// branch nothing checks.
#[test]
fn every_verdict_is_reached_by_a_test_here() -> Result<()> {
    // The socket-level Services programs cannot run under BPF_PROG_TEST_RUN: their
    // verdicts are reached by tests/tests/services.rs and host_ports.rs on real sockets.
    let sources = [
        include_str!("programs.rs"),
        include_str!("services.rs"),
        include_str!("host_ports.rs"),
    ];
    let missing: Vec<&str> = verdict::NAMES
        .iter()
        .copied()
        .filter(|name| {
            let constant = format!("verdict::{}", name.to_uppercase());
            !sources
                .iter()
                .any(|source| source.contains(constant.as_str()))
        })
        .collect();
    ensure!(missing.is_empty(), "verdicts no test reaches: {missing:?}");
    Ok(())
}

#[test]
fn a_pods_egress_to_its_own_node_is_decided_in_from_pod() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let mut desired = policy(ENFORCE_EGRESS, 0);
        dp.apply_policy(&desired)?;
        // The node's address ends in the stack's input, past every later hook: from_pod
        // decides it.
        let to_node = |dport| from_pod_a(&ip(POD_A, NODE_IP).tcp(40000, dport, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &to_node(10250))?,
            TC_ACT_SHOT,
        )?;
        allow(
            &mut desired,
            POD_A,
            identity::HOST,
            10250,
            IPPROTO_TCP,
            POLICY_EGRESS,
        );
        dp.apply_policy(&desired)?;
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &to_node(10250))?,
            TC_ACT_OK,
        )?;
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &to_node(10251))?,
            TC_ACT_SHOT,
        )?;
        // A ClusterIP is not the node: still handed to the stack undecided.
        let to_service = from_pod_a(&ip(POD_A, CLUSTER_IP).tcp(40001, 80, TCP_SYN, 1, 0));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_a, &to_service)?,
            TC_ACT_OK,
        )?;
        ensure!(dp.policy_drops(POD_A)?.egress_packets == 2);
        Ok(())
    })
}

#[test]
fn a_syn_is_never_the_reply_of_a_flow_recorded_the_other_way() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        // B takes nothing in; its egress is free.
        dp.apply_policy(&policy(0, ENFORCE_INGRESS))?;
        // B "answers" a connection A never opened, from B's port 80 to A's 40000...
        let forged = from_pod_b(&ip(POD_B, POD_A).tcp(80, 40000, TCP_SYN | TCP_ACK, 1, 1));
        expect_action(
            &dp.run(PROG_FROM_POD, dp.dev.host_b, &forged)?,
            TC_ACT_REDIRECT,
        )?;
        // ...and A's SYN on those very ports is a new connection into B: denied.
        let syn = from_pod_a(&ip(POD_A, POD_B).tcp(40000, 80, TCP_SYN, 1, 0));
        expect_action(&dp.run(PROG_FROM_POD, dp.dev.host_a, &syn)?, TC_ACT_SHOT)?;
        ensure!(dp.policy_drops(POD_B)?.ingress_packets == 1);
        Ok(())
    })
}
fn wildcard(port: u16, protocol: u8) -> (Ipv4Addr, u16, u8) {
    (Ipv4Addr::UNSPECIFIED, port, protocol)
}

/// A NodePort is one wildcard frontend: it answers on each address in `NODE_ADDRESSES`
/// (an address added after it included), the reply leaving from the address the client
/// used, and not on an address once it is removed, nor on loopback or 0.0.0.0 from outside.
#[test]
fn a_node_port_answers_from_outside_on_every_node_address_while_it_is_one() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.serve(
            wildcard(NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT,
            &[(POD_A, 8080)],
        )?;
        dp.set_node_addresses(&[NODE_IP])?;
        // Not yet an address of the node: the stack gets it untouched.
        let early =
            from_router(&ip(OUTSIDE, SECOND_NODE_ADDRESS).tcp(39999, NODE_PORT, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &early)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 39999, SECOND_NODE_ADDRESS, NODE_PORT));
        dp.set_node_addresses(&[NODE_IP, SECOND_NODE_ADDRESS])?;
        for (client_port, frontend) in [(40000, NODE_IP), (40001, SECOND_NODE_ADDRESS)] {
            let syn =
                from_router(&ip(OUTSIDE, frontend).tcp(client_port, NODE_PORT, TCP_SYN, 1, 0));
            let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
            expect_action(&run, TC_ACT_REDIRECT)?;
            ensure!(
                addresses(&run.frame)? == (OUTSIDE, client_port, POD_A, 8080),
                "{frontend}: not sent to the backend with the client's source: {:?}",
                seen(&run.frame)?
            );
            checksums_verify(&run.frame)?;
            let syn_ack =
                from_pod_a(&ip(POD_A, OUTSIDE).tcp(8080, client_port, TCP_SYN | TCP_ACK, 9, 2));
            let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &syn_ack)?;
            expect_action(&run, TC_ACT_REDIRECT)?;
            ensure!(
                addresses(&run.frame)? == (frontend, NODE_PORT, OUTSIDE, client_port),
                "the reply does not come from {frontend}: {:?}",
                seen(&run.frame)?
            );
            checksums_verify(&run.frame)?;
        }
        // Removed: a new connection to it is no NodePort's any more.
        dp.set_node_addresses(&[NODE_IP])?;
        let late =
            from_router(&ip(OUTSIDE, SECOND_NODE_ADDRESS).tcp(40002, NODE_PORT, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &late)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            addresses(&run.frame)? == (OUTSIDE, 40002, SECOND_NODE_ADDRESS, NODE_PORT),
            "a removed address still serves the NodePort: {:?}",
            seen(&run.frame)?
        );
        // Loopback is a node address for the node's own sockets, never from outside; and
        // the wildcard key is no destination.
        for destination in [Ipv4Addr::LOCALHOST, Ipv4Addr::UNSPECIFIED] {
            let odd = from_router(&ip(OUTSIDE, destination).tcp(40003, NODE_PORT, TCP_SYN, 1, 0));
            let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &odd)?;
            ensure!(
                addresses(&run.frame)? == (OUTSIDE, 40003, destination, NODE_PORT),
                "{destination} translated: {:?}",
                seen(&run.frame)?
            );
        }
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 4), (verdict::TO_STACK, 4)])
    })
}

/// A hostPort without hostIP (one wildcard key, as the plugin writes it) reached from
/// outside on a node address; an exact Service frontend on the same port wins.
#[test]
fn a_wildcard_host_port_from_outside_answers_on_a_node_address() -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        let key = ServiceKey {
            address: [0; 4],
            port: 8443,
            protocol: IPPROTO_TCP,
            scope: 0,
        };
        let entry = HostPortEntry {
            backend: Backend {
                address: POD_A.octets(),
                port: 443,
                pad: 0,
            },
            attachment_hash: 7,
        };
        let mut table = mycni::host_ports::HostPortTable::open(&dp.root)?;
        ensure!(matches!(
            table.claim(&key, &entry)?,
            mycni::host_ports::Claim::New
        ));
        let syn = from_router(&ip(OUTSIDE, SECOND_NODE_ADDRESS).tcp(40001, 8443, TCP_SYN, 1, 0));
        // Not a node address yet: untouched.
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 40001, SECOND_NODE_ADDRESS, 8443));
        dp.set_node_addresses(&[NODE_IP, SECOND_NODE_ADDRESS])?;
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (OUTSIDE, 40001, POD_A, 443),
            "not sent to the pod with the client's source: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        let syn_ack = from_pod_a(&ip(POD_A, OUTSIDE).tcp(443, 40001, TCP_SYN | TCP_ACK, 9, 2));
        let run = dp.run(PROG_FROM_POD, dp.dev.host_a, &syn_ack)?;
        expect_action(&run, TC_ACT_REDIRECT)?;
        ensure!(
            addresses(&run.frame)? == (SECOND_NODE_ADDRESS, 8443, OUTSIDE, 40001),
            "the reply does not come from the hostPort: {:?}",
            seen(&run.frame)?
        );
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 2), (verdict::TO_STACK, 1)])
    })
}

/// A NodePort whose backend is the node itself (a hostNetwork pod): the packet goes to the
/// stack with the client's source kept and only its destination translated, and the
/// stack's reply leaves `to_netdev` as the frontend; the node's other packets pass as they
/// are.
#[test]
fn a_node_port_backend_that_is_the_node_gets_the_client_through_the_stack_and_replies_as_the_frontend(
) -> Result<()> {
    require_root!();
    with_datapath(|dp| {
        dp.set_node_addresses(&[NODE_IP, SECOND_NODE_ADDRESS])?;
        dp.serve(
            wildcard(NODE_PORT, IPPROTO_TCP),
            SERVICE_NODE_PORT | SERVICE_EXTERNAL_LOCAL,
            &[(NODE_IP, 10250)],
        )?;
        let syn =
            from_router(&ip(OUTSIDE, SECOND_NODE_ADDRESS).tcp(40000, NODE_PORT, TCP_SYN, 1, 0));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &syn)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            addresses(&run.frame)? == (OUTSIDE, 40000, NODE_IP, 10250),
            "not handed to the stack for the node's backend with the client's source: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        // The stack's answer on its way out of the uplink.
        let syn_ack = raw::ethernet(
            ROUTER_MAC,
            UPLINK_MAC,
            ETH_P_IP,
            &ip(NODE_IP, OUTSIDE).tcp(10250, 40000, TCP_SYN | TCP_ACK, 9, 2),
        );
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &syn_ack)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(
            addresses(&run.frame)? == (SECOND_NODE_ADDRESS, NODE_PORT, OUTSIDE, 40000),
            "the reply does not leave as the frontend: {:?}",
            seen(&run.frame)?
        );
        checksums_verify(&run.frame)?;
        // The flow keeps its way in; the node's own connections are not touched.
        let ack =
            from_router(&ip(OUTSIDE, SECOND_NODE_ADDRESS).tcp(40000, NODE_PORT, TCP_ACK, 2, 10));
        let run = dp.run(PROG_FROM_NETDEV, dp.dev.uplink, &ack)?;
        ensure!(addresses(&run.frame)? == (OUTSIDE, 40000, NODE_IP, 10250));
        let own = raw::ethernet(
            ROUTER_MAC,
            UPLINK_MAC,
            ETH_P_IP,
            &ip(NODE_IP, OUTSIDE).tcp(10250, 40001, TCP_SYN | TCP_ACK, 9, 2),
        );
        let run = dp.run(PROG_TO_NETDEV, dp.dev.uplink, &own)?;
        expect_action(&run, TC_ACT_OK)?;
        ensure!(addresses(&run.frame)? == (NODE_IP, 10250, OUTSIDE, 40001));
        dp.expect_counts(&[(verdict::EXTERNAL_TRANSLATED, 3)])
    })
}
