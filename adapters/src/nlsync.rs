//! A blocking rtnetlink socket for the wiring path.
//!
//! The kernel handles an rtnetlink request inside the `send` that carries
//! it and queues the answer before `send` returns, so a blocking `recv`
//! right after it never sleeps. Done this way, an ADD's dozen requests
//! cost the kernel's work and nothing else: no hand-off to a connection
//! task and back per request, which on a multi-threaded runtime is a
//! cross-thread wake-up each way (rtnetlink's design) and was a third of
//! coild's wiring time.
//!
//! The messages are rtnetlink's own types (`netlink-packet-route`); only
//! the transport is ours.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::RouteNetlinkMessage;

/// The longest a request may wait for its answer. The kernel answers
/// within the `send`; this only bounds a kernel bug or a full socket.
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// A failed request: the kernel's errno (0 when the failure was ours:
/// I/O on the socket, an answer that does not parse) and a message.
#[derive(Debug)]
pub(crate) struct NlError {
    pub errno: i32,
    pub msg: String,
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl NlError {
    fn io(what: &str, e: io::Error) -> NlError {
        NlError {
            errno: e.raw_os_error().unwrap_or(0),
            msg: format!("{what}: {e}"),
        }
    }
}

type NlResult<T> = Result<T, NlError>;

/// A blocking NETLINK_ROUTE socket of the network namespace its creating
/// thread was in.
#[derive(Debug)]
pub(crate) struct Nl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Nl {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Nl> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: ANSWER_DEADLINE.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel's address; the socket's own port is assigned on the
        // first send.
        // SAFETY: sockaddr_nl is plain data; zeroed is its "any" value.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: kernel is a valid sockaddr_nl of the given length.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Nl {
            fd,
            seq: 0,
            buf: vec![0; 32 * 1024],
        })
    }

    /// Sends `msg` with `flags` (plus REQUEST and ACK) and returns every
    /// message answered before the acknowledgement, or the kernel's error.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> NlResult<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.header.sequence_number = seq;
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        // SAFETY: out is a valid buffer of out.len() bytes.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), out.as_ptr().cast(), out.len(), 0) };
        if sent < 0 {
            return Err(NlError::io("netlink send", io::Error::last_os_error()));
        }
        let mut answers = Vec::new();
        loop {
            // SAFETY: buf is a valid, writable buffer of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NlError::io("netlink receive", e));
            }
            let n = n as usize;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                    .map_err(|e| NlError {
                        errno: 0,
                        msg: format!("netlink answer does not parse: {e}"),
                    })?;
                let len = (m.header.length as usize).max(16);
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    // An answer to an earlier request that timed out.
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(c) => Err(NlError {
                                errno: c.get().abs(),
                                msg: e.to_io().to_string(),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    _ => {}
                }
            }
        }
    }

    /// The link called `name`, if any.
    pub fn get_link(&mut self, name: &str) -> NlResult<Option<LinkMessage>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.errno == libc::ENODEV => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link (fails with EEXIST if its name is taken).
    pub fn add_link(&mut self, msg: LinkMessage) -> NlResult<()> {
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    /// Changes a link's attributes (as `ip link set`).
    pub fn set_link(&mut self, msg: LinkMessage) -> NlResult<()> {
        self.request(RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    /// Deletes the link at `index`.
    pub fn del_link(&mut self, index: u32) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), 0).map(drop)
    }

    /// Adds an address (fails with EEXIST if it is there).
    pub fn add_address(&mut self, msg: AddressMessage) -> NlResult<()> {
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Adds a route; `replace` replaces one to the same destination.
    pub fn add_route(&mut self, msg: RouteMessage, replace: bool) -> NlResult<()> {
        let how = if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.request(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | how)
            .map(drop)
    }
}
