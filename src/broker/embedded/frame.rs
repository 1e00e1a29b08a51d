//! The embedded broker's protocol: length-delimited frames over TCP (the
//! length prefix is tokio-util's `LengthDelimitedCodec`), each a type byte and
//! fields. Only the embedded broker and its client know these frames. Decoding
//! checks every length against the frame; a bad frame is an error, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bumped on any incompatible change; the handshake refuses a mismatch.
/// Version 2: the hello names a node and its secret, deliveries carry the
/// node that published them, and clients ping.
pub const PROTOCOL_VERSION: u16 = 2;
/// A chunk of at most 8 MiB plus its header fits with room to spare.
pub const MAX_FRAME: usize = 17 << 20;
/// Until the hello succeeds a peer is a stranger: its frames stay this small.
pub const HELLO_MAX_FRAME: usize = 4 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → broker, first frame: protocol version, the node the client
    /// speaks for, and that node's secret.
    Hello {
        version: u16,
        node: String,
        secret: String,
    },
    /// Broker → client: the handshake succeeded.
    Welcome {
        version: u16,
    },
    /// Client → broker: store `payload` in `queue`; answered by Confirm or Nack.
    Publish {
        seq: u64,
        queue: String,
        payload: Bytes,
    },
    /// Broker → client: the publish `seq` is on disk.
    Confirm {
        seq: u64,
    },
    /// Broker → client: the publish `seq` was refused.
    Nack {
        seq: u64,
        reason: String,
    },
    /// Client → broker: deliver `queue`'s messages to this connection.
    Subscribe {
        queue: String,
        prefetch: u32,
    },
    /// Broker → client: a message, with the node that published it (as the
    /// broker authenticated it; empty for a message stored before version 2);
    /// settle it with Ack or Reject.
    Deliver {
        tag: u64,
        redelivered: bool,
        from: String,
        payload: Bytes,
    },
    Ack {
        tag: u64,
    },
    /// Refuse for good: the message moves to the dead-letter queue.
    Reject {
        tag: u64,
    },
    /// Give back: the message is delivered again.
    Requeue {
        tag: u64,
    },
    /// Either way: a fatal error; the connection closes after it.
    Error {
        message: String,
    },
    /// Client → broker: nothing to say, but alive (the broker closes
    /// connections that stay silent).
    Ping,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed embedded-broker frame: {0}")]
pub struct FrameError(pub &'static str);

impl Frame {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            Frame::Hello {
                version,
                node,
                secret,
            } => {
                b.put_u8(1);
                b.put_u16(*version);
                put_str(&mut b, node);
                put_str(&mut b, secret);
            }
            Frame::Welcome { version } => {
                b.put_u8(2);
                b.put_u16(*version);
            }
            Frame::Publish {
                seq,
                queue,
                payload,
            } => {
                b.reserve(payload.len() + queue.len() + 16);
                b.put_u8(3);
                b.put_u64(*seq);
                put_str(&mut b, queue);
                b.put_slice(payload);
            }
            Frame::Confirm { seq } => {
                b.put_u8(4);
                b.put_u64(*seq);
            }
            Frame::Nack { seq, reason } => {
                b.put_u8(5);
                b.put_u64(*seq);
                put_str(&mut b, reason);
            }
            Frame::Subscribe { queue, prefetch } => {
                b.put_u8(6);
                put_str(&mut b, queue);
                b.put_u32(*prefetch);
            }
            Frame::Deliver {
                tag,
                redelivered,
                from,
                payload,
            } => {
                b.reserve(payload.len() + from.len() + 16);
                b.put_u8(7);
                b.put_u64(*tag);
                b.put_u8(u8::from(*redelivered));
                put_str(&mut b, from);
                b.put_slice(payload);
            }
            Frame::Ack { tag } => {
                b.put_u8(8);
                b.put_u64(*tag);
            }
            Frame::Reject { tag } => {
                b.put_u8(9);
                b.put_u64(*tag);
            }
            Frame::Error { message } => {
                b.put_u8(10);
                put_str(&mut b, message);
            }
            Frame::Requeue { tag } => {
                b.put_u8(11);
                b.put_u64(*tag);
            }
            Frame::Ping => b.put_u8(12),
        }
        b.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Frame, FrameError> {
        let kind = get_u8(&mut b)?;
        let frame = match kind {
            1 => {
                let version = get_u16(&mut b)?;
                if version != PROTOCOL_VERSION {
                    // Another version's hello: its version is all we read,
                    // so that the refusal can name it.
                    return Ok(Frame::Hello {
                        version,
                        node: String::new(),
                        secret: String::new(),
                    });
                }
                Frame::Hello {
                    version,
                    node: get_str(&mut b)?,
                    secret: get_str(&mut b)?,
                }
            }
            2 => Frame::Welcome {
                version: get_u16(&mut b)?,
            },
            3 => {
                let seq = get_u64(&mut b)?;
                let queue = get_str(&mut b)?;
                return Ok(Frame::Publish {
                    seq,
                    queue,
                    payload: b,
                });
            }
            4 => Frame::Confirm {
                seq: get_u64(&mut b)?,
            },
            5 => Frame::Nack {
                seq: get_u64(&mut b)?,
                reason: get_str(&mut b)?,
            },
            6 => Frame::Subscribe {
                queue: get_str(&mut b)?,
                prefetch: get_u32(&mut b)?,
            },
            7 => {
                let tag = get_u64(&mut b)?;
                let redelivered = get_u8(&mut b)? != 0;
                let from = get_str(&mut b)?;
                return Ok(Frame::Deliver {
                    tag,
                    redelivered,
                    from,
                    payload: b,
                });
            }
            8 => Frame::Ack {
                tag: get_u64(&mut b)?,
            },
            9 => Frame::Reject {
                tag: get_u64(&mut b)?,
            },
            10 => Frame::Error {
                message: get_str(&mut b)?,
            },
            11 => Frame::Requeue {
                tag: get_u64(&mut b)?,
            },
            12 => Frame::Ping,
            _ => return Err(FrameError("unknown frame type")),
        };
        if b.has_remaining() {
            return Err(FrameError("trailing bytes"));
        }
        Ok(frame)
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn get_u8(b: &mut Bytes) -> Result<u8, FrameError> {
    b.try_get_u8().map_err(|_| FrameError("truncated"))
}

fn get_u16(b: &mut Bytes) -> Result<u16, FrameError> {
    b.try_get_u16().map_err(|_| FrameError("truncated"))
}

fn get_u32(b: &mut Bytes) -> Result<u32, FrameError> {
    b.try_get_u32().map_err(|_| FrameError("truncated"))
}

fn get_u64(b: &mut Bytes) -> Result<u64, FrameError> {
    b.try_get_u64().map_err(|_| FrameError("truncated"))
}

fn get_str(b: &mut Bytes) -> Result<String, FrameError> {
    let n = get_u16(b)? as usize;
    if b.remaining() < n {
        return Err(FrameError("string longer than the frame"));
    }
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| FrameError("string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let frames = [
            Frame::Hello {
                version: PROTOCOL_VERSION,
                node: "alpha".into(),
                secret: "t".into(),
            },
            Frame::Welcome { version: 1 },
            Frame::Publish {
                seq: 9,
                queue: "hakobu.node.a".into(),
                payload: Bytes::from_static(b"xyz"),
            },
            Frame::Confirm { seq: 9 },
            Frame::Nack {
                seq: 9,
                reason: "full".into(),
            },
            Frame::Subscribe {
                queue: "q".into(),
                prefetch: 16,
            },
            Frame::Deliver {
                tag: 3,
                redelivered: true,
                from: "alpha".into(),
                payload: Bytes::new(),
            },
            Frame::Ping,
            Frame::Ack { tag: 3 },
            Frame::Reject { tag: 4 },
            Frame::Requeue { tag: 5 },
            Frame::Error {
                message: "bad token".into(),
            },
        ];
        for f in frames {
            assert_eq!(Frame::decode(f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn another_versions_hello_is_read_for_its_version() {
        let mut v1 = BytesMut::new();
        v1.put_u8(1);
        v1.put_u16(1);
        put_str(&mut v1, "token");
        match Frame::decode(v1.freeze()) {
            Ok(Frame::Hello { version: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_lies() {
        assert!(Frame::decode(Bytes::new()).is_err());
        assert!(Frame::decode(Bytes::from_static(&[1, 0, 2, 0xff, 0xff, b'a'])).is_err());
        assert!(Frame::decode(Bytes::from_static(&[4, 0, 0])).is_err());
        assert!(Frame::decode(Bytes::from_static(&[8, 0, 0, 0, 0, 0, 0, 0, 1, 9])).is_err());
        assert!(Frame::decode(Bytes::from_static(&[77])).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode(Bytes::from(data));
        }
    }
}
