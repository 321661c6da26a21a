//! Brings up `lo` in an app's own network namespace (`network = "none"`).
//!
//! A new network namespace starts with its loopback interface down, and
//! libcontainer leaves it so: an app could not even reach itself on
//! 127.0.0.1. The shim calls `up_in` between create and start, while the
//! init waits and before the app runs. One rtnetlink request (RTM_NEWLINK,
//! IFF_UP on interface 1, which the kernel reserves for loopback in every
//! namespace), sent from a thread that joined the namespace: setns(2) on a
//! network namespace moves only the calling thread, so the shim's own
//! namespace never changes. Building the request and reading the answer are
//! pure and tested here.

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::fs::File;
use std::io;

/// The kernel's `LOOPBACK_IFINDEX`.
const LOOPBACK_INDEX: i32 = 1;
const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFF_UP: u32 = 1;

/// `nlmsghdr` + `ifinfomsg`: set IFF_UP on interface `index`.
fn link_up_request(index: i32, seq: u32) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0..4].copy_from_slice(&32u32.to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0: to the kernel. ifinfomsg: family AF_UNSPEC, type 0.
    m[20..24].copy_from_slice(&index.to_ne_bytes());
    m[24..28].copy_from_slice(&IFF_UP.to_ne_bytes());
    m[28..32].copy_from_slice(&IFF_UP.to_ne_bytes());
    m
}

/// Reads the kernel's answer to a request with sequence number `seq`: an
/// NLMSG_ERROR message whose error is 0 (an ack) or a negative errno.
fn read_ack(answer: &[u8], seq: u32) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink answer: {what}"));
    if answer.len() < 20 {
        return Err(bad("too short"));
    }
    let u16_at = |i: usize| u16::from_ne_bytes([answer[i], answer[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes([answer[i], answer[i + 1], answer[i + 2], answer[i + 3]]);
    if u16_at(4) != NLMSG_ERROR {
        return Err(bad("not an acknowledgement"));
    }
    if u32_at(8) != seq {
        return Err(bad("for another request"));
    }
    match u32_at(16) as i32 {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e.saturating_neg())),
    }
}

fn set_up_here() -> io::Result<()> {
    let fd =
        socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
    let seq = 1;
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &link_up_request(LOOPBACK_INDEX, seq),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf, MsgFlags::empty())?;
    read_ack(&buf[..n], seq)
}

/// Sets `lo` up in the network namespace of process `pid`.
pub fn up_in(pid: i32) -> io::Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET)?;
            set_up_here()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the loopback thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_sets_iff_up_and_asks_for_an_ack() {
        let m = link_up_request(1, 7);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32, "length");
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWLINK);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7, "seq");
        assert_eq!(m[16], 0, "AF_UNSPEC");
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 1, "index");
        assert_eq!(u32::from_ne_bytes(m[24..28].try_into().unwrap()), IFF_UP, "flags");
        assert_eq!(u32::from_ne_bytes(m[28..32].try_into().unwrap()), IFF_UP, "change mask");
    }

    fn answer(kind: u16, seq: u32, error: i32) -> Vec<u8> {
        let mut a = vec![0u8; 36];
        a[0..4].copy_from_slice(&36u32.to_ne_bytes());
        a[4..6].copy_from_slice(&kind.to_ne_bytes());
        a[8..12].copy_from_slice(&seq.to_ne_bytes());
        a[16..20].copy_from_slice(&error.to_ne_bytes());
        a
    }

    #[test]
    fn acks_errors_and_junk() {
        assert!(read_ack(&answer(NLMSG_ERROR, 3, 0), 3).is_ok());
        let e = read_ack(&answer(NLMSG_ERROR, 3, -1), 3).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(1), "EPERM");
        assert!(read_ack(&answer(NLMSG_ERROR, 3, i32::MIN), 3).is_err());
        assert!(read_ack(&answer(NLMSG_ERROR, 4, 0), 3).is_err(), "another request's");
        assert!(read_ack(&answer(16, 3, 0), 3).is_err(), "not an ack");
        assert!(read_ack(&[0u8; 19], 3).is_err());
    }
}
