//! VXLAN: only our VNI from a known peer node is decapsulated toward pods.
use crate::maps::PEERS;
use aya_ebpf::bindings::{bpf_tunnel_key, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_skb_get_tunnel_key;
use aya_ebpf::programs::TcContext;
use mycni_common::{verdict, NodeConfig};

/// The drop for a decapsulated packet that did not come from a known peer node with our
/// VNI; `None` when it did.
#[inline(always)]
pub(crate) fn foreign_tunnel_sender(ctx: &TcContext, cfg: &NodeConfig) -> Option<(u32, i32)> {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: the helper writes at most the size given into `key`.
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if got != 0 {
        event!(
            ctx,
            Warn,
            "from_netdev: dropped a packet on the VXLAN device without a tunnel key (error {})",
            got
        );
        return Some((verdict::DROP_TUNNEL_FOREIGN, TC_ACT_SHOT));
    }
    // The helper gives the remote address in host order.
    let sender = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    if key.tunnel_id == cfg.vni && unsafe { PEERS.get(sender) }.is_some() {
        return None;
    }
    event!(
        ctx,
        Warn,
        "from_netdev: dropped VXLAN from {:i} with VNI {}: only VNI {} from a known peer node is accepted",
        sender,
        key.tunnel_id,
        cfg.vni
    );
    Some((verdict::DROP_TUNNEL_FOREIGN, TC_ACT_SHOT))
}
