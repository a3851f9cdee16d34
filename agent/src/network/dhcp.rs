//! The DHCP answers of the node network (RFC 2131), pure: a request and the lease table in, the
//! reply out. Only NICs of this agent's VMs get an answer (their MAC has a lease); anything
//! else on the bridge is ignored, so the server never hands out an address it did not reserve.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::{Leases, Subnet};

/// What the server says about itself in every answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub subnet: Subnet,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
}

/// A reply and where it goes: broadcast to clients without an address yet, else unicast.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub message: Message,
    pub to: Ipv4Addr,
}

/// Why a packet gets no answer (logged at debug level).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("not a DHCP request: {0}")]
    Malformed(String),
    #[error("from {0}, which is no NIC of this agent's VMs")]
    Unknown(String),
    #[error("{0:?} needs no answer")]
    NoAnswer(MessageType),
    #[error("the client chose the server {0}")]
    OtherServer(Ipv4Addr),
}

pub fn decode(bytes: &[u8]) -> Result<Message, Ignored> {
    Message::decode(&mut Decoder::new(bytes)).map_err(|e| Ignored::Malformed(e.to_string()))
}

pub fn encode(message: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(300);
    // Encoding a message we built cannot fail (no option is over-long).
    let _ = message.encode(&mut Encoder::new(&mut buf));
    buf
}

/// `52:54:00:12:34:56` from the client hardware address.
pub fn mac_of(m: &Message) -> String {
    let hw = &m.chaddr()[..usize::from(m.hlen()).min(16)];
    hw.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The answer to `req`, with `leases` saying who has which address and `hostname` the name
/// given to the VM of a lease.
pub fn answer(
    server: &Server,
    leases: &Leases,
    hostname: impl Fn(&str) -> String,
    req: &Message,
) -> Result<Reply, Ignored> {
    if req.opcode() != Opcode::BootRequest || req.htype() != HType::Eth || req.hlen() != 6 {
        return Err(Ignored::Malformed("not an Ethernet BOOTREQUEST".into()));
    }
    let kind = req
        .opts()
        .msg_type()
        .ok_or_else(|| Ignored::Malformed("no message type".into()))?;
    let mac = mac_of(req);
    let lease = leases
        .get(&mac)
        .ok_or_else(|| Ignored::Unknown(mac.clone()))?;
    let me = server.subnet.gateway();
    let reply_type = match kind {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(id)) =
                req.opts().get(OptionCode::ServerIdentifier)
                && *id != me
            {
                return Err(Ignored::OtherServer(*id));
            }
            let asked = match req.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ => req.ciaddr(),
            };
            if asked == lease.ip {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        MessageType::Inform => MessageType::Ack,
        other => return Err(Ignored::NoAnswer(other)),
    };
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_giaddr(req.giaddr())
        .set_chaddr(&req.chaddr()[..6]);
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(reply_type));
    opts.insert(DhcpOption::ServerIdentifier(me));
    if reply_type != MessageType::Nak {
        if kind != MessageType::Inform {
            m.set_yiaddr(lease.ip);
            let opts = m.opts_mut();
            opts.insert(DhcpOption::AddressLeaseTime(server.lease_secs));
            opts.insert(DhcpOption::Renewal(server.lease_secs / 2));
            opts.insert(DhcpOption::Rebinding(server.lease_secs / 8 * 7));
        }
        m.set_siaddr(me);
        let opts = m.opts_mut();
        opts.insert(DhcpOption::SubnetMask(server.subnet.mask()));
        opts.insert(DhcpOption::BroadcastAddr(server.subnet.broadcast()));
        opts.insert(DhcpOption::Router(vec![me]));
        if !server.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(server.dns.clone()));
        }
        opts.insert(DhcpOption::Hostname(hostname(&lease.vm)));
    }
    // A client that has its address (a renewal, an INFORM) takes the answer there; one that
    // has none yet cannot be reached by unicast before it configured the address.
    let to = if req.ciaddr().is_unspecified() || reply_type == MessageType::Nak {
        Ipv4Addr::BROADCAST
    } else {
        req.ciaddr()
    };
    Ok(Reply { message: m, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];

    fn setup() -> (Server, Leases) {
        let subnet: Subnet = "10.77.0.0/24".parse().unwrap();
        let mut leases = Leases::default();
        leases.reserve(&subnet, "web", "52:54:00:aa:bb:cc").unwrap();
        let server = Server {
            subnet,
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            lease_secs: 3600,
        };
        (server, leases)
    }

    /// A client's message, through the wire format and back, as the server receives it.
    fn request(kind: MessageType, mac: [u8; 6], extra: &[DhcpOption], ciaddr: Ipv4Addr) -> Message {
        let mut m = Message::new(
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in extra {
            m.opts_mut().insert(o.clone());
        }
        decode(&encode(&m)).unwrap()
    }

    fn ask(kind: MessageType, extra: &[DhcpOption], ciaddr: Ipv4Addr) -> Result<Reply, Ignored> {
        let (server, leases) = setup();
        answer(
            &server,
            &leases,
            |vm| vm.to_string(),
            &request(kind, MAC, extra, ciaddr),
        )
    }

    #[test]
    fn a_discover_gets_the_reserved_address_with_the_gateway_and_name_servers() {
        let r = ask(MessageType::Discover, &[], Ipv4Addr::UNSPECIFIED).unwrap();
        let m = decode(&encode(&r.message)).unwrap();
        assert_eq!(r.to, Ipv4Addr::BROADCAST);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(mac_of(&m), "52:54:00:aa:bb:cc");
        let opt = |c| m.opts().get(c).cloned();
        assert_eq!(
            opt(OptionCode::Router),
            Some(DhcpOption::Router(vec![Ipv4Addr::new(10, 77, 0, 1)]))
        );
        assert_eq!(
            opt(OptionCode::SubnetMask),
            Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            opt(OptionCode::DomainNameServer),
            Some(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                192, 0, 2, 53
            )]))
        );
        assert_eq!(
            opt(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(
            opt(OptionCode::Hostname),
            Some(DhcpOption::Hostname("web".into()))
        );
    }

    #[test]
    fn a_request_is_acked_for_its_own_address_and_naked_otherwise() {
        let mine = DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 2));
        let server = DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 1));
        let r = ask(MessageType::Request, &[mine, server], Ipv4Addr::UNSPECIFIED).unwrap();
        assert_eq!(r.message.opts().msg_type(), Some(MessageType::Ack));
        let stolen = DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 9));
        let r = ask(MessageType::Request, &[stolen], Ipv4Addr::UNSPECIFIED).unwrap();
        assert_eq!(r.message.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(r.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
        // A renewal: unicast to the address the client has.
        let renewing = Ipv4Addr::new(10, 77, 0, 2);
        let r = ask(MessageType::Request, &[], renewing).unwrap();
        assert_eq!(
            (r.message.opts().msg_type(), r.to),
            (Some(MessageType::Ack), renewing)
        );
        let other = DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 200));
        assert_eq!(
            ask(MessageType::Request, &[other], Ipv4Addr::UNSPECIFIED),
            Err(Ignored::OtherServer(Ipv4Addr::new(10, 77, 0, 200)))
        );
    }

    #[test]
    fn strangers_and_garbage_get_nothing() {
        let (server, leases) = setup();
        let stranger = request(
            MessageType::Discover,
            [2, 0, 0, 0, 0, 1],
            &[],
            Ipv4Addr::UNSPECIFIED,
        );
        assert!(matches!(
            answer(&server, &leases, |v| v.into(), &stranger),
            Err(Ignored::Unknown(_))
        ));
        assert!(matches!(decode(b"\x01\x01"), Err(Ignored::Malformed(_))));
        assert_eq!(
            ask(MessageType::Release, &[], Ipv4Addr::UNSPECIFIED),
            Err(Ignored::NoAnswer(MessageType::Release))
        );
    }
}
