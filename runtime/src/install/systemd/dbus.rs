//! The D-Bus wire protocol, as much of it as talking to systemd's PID 1 over its private
//! socket needs, and nothing that talking to a bus daemon would.
//!
//! Why our own: on private connections systemd stamps every message with
//! `Sender=org.freedesktop.systemd1` (`sd_bus_set_sender()` in `bus_on_connection()`,
//! src/core/dbus.c), and zbus (4.x to 6.x) accepts only a unique name (`:x.y`) or
//! `org.freedesktop.DBus` in that header field, so it rejects every reply from PID 1.
//! The private socket is peer to peer: no `Hello` (systemd answers it with
//! `UnknownObject /org/freedesktop/DBus`), no match rules (signals come after the
//! manager's `Subscribe`), no unix-fd passing.
//!
//! What is here: SASL `EXTERNAL` authentication, an encoder and decoder for every D-Bus
//! type except unix fds' out-of-band data, in both byte orders (we send little-endian;
//! systemd sends its native order), method calls matched to their reply or error by
//! serial, and signals that arrive while a call waits, queued when the caller asked for
//! them. I/O is blocking `std` with a deadline per operation; async callers use
//! `spawn_blocking`. A connection whose stream may be out of step (I/O error, timeout in
//! the middle of a message, undecodable data) refuses further use: open a new one.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

/// The D-Bus specification's limit on a whole message.
const MAX_MESSAGE: usize = 128 << 20;
/// Nesting bound (the spec allows 32 array plus 32 struct levels). Variants count too, so
/// a peer cannot make the recursive decoder overflow the stack with nested variants.
const MAX_DEPTH: u32 = 64;
/// Signals kept while waiting for something else. Only signals the caller asked for are
/// kept (systemd's `JobRemoved`), so this is never reached in practice; past it we fail
/// rather than silently drop the one signal someone waits for.
const MAX_QUEUED_SIGNALS: usize = 1024;

/// Errors of the wire layer; `super::SystemdError` adds what was being done and where.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// `connect(2)` on the socket failed.
    #[error("{0}")]
    Connect(#[source] io::Error),
    /// The server answered the SASL exchange with something other than `OK`.
    #[error("server answered {0:?}")]
    AuthRejected(String),
    /// The peer closed the connection (EOF, reset, broken pipe).
    #[error("connection closed by the peer")]
    Closed,
    /// Any other I/O error.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The deadline passed.
    #[error("deadline passed")]
    Timeout,
    /// An `ERROR` message answering our call.
    #[error("{name}: {message}")]
    Remote { name: String, message: String },
    /// Data that is not valid D-Bus, or not what the call's reply must look like.
    #[error("{0}")]
    Protocol(String),
}

type Result<T, E = DbusError> = std::result::Result<T, E>;

fn protocol<T>(msg: impl Into<String>) -> Result<T> {
    Err(DbusError::Protocol(msg.into()))
}

fn io_error(e: io::Error) -> DbusError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => DbusError::Closed,
        // A socket read timeout surfaces as EAGAIN.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => DbusError::Timeout,
        _ => DbusError::Io(e),
    }
}

/// A D-Bus value. Arrays carry their element signature so that an empty array still has a
/// type (and every value its signature), which the encoder needs for variants.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Byte(u8),
    Bool(bool),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    ObjectPath(String),
    Signature(String),
    /// An index into the message's out-of-band fds; we never negotiate fd passing.
    UnixFd(u32),
    Array {
        elem: String,
        items: Vec<Value>,
    },
    Struct(Vec<Value>),
    DictEntry(Box<Value>, Box<Value>),
    Variant(Box<Value>),
}

impl Value {
    /// The value's D-Bus signature (one complete type).
    pub fn signature(&self) -> String {
        let mut s = String::new();
        self.push_signature(&mut s);
        s
    }

    fn push_signature(&self, s: &mut String) {
        match self {
            Value::Byte(_) => s.push('y'),
            Value::Bool(_) => s.push('b'),
            Value::I16(_) => s.push('n'),
            Value::U16(_) => s.push('q'),
            Value::I32(_) => s.push('i'),
            Value::U32(_) => s.push('u'),
            Value::I64(_) => s.push('x'),
            Value::U64(_) => s.push('t'),
            Value::F64(_) => s.push('d'),
            Value::Str(_) => s.push('s'),
            Value::ObjectPath(_) => s.push('o'),
            Value::Signature(_) => s.push('g'),
            Value::UnixFd(_) => s.push('h'),
            Value::Array { elem, .. } => {
                s.push('a');
                s.push_str(elem);
            }
            Value::Struct(fields) => {
                s.push('(');
                fields.iter().for_each(|f| f.push_signature(s));
                s.push(')');
            }
            Value::DictEntry(k, v) => {
                s.push('{');
                k.push_signature(s);
                v.push_signature(s);
                s.push('}');
            }
            Value::Variant(_) => s.push('v'),
        }
    }

    /// The value inside any number of variants.
    pub fn unwrap_variant(&self) -> &Value {
        match self {
            Value::Variant(v) => v.unwrap_variant(),
            v => v,
        }
    }

    /// A string, object path or signature (through variants).
    pub fn as_str(&self) -> Option<&str> {
        match self.unwrap_variant() {
            Value::Str(s) | Value::ObjectPath(s) | Value::Signature(s) => Some(s),
            _ => None,
        }
    }

    /// An unsigned integer of any width (through variants).
    pub fn as_u64(&self) -> Option<u64> {
        match *self.unwrap_variant() {
            Value::Byte(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            _ => None,
        }
    }

    /// An array of bytes (`ay`, through variants).
    pub fn as_bytes(&self) -> Option<Vec<u8>> {
        match self.unwrap_variant() {
            Value::Array { elem, items } if elem == "y" => items
                .iter()
                .map(|v| match v {
                    Value::Byte(b) => Some(*b),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

/// The four message types of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    MethodCall = 1,
    MethodReturn = 2,
    Error = 3,
    Signal = 4,
}

const FIELD_PATH: u8 = 1;
const FIELD_INTERFACE: u8 = 2;
const FIELD_MEMBER: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_DESTINATION: u8 = 6;
const FIELD_SENDER: u8 = 7;
const FIELD_SIGNATURE: u8 = 8;

/// One message, either direction. The body signature is derived from `body`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: MessageType,
    pub flags: u8,
    pub serial: u32,
    pub reply_serial: Option<u32>,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub error_name: Option<String>,
    pub destination: Option<String>,
    /// systemd puts its well-known name here on private connections; informational only.
    pub sender: Option<String>,
    pub body: Vec<Value>,
}

impl Message {
    /// A method call to `destination`.
    pub fn method_call(
        destination: &str,
        path: &str,
        interface: &str,
        member: &str,
        body: Vec<Value>,
    ) -> Self {
        Message {
            kind: MessageType::MethodCall,
            flags: 0,
            serial: 0,
            reply_serial: None,
            path: Some(path.to_owned()),
            interface: Some(interface.to_owned()),
            member: Some(member.to_owned()),
            error_name: None,
            destination: Some(destination.to_owned()),
            sender: None,
            body,
        }
    }

    /// Whether this is the signal `interface.member`.
    pub fn is_signal(&self, interface: &str, member: &str) -> bool {
        self.kind == MessageType::Signal
            && self.interface.as_deref() == Some(interface)
            && self.member.as_deref() == Some(member)
    }

    /// The body's signature.
    pub fn signature(&self) -> String {
        self.body.iter().map(Value::signature).collect()
    }
}

// ------------------------------------------------------------------------------ encoding

struct Encoder {
    buf: Vec<u8>,
    big: bool,
}

impl Encoder {
    fn pad(&mut self, align: usize) {
        let len = self.buf.len().next_multiple_of(align);
        self.buf.resize(len, 0);
    }

    fn fixed<const N: usize>(&mut self, le: [u8; N]) {
        self.pad(N);
        if self.big {
            self.buf.extend(le.iter().rev());
        } else {
            self.buf.extend_from_slice(&le);
        }
    }

    fn u32(&mut self, v: u32) {
        self.fixed(v.to_le_bytes());
    }

    fn string(&mut self, s: &str) -> Result<()> {
        if s.contains('\0') {
            return protocol(format!("string {s:?} contains a NUL byte"));
        }
        let len = u32::try_from(s.len()).or_else(|_| protocol("string too long"))?;
        self.u32(len);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        Ok(())
    }

    fn signature(&mut self, s: &str) -> Result<()> {
        let len = u8::try_from(s.len()).or_else(|_| protocol(format!("signature {s:?} too long")))?;
        self.buf.push(len);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        Ok(())
    }

    fn value(&mut self, v: &Value) -> Result<()> {
        match v {
            Value::Byte(b) => self.buf.push(*b),
            Value::Bool(b) => self.u32(u32::from(*b)),
            Value::I16(n) => self.fixed(n.to_le_bytes()),
            Value::U16(n) => self.fixed(n.to_le_bytes()),
            Value::I32(n) => self.fixed(n.to_le_bytes()),
            Value::U32(n) | Value::UnixFd(n) => self.u32(*n),
            Value::I64(n) => self.fixed(n.to_le_bytes()),
            Value::U64(n) => self.fixed(n.to_le_bytes()),
            Value::F64(n) => self.fixed(n.to_le_bytes()),
            Value::Str(s) | Value::ObjectPath(s) => self.string(s)?,
            Value::Signature(s) => self.signature(s)?,
            Value::Variant(inner) => {
                self.signature(&inner.signature())?;
                self.value(inner)?;
            }
            Value::Array { elem, items } => {
                self.pad(4);
                let len_at = self.buf.len();
                self.u32(0);
                // The padding to the element's alignment is there even for an empty array,
                // and is not counted in the length.
                self.pad(type_align(elem.as_bytes().first().copied().unwrap_or(b'y')));
                let start = self.buf.len();
                for item in items {
                    if item.signature() != *elem {
                        return protocol(format!("array of {elem} holds a {}", item.signature()));
                    }
                    self.value(item)?;
                }
                let len = u32::try_from(self.buf.len() - start).or_else(|_| protocol("array too long"))?;
                let bytes = if self.big {
                    len.to_be_bytes()
                } else {
                    len.to_le_bytes()
                };
                self.buf[len_at..len_at + 4].copy_from_slice(&bytes);
            }
            Value::Struct(fields) => {
                self.pad(8);
                for f in fields {
                    self.value(f)?;
                }
            }
            Value::DictEntry(k, v) => {
                self.pad(8);
                self.value(k)?;
                self.value(v)?;
            }
        }
        Ok(())
    }
}

/// Encodes `msg` in the given byte order (`big_endian = false` is what we send).
pub fn encode(msg: &Message, big_endian: bool) -> Result<Vec<u8>> {
    let mut body = Encoder {
        buf: Vec::new(),
        big: big_endian,
    };
    for v in &msg.body {
        body.value(v)?;
    }
    let mut fields = Vec::new();
    let mut field = |code: u8, v: Value| {
        fields.push(Value::Struct(vec![
            Value::Byte(code),
            Value::Variant(Box::new(v)),
        ]))
    };
    if let Some(p) = &msg.path {
        field(FIELD_PATH, Value::ObjectPath(p.clone()));
    }
    if let Some(s) = &msg.interface {
        field(FIELD_INTERFACE, Value::Str(s.clone()));
    }
    if let Some(s) = &msg.member {
        field(FIELD_MEMBER, Value::Str(s.clone()));
    }
    if let Some(s) = &msg.error_name {
        field(FIELD_ERROR_NAME, Value::Str(s.clone()));
    }
    if let Some(n) = msg.reply_serial {
        field(FIELD_REPLY_SERIAL, Value::U32(n));
    }
    if let Some(s) = &msg.destination {
        field(FIELD_DESTINATION, Value::Str(s.clone()));
    }
    if let Some(s) = &msg.sender {
        field(FIELD_SENDER, Value::Str(s.clone()));
    }
    let sig = msg.signature();
    if !sig.is_empty() {
        field(FIELD_SIGNATURE, Value::Signature(sig));
    }
    let mut out = Encoder {
        buf: Vec::with_capacity(128 + body.buf.len()),
        big: big_endian,
    };
    out.buf
        .extend_from_slice(&[if big_endian { b'B' } else { b'l' }, msg.kind as u8, msg.flags, 1]);
    out.u32(u32::try_from(body.buf.len()).or_else(|_| protocol("body too long"))?);
    out.u32(msg.serial);
    out.value(&Value::Array {
        elem: "(yv)".into(),
        items: fields,
    })?;
    out.pad(8);
    out.buf.extend_from_slice(&body.buf);
    if out.buf.len() > MAX_MESSAGE {
        return protocol("message too large");
    }
    Ok(out.buf)
}

// ------------------------------------------------------------------------------ decoding

fn type_align(code: u8) -> usize {
    match code {
        b'y' | b'g' | b'v' => 1,
        b'n' | b'q' => 2,
        b'x' | b't' | b'd' | b'(' | b'{' => 8,
        _ => 4,
    }
}

/// Advances `i` past one complete type in `sig`, checking that it is well formed.
fn skip_type(sig: &[u8], i: &mut usize, depth: u32) -> Result<()> {
    if depth > MAX_DEPTH {
        return protocol("signature nested too deeply");
    }
    let Some(&c) = sig.get(*i) else {
        return protocol("signature ends inside a type");
    };
    *i += 1;
    match c {
        b'y' | b'b' | b'n' | b'q' | b'i' | b'u' | b'x' | b't' | b'd' | b'h' | b's' | b'o' | b'g' | b'v' => {
            Ok(())
        }
        b'a' => skip_type(sig, i, depth + 1),
        b'(' => {
            if sig.get(*i) == Some(&b')') {
                return protocol("empty struct in signature");
            }
            while sig.get(*i) != Some(&b')') {
                skip_type(sig, i, depth + 1)?;
            }
            *i += 1;
            Ok(())
        }
        b'{' => {
            skip_type(sig, i, depth + 1)?;
            skip_type(sig, i, depth + 1)?;
            if sig.get(*i) != Some(&b'}') {
                return protocol("dict entry must hold exactly two types");
            }
            *i += 1;
            Ok(())
        }
        other => protocol(format!("unknown type code {:?} in signature", other as char)),
    }
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    big: bool,
}

impl<'a> Decoder<'a> {
    /// Positions are relative to `buf`, which must start 8-aligned within the message (the
    /// message itself, or its body) so that alignment is computed correctly.
    fn new(buf: &'a [u8], big: bool) -> Self {
        Decoder { buf, pos: 0, big }
    }

    fn align(&mut self, align: usize) -> Result<()> {
        let to = self.pos.next_multiple_of(align);
        if to > self.buf.len() {
            return protocol("message truncated in padding");
        }
        if self.buf[self.pos..to].iter().any(|&b| b != 0) {
            return protocol("non-zero padding");
        }
        self.pos = to;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => protocol("message truncated"),
        }
    }

    /// `N` bytes aligned to `N`, returned in little-endian order.
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.align(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        if self.big {
            a.reverse();
        }
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn text(&mut self, len: usize) -> Result<String> {
        let bytes = self.take(len + 1)?;
        if bytes[len] != 0 {
            return protocol("string not NUL-terminated");
        }
        String::from_utf8(bytes[..len].to_vec()).or_else(|_| protocol("string is not UTF-8"))
    }

    /// Decodes the complete type starting at `sig[*i]` and advances `i` past it.
    fn value(&mut self, sig: &[u8], i: &mut usize, depth: u32) -> Result<Value> {
        if depth > MAX_DEPTH {
            return protocol("value nested too deeply");
        }
        let Some(&c) = sig.get(*i) else {
            return protocol("signature ends inside a type");
        };
        *i += 1;
        Ok(match c {
            b'y' => Value::Byte(self.take(1)?[0]),
            b'b' => match self.u32()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                n => return protocol(format!("boolean {n}")),
            },
            b'n' => Value::I16(i16::from_le_bytes(self.fixed()?)),
            b'q' => Value::U16(u16::from_le_bytes(self.fixed()?)),
            b'i' => Value::I32(i32::from_le_bytes(self.fixed()?)),
            b'u' => Value::U32(self.u32()?),
            b'h' => Value::UnixFd(self.u32()?),
            b'x' => Value::I64(i64::from_le_bytes(self.fixed()?)),
            b't' => Value::U64(u64::from_le_bytes(self.fixed()?)),
            b'd' => Value::F64(f64::from_le_bytes(self.fixed()?)),
            b's' | b'o' => {
                let len = self.u32()? as usize;
                let s = self.text(len)?;
                if c == b's' {
                    Value::Str(s)
                } else {
                    Value::ObjectPath(s)
                }
            }
            b'g' => {
                let len = self.take(1)?[0] as usize;
                Value::Signature(self.text(len)?)
            }
            b'v' => {
                let len = self.take(1)?[0] as usize;
                let inner_sig = self.text(len)?;
                let mut j = 0;
                let v = self.value(inner_sig.as_bytes(), &mut j, depth + 1)?;
                if j != inner_sig.len() {
                    return protocol(format!(
                        "variant signature {inner_sig:?} is not one complete type"
                    ));
                }
                Value::Variant(Box::new(v))
            }
            b'a' => {
                let elem_start = *i;
                let mut elem_end = elem_start;
                skip_type(sig, &mut elem_end, depth + 1)?;
                let len = self.u32()? as usize;
                self.align(type_align(sig[elem_start]))?;
                let end = match self.pos.checked_add(len) {
                    Some(end) if end <= self.buf.len() => end,
                    _ => return protocol("array longer than the message"),
                };
                let mut items = Vec::new();
                while self.pos < end {
                    let mut j = elem_start;
                    items.push(self.value(sig, &mut j, depth + 1)?);
                }
                if self.pos != end {
                    return protocol("array element runs past the array's length");
                }
                *i = elem_end;
                let elem = String::from_utf8_lossy(&sig[elem_start..elem_end]).into_owned();
                Value::Array { elem, items }
            }
            b'(' => {
                self.align(8)?;
                let mut fields = Vec::new();
                while sig.get(*i) != Some(&b')') {
                    fields.push(self.value(sig, i, depth + 1)?);
                }
                *i += 1;
                if fields.is_empty() {
                    return protocol("empty struct");
                }
                Value::Struct(fields)
            }
            b'{' => {
                self.align(8)?;
                let k = self.value(sig, i, depth + 1)?;
                let v = self.value(sig, i, depth + 1)?;
                if sig.get(*i) != Some(&b'}') {
                    return protocol("dict entry must hold exactly two types");
                }
                *i += 1;
                Value::DictEntry(Box::new(k), Box::new(v))
            }
            other => return protocol(format!("unknown type code {:?}", other as char)),
        })
    }
}

/// The fixed 16-byte header: byte order and the total length of the message.
fn frame_len(header: &[u8; 16]) -> Result<(bool, usize)> {
    let big = match header[0] {
        b'l' => false,
        b'B' => true,
        other => return protocol(format!("bad byte-order mark {other:#04x}")),
    };
    if header[3] != 1 {
        return protocol(format!("unsupported protocol version {}", header[3]));
    }
    let word = |at: usize| {
        let b: [u8; 4] = header[at..at + 4].try_into().expect("4 bytes");
        (if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }) as usize
    };
    let (body_len, fields_len) = (word(4), word(12));
    let total = (16 + fields_len).next_multiple_of(8) + body_len;
    if body_len > MAX_MESSAGE || fields_len > MAX_MESSAGE || total > MAX_MESSAGE {
        return protocol("message larger than the protocol allows");
    }
    Ok((big, total))
}

/// Decodes one complete message.
pub fn decode(buf: &[u8]) -> Result<Message> {
    let header: &[u8; 16] = match buf.get(..16) {
        Some(h) => h.try_into().expect("16 bytes"),
        None => return protocol("message shorter than its fixed header"),
    };
    let (big, total) = frame_len(header)?;
    if buf.len() != total {
        return protocol(format!("message is {} bytes, its header says {total}", buf.len()));
    }
    let kind = match buf[1] {
        1 => MessageType::MethodCall,
        2 => MessageType::MethodReturn,
        3 => MessageType::Error,
        4 => MessageType::Signal,
        other => return protocol(format!("unknown message type {other}")),
    };
    let mut d = Decoder::new(buf, big);
    d.pos = 8;
    let serial = d.u32()?;
    let mut i = 0;
    let fields = d.value(b"a(yv)", &mut i, 0)?;
    let mut msg = Message {
        kind,
        flags: buf[2],
        serial,
        reply_serial: None,
        path: None,
        interface: None,
        member: None,
        error_name: None,
        destination: None,
        sender: None,
        body: Vec::new(),
    };
    let mut signature = String::new();
    let Value::Array { items, .. } = fields else {
        unreachable!("decoded with signature a(yv)")
    };
    for field in items {
        let Value::Struct(parts) = field else {
            unreachable!("decoded with signature (yv)")
        };
        let (Value::Byte(code), value) = (&parts[0], &parts[1]) else {
            unreachable!("decoded with signature (yv)")
        };
        let text = || value.as_str().map(str::to_owned);
        match *code {
            FIELD_PATH => msg.path = text(),
            FIELD_INTERFACE => msg.interface = text(),
            FIELD_MEMBER => msg.member = text(),
            FIELD_ERROR_NAME => msg.error_name = text(),
            FIELD_REPLY_SERIAL => msg.reply_serial = value.as_u64().and_then(|n| u32::try_from(n).ok()),
            FIELD_DESTINATION => msg.destination = text(),
            FIELD_SENDER => msg.sender = text(),
            FIELD_SIGNATURE => signature = text().unwrap_or_default(),
            _ => {} // UNIX_FDS and fields added after the spec we read: ignored, as it says
        }
    }
    d.align(8)?;
    let body = &buf[d.pos..];
    let mut b = Decoder::new(body, big);
    let sig = signature.as_bytes();
    let mut i = 0;
    while i < sig.len() {
        msg.body.push(b.value(sig, &mut i, 0)?);
    }
    if b.pos != body.len() {
        return protocol(format!(
            "{} bytes after a body of signature {signature:?}",
            body.len() - b.pos
        ));
    }
    Ok(msg)
}

/// Reads one whole message off `r`.
pub fn read_frame(r: &mut impl Read) -> io::Result<Result<Vec<u8>>> {
    let mut header = [0u8; 16];
    r.read_exact(&mut header)?;
    let total = match frame_len(&header) {
        Ok((_, total)) => total,
        Err(e) => return Ok(Err(e)),
    };
    let mut buf = vec![0u8; total];
    buf[..16].copy_from_slice(&header);
    r.read_exact(&mut buf[16..])?;
    Ok(Ok(buf))
}

// ------------------------------------------------------------------------------ connection

/// An authenticated connection to a D-Bus peer over a Unix socket.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
    serial: u32,
    /// Signals (interface, member) to keep when they arrive while waiting for a reply.
    wanted: Vec<(String, String)>,
    queued: VecDeque<Message>,
    /// Set once the stream may be out of step; every later operation fails.
    broken: bool,
    server_guid: String,
}

fn set_deadline(sock: &UnixStream, deadline: Instant) -> Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(DbusError::Timeout);
    }
    sock.set_read_timeout(Some(left)).map_err(DbusError::Io)?;
    sock.set_write_timeout(Some(left)).map_err(DbusError::Io)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

impl Connection {
    /// Connects to `path` and authenticates with SASL `EXTERNAL` as our effective uid.
    ///
    /// `AUTH` and `BEGIN` go out in one write, the way sd-bus clients (systemctl) send
    /// them, and the first message only after the server's `OK`. Sending `BEGIN` after the
    /// `OK` with the first call right behind it hangs about one time in twenty against
    /// systemd 252: PID 1 reads `BEGIN\r\n<message>` in one `recvmsg()`, switches to the
    /// running state and leaves the buffered message undispatched until the socket sees
    /// another event (measured; systemd issue 17425, PR 24875).
    ///
    /// systemd checks the peer before it reads anything (`bus_check_peercred()`): it drops
    /// a peer that is not uid 0 (or its own euid) and one whose PID it cannot see from its
    /// PID namespace. That shows up here as [`DbusError::Closed`] during authentication.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Self> {
        let sock = UnixStream::connect(path).map_err(DbusError::Connect)?;
        set_deadline(&sock, deadline)?;
        let mut conn = Connection {
            sock,
            serial: 0,
            wanted: Vec::new(),
            queued: VecDeque::new(),
            broken: false,
            server_guid: String::new(),
        };
        let uid = nix::unistd::geteuid().as_raw();
        let hello = format!("\0AUTH EXTERNAL {}\r\nBEGIN\r\n", hex(&uid.to_string()));
        conn.sock.write_all(hello.as_bytes()).map_err(io_error)?;
        let line = conn.read_auth_line()?;
        match line.strip_prefix("OK ") {
            Some(guid) => conn.server_guid = guid.trim().to_owned(),
            None => return Err(DbusError::AuthRejected(line)),
        }
        Ok(conn)
    }

    /// The server's GUID from its `OK` line.
    pub fn server_guid(&self) -> &str {
        &self.server_guid
    }

    /// Byte by byte: the line is short, and nothing may be read past it (after `BEGIN`
    /// the next bytes are messages).
    fn read_auth_line(&mut self) -> Result<String> {
        let mut line = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            match self.sock.read(&mut byte) {
                Ok(0) => return Err(DbusError::Closed),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e)),
            }
            if line.len() > 512 {
                return protocol("authentication line too long");
            }
        }
        Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
    }

    /// Keeps the signal `interface.member` when it arrives while a call waits for its
    /// reply, for a later [`Connection::wait_signal`]. Other signals are dropped.
    pub fn keep_signals(&mut self, interface: &str, member: &str) {
        self.wanted.push((interface.to_owned(), member.to_owned()));
    }

    fn wanted(&self, m: &Message) -> bool {
        self.wanted.iter().any(|(i, n)| m.is_signal(i, n))
    }

    fn check_usable(&self) -> Result<()> {
        if self.broken {
            return protocol("connection unusable after an earlier error");
        }
        Ok(())
    }

    fn poison<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(DbusError::Io(_) | DbusError::Closed | DbusError::Timeout | DbusError::Protocol(_)) = &r {
            self.broken = true;
        }
        r
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Message> {
        let r = (|| {
            set_deadline(&self.sock, deadline)?;
            let frame = read_frame(&mut self.sock).map_err(io_error)??;
            decode(&frame)
        })();
        self.poison(r)
    }

    fn send(&mut self, msg: &Message, deadline: Instant) -> Result<()> {
        let r = (|| {
            let bytes = encode(msg, false)?;
            set_deadline(&self.sock, deadline)?;
            self.sock.write_all(&bytes).map_err(io_error)
        })();
        self.poison(r)
    }

    /// Calls `interface.member` on `path` at `destination` and returns the reply's body,
    /// or the peer's error as [`DbusError::Remote`].
    pub fn call(
        &mut self,
        destination: &str,
        path: &str,
        interface: &str,
        member: &str,
        args: Vec<Value>,
        deadline: Instant,
    ) -> Result<Vec<Value>> {
        self.check_usable()?;
        self.serial = self.serial.checked_add(1).unwrap_or(1);
        let mut msg = Message::method_call(destination, path, interface, member, args);
        msg.serial = self.serial;
        self.send(&msg, deadline)?;
        loop {
            let m = self.read_message(deadline)?;
            match m.kind {
                MessageType::MethodReturn if m.reply_serial == Some(msg.serial) => return Ok(m.body),
                MessageType::Error if m.reply_serial == Some(msg.serial) => {
                    return Err(DbusError::Remote {
                        name: m.error_name.unwrap_or_default(),
                        message: m
                            .body
                            .first()
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    });
                }
                MessageType::Signal if self.wanted(&m) => {
                    if self.queued.len() >= MAX_QUEUED_SIGNALS {
                        let r = protocol(format!("more than {MAX_QUEUED_SIGNALS} signals queued"));
                        return self.poison(r);
                    }
                    self.queued.push_back(m);
                }
                // Unwanted signals, replies to calls we gave up on, calls from the peer.
                _ => {}
            }
        }
    }

    /// Waits until `deadline` for a signal that `matches`, looking at the queued ones first.
    /// Wanted signals that do not match stay queued; others are dropped.
    pub fn wait_signal(
        &mut self,
        deadline: Instant,
        mut matches: impl FnMut(&Message) -> bool,
    ) -> Result<Message> {
        if let Some(at) = self.queued.iter().position(&mut matches) {
            return Ok(self.queued.remove(at).expect("position is in range"));
        }
        self.check_usable()?;
        loop {
            let m = self.read_message(deadline)?;
            if m.kind != MessageType::Signal {
                continue;
            }
            if matches(&m) {
                return Ok(m);
            }
            if self.wanted(&m) && self.queued.len() < MAX_QUEUED_SIGNALS {
                self.queued.push_back(m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn v(s: &str) -> Value {
        Value::Str(s.into())
    }

    fn variant(x: Value) -> Value {
        Value::Variant(Box::new(x))
    }

    fn signal(serial: u32, member: &str, body: Vec<Value>) -> Message {
        Message {
            kind: MessageType::Signal,
            flags: 0,
            serial,
            reply_serial: None,
            path: Some("/org/freedesktop/systemd1".into()),
            interface: Some("org.freedesktop.systemd1.Manager".into()),
            member: Some(member.into()),
            error_name: None,
            destination: None,
            sender: Some("org.freedesktop.systemd1".into()),
            body,
        }
    }

    /// Every type, nested, including empty arrays and variants holding containers.
    fn every_type() -> Vec<Value> {
        vec![
            Value::Byte(7),
            Value::Bool(true),
            Value::I16(-2),
            Value::U16(65000),
            Value::I32(-70000),
            Value::U32(4_000_000_000),
            Value::I64(-1 << 40),
            Value::U64(1_796_014_304_674_382),
            Value::F64(0.5),
            v("containerd.service"),
            Value::ObjectPath("/org/freedesktop/systemd1/job/77".into()),
            Value::Signature("a{sv}".into()),
            Value::UnixFd(0),
            Value::Array {
                elem: "{sv}".into(),
                items: vec![
                    Value::DictEntry(Box::new(v("ActiveState")), Box::new(variant(v("active")))),
                    Value::DictEntry(
                        Box::new(v("ActiveEnterTimestamp")),
                        Box::new(variant(Value::U64(1_796_014_304_991_854))),
                    ),
                    Value::DictEntry(
                        Box::new(v("Empty")),
                        Box::new(variant(Value::Array {
                            elem: "(sasbttttuii)".into(),
                            items: vec![],
                        })),
                    ),
                ],
            },
            Value::Array {
                elem: "t".into(),
                items: vec![],
            },
            Value::Struct(vec![Value::Byte(1), Value::U64(2), v("x"), Value::Bool(false)]),
            variant(variant(Value::Struct(vec![
                Value::I16(3),
                Value::Array {
                    elem: "ay".into(),
                    items: vec![
                        Value::Array {
                            elem: "y".into(),
                            items: vec![Value::Byte(1), Value::Byte(2), Value::Byte(3)],
                        },
                        Value::Array {
                            elem: "y".into(),
                            items: vec![],
                        },
                    ],
                },
            ]))),
        ]
    }

    #[test]
    fn every_type_round_trips_in_both_byte_orders() {
        let mut m = signal(9, "Test", every_type());
        m.reply_serial = Some(3);
        m.error_name = Some("x.y.Z".into());
        m.destination = Some(":1.2".into());
        for big in [false, true] {
            let bytes = encode(&m, big).unwrap();
            assert_eq!(bytes[0], if big { b'B' } else { b'l' });
            assert_eq!(decode(&bytes).unwrap(), m, "big endian: {big}");
        }
        assert_ne!(encode(&m, false).unwrap(), encode(&m, true).unwrap());
    }

    #[test]
    fn method_call_bytes_match_the_spec_layout() {
        // What we send for Manager.GetUnit("a"), checked byte for byte against a layout
        // written out by hand from the specification.
        let mut m = Message::method_call(
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "GetUnit",
            vec![v("a")],
        );
        m.serial = 1;
        let got = encode(&m, false).unwrap();
        let mut want: Vec<u8> = vec![b'l', 1, 0, 1, 6, 0, 0, 0, 1, 0, 0, 0];
        let mut fields: Vec<u8> = Vec::new();
        let mut field = |code: u8, ty: u8, s: &str| {
            fields.resize(fields.len().next_multiple_of(8), 0);
            fields.extend_from_slice(&[code, 1, ty, 0]);
            if ty == b'g' {
                fields.push(s.len() as u8);
            } else {
                fields.extend_from_slice(&(s.len() as u32).to_le_bytes());
            }
            fields.extend_from_slice(s.as_bytes());
            fields.push(0);
        };
        field(1, b'o', "/org/freedesktop/systemd1");
        field(2, b's', "org.freedesktop.systemd1.Manager");
        field(3, b's', "GetUnit");
        field(6, b's', "org.freedesktop.systemd1");
        field(8, b'g', "s");
        want.extend_from_slice(&(fields.len() as u32).to_le_bytes());
        want.extend_from_slice(&fields);
        want.resize(want.len().next_multiple_of(8), 0);
        want.extend_from_slice(&[1, 0, 0, 0, b'a', 0]);
        assert_eq!(got, want);
    }

    #[test]
    fn padding_before_an_empty_arrays_first_element_is_not_counted() {
        // u32 length 0, then padding to 8 for the (struct) element, then the string.
        let mut e = Encoder {
            buf: Vec::new(),
            big: false,
        };
        e.value(&Value::Array {
            elem: "(ss)".into(),
            items: vec![],
        })
        .unwrap();
        e.value(&v("x")).unwrap();
        assert_eq!(e.buf, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, b'x', 0]);
        let mut d = Decoder::new(&e.buf, false);
        let mut i = 0;
        let sig = b"a(ss)s";
        let a = d.value(sig, &mut i, 0).unwrap();
        assert_eq!(
            a,
            Value::Array {
                elem: "(ss)".into(),
                items: vec![]
            }
        );
        assert_eq!(d.value(sig, &mut i, 0).unwrap(), v("x"));
        assert_eq!(i, sig.len());
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let good = encode(&signal(1, "JobRemoved", every_type()), false).unwrap();
        // Every truncation, and every single-byte corruption, decodes to Ok or Err.
        for len in 0..good.len() {
            assert!(decode(&good[..len]).is_err(), "truncated to {len} bytes");
        }
        for at in 0..good.len() {
            for b in [0u8, 1, 0x7f, 0xff, b'a', b'(', b'v'] {
                let mut bad = good.clone();
                bad[at] = b;
                let _ = decode(&bad);
            }
        }
    }

    #[test]
    fn nesting_is_bounded() {
        // 200 nested variants: the spec forbids it, and recursion must stop before the stack does.
        let mut x = Value::U32(1);
        for _ in 0..200 {
            x = variant(x);
        }
        let bytes = encode(&signal(1, "Deep", vec![x]), false).unwrap();
        match decode(&bytes) {
            Err(DbusError::Protocol(m)) => assert!(m.contains("nested too deeply"), "{m}"),
            other => panic!("{other:?}"),
        }
        let mut i = 0;
        let sig = "a".repeat(100) + "y";
        assert!(skip_type(sig.as_bytes(), &mut i, 0).is_err());
    }

    #[test]
    fn bad_signatures_are_rejected() {
        for sig in ["(", "()", "a", "{s}", "{sss}", "(s", "z"] {
            let mut i = 0;
            assert!(skip_type(sig.as_bytes(), &mut i, 0).is_err(), "{sig}");
        }
        for sig in ["a{sv}", "(sasbttttuii)", "aay", "v"] {
            let mut i = 0;
            skip_type(sig.as_bytes(), &mut i, 0).unwrap();
            assert_eq!(i, sig.len(), "{sig}");
        }
    }

    #[test]
    fn encoder_refuses_what_it_cannot_express() {
        let nul = Message::method_call("d", "/p", "i.f", "M", vec![v("a\0b")]);
        assert!(encode(&nul, false).is_err());
        let mixed = Message::method_call(
            "d",
            "/p",
            "i.f",
            "M",
            vec![Value::Array {
                elem: "s".into(),
                items: vec![Value::U32(1)],
            }],
        );
        assert!(encode(&mixed, false).is_err());
    }

    /// Decodes a recorded `GetAll` reply and checks it survives re-encoding: in systemd's
    /// byte order it gives back the very bytes systemd sent, in the other it round-trips.
    fn recorded_getall(bytes: &[u8]) -> Vec<(String, Value)> {
        let m = decode(bytes).unwrap();
        assert_eq!(m.kind, MessageType::MethodReturn);
        assert_eq!(m.sender.as_deref(), Some("org.freedesktop.systemd1"));
        assert_eq!(m.signature(), "a{sv}");
        assert_eq!(encode(&m, false).unwrap(), bytes);
        assert_eq!(decode(&encode(&m, true).unwrap()).unwrap(), m);
        let Value::Array { items, .. } = &m.body[0] else {
            panic!("{:?}", m.body)
        };
        items
            .iter()
            .map(|e| match e {
                Value::DictEntry(k, v) => (k.as_str().unwrap().to_owned(), v.unwrap_variant().clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn prop<'a>(props: &'a [(String, Value)], name: &str) -> &'a Value {
        props
            .iter()
            .find_map(|(k, v)| (k == name).then_some(v))
            .unwrap_or_else(|| panic!("no {name}"))
    }

    /// Real systemd 252 replies, recorded from the container of
    /// `runtime/tests/systemd_nspawn.rs` with `tests/nspawn/record-getall.py`: `GetAll` of
    /// the Service and Unit interfaces of containerd.service. Between them they hold most
    /// shapes systemd uses: `a(sasbttttuii)`, `a(sbbsi)`, `a(iayu)`, `ay`, `as`, `t`, `b`, ...
    #[test]
    fn decodes_recorded_systemd_replies() {
        let service = recorded_getall(include_bytes!(
            "../../../tests/fixtures/systemd/getall-service-containerd.bin"
        ));
        assert!(service.len() > 100, "{} properties", service.len());
        assert_eq!(prop(&service, "Type"), &v("notify"));
        assert_eq!(prop(&service, "Restart"), &v("always"));
        assert_eq!(prop(&service, "RestartUSec"), &Value::U64(5_000_000));
        assert_eq!(prop(&service, "TimeoutStartUSec"), &Value::U64(90_000_000));
        assert!(matches!(prop(&service, "MainPID"), Value::U32(p) if *p > 0));
        let exec_start = prop(&service, "ExecStart");
        assert_eq!(exec_start.signature(), "a(sasbttttuii)");
        let Value::Array { items: cmds, .. } = exec_start else {
            unreachable!()
        };
        let Value::Struct(cmd) = &cmds[0] else {
            unreachable!()
        };
        assert_eq!(cmd[0], v("/usr/bin/containerd"));

        let unit = recorded_getall(include_bytes!(
            "../../../tests/fixtures/systemd/getall-unit-containerd.bin"
        ));
        assert_eq!(prop(&unit, "Id"), &v("containerd.service"));
        assert_eq!(prop(&unit, "ActiveState"), &v("active"));
        assert_eq!(prop(&unit, "SubState"), &v("running"));
        assert!(prop(&unit, "ActiveEnterTimestamp").as_u64().unwrap() > 1_700_000_000_000_000);
        assert_eq!(prop(&unit, "InvocationID").as_bytes().unwrap().len(), 16);
        assert_eq!(prop(&unit, "Conditions").signature(), "a(sbbsi)");
    }

    #[test]
    fn call_matches_its_reply_by_serial_and_keeps_wanted_signals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut auth = Vec::new();
            while !auth.ends_with(b"BEGIN\r\n") {
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
                auth.push(b[0]);
            }
            s.write_all(b"OK 0123456789abcdef0123456789abcdef\r\n").unwrap();
            let call = decode(&read_frame(&mut s).unwrap().unwrap()).unwrap();
            // Before the reply: a reply to some other serial, an unwanted and a wanted
            // signal, all in big-endian order.
            let mut stray = signal(50, "Whatever", vec![]);
            stray.kind = MessageType::MethodReturn;
            stray.reply_serial = Some(call.serial + 100);
            let job_removed = signal(
                52,
                "JobRemoved",
                vec![
                    Value::U32(7),
                    Value::ObjectPath("/org/freedesktop/systemd1/job/7".into()),
                    v("a.service"),
                    v("done"),
                ],
            );
            let reply = Message {
                kind: MessageType::MethodReturn,
                reply_serial: Some(call.serial),
                path: None,
                interface: None,
                member: None,
                ..signal(53, "", vec![v("pong")])
            };
            for m in [&stray, &signal(51, "UnitNew", vec![]), &job_removed, &reply] {
                s.write_all(&encode(m, true).unwrap()).unwrap();
            }
            (auth, call)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = Connection::connect(&path, deadline).unwrap();
        c.keep_signals("org.freedesktop.systemd1.Manager", "JobRemoved");
        let body = c
            .call(
                "d",
                "/p",
                "i.f",
                "Ping",
                vec![Value::U32(1), Value::Bool(true)],
                deadline,
            )
            .unwrap();
        assert_eq!(body, vec![v("pong")]);
        let m = c
            .wait_signal(deadline, |m| {
                m.is_signal("org.freedesktop.systemd1.Manager", "JobRemoved")
            })
            .unwrap();
        assert_eq!(m.body[3], v("done"));
        assert_eq!(c.server_guid(), "0123456789abcdef0123456789abcdef");
        let (auth, call) = server.join().unwrap();
        let uid = nix::unistd::geteuid().as_raw().to_string();
        assert_eq!(
            auth,
            format!("\0AUTH EXTERNAL {}\r\nBEGIN\r\n", hex(&uid)).into_bytes()
        );
        assert_eq!(call.member.as_deref(), Some("Ping"));
        assert_eq!(call.signature(), "ub");
        // The server is gone: the next call sees the close, and the connection stays unusable.
        assert!(matches!(
            c.call("d", "/p", "i.f", "Ping", vec![], deadline),
            Err(DbusError::Closed)
        ));
        assert!(matches!(
            c.call("d", "/p", "i.f", "Ping", vec![], deadline),
            Err(DbusError::Protocol(_))
        ));
    }
}
