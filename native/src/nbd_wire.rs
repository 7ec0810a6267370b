//! NBD on the wire, transmission phase: magic numbers, command and chunk numbers,
//! and the fixed header layouts (all big-endian), shared by the native client
//! (`nbd_client`) and server. Names follow the NBD protocol document without the
//! NBD_ prefix, as `trustvbd/nbd/protocol.py` does for the handshake.

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668E_33EF;

// Commands (NBD_CMD_*).
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// trustvbd's own (docs/driver-ring.md): a WRITE whose payload is a 16-byte descriptor
/// (ring offset, length) of ciphertext in the ring the client passed in the handshake.
/// Sent only on a connection that agreed NBD_OPT_TRUSTVBD_RING.
pub const CMD_RING_WRITE: u16 = 0x7476;
/// The bytes of a ring WRITE's payload: ring offset and length, u64 big-endian each.
pub const RING_DESCRIPTOR: usize = 16;

/// The protocol's name of a command (`None` for those it does not define here).
pub fn cmd_name(cmd: u16) -> Option<&'static str> {
    Some(match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => return None,
    })
}

// Command flags (NBD_CMD_FLAG_*).
pub const FLAG_FUA: u16 = 1 << 0;
pub const FLAG_NO_HOLE: u16 = 1 << 1;
pub const FLAG_DF: u16 = 1 << 2;
pub const FLAG_REQ_ONE: u16 = 1 << 3;
pub const FLAG_FAST_ZERO: u16 = 1 << 4;

// Transmission flags (NBD_FLAG_*): what the server advertised for the export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Structured replies: the reply flag and chunk types (NBD_REPLY_TYPE_*).
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR_BIT: u16 = 1 << 15;
pub const CHUNK_ERROR: u16 = CHUNK_ERROR_BIT + 1;
pub const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT + 2;

// Errors (NBD_E*) the server refuses requests with.
pub const ERR_EPERM: u32 = 1;
pub const ERR_EINVAL: u32 = 22;
pub const ERR_ENOSPC: u32 = 28;
/// NBD_EIO: what an error chunk with error 0 (not allowed) stands for.
pub const ERR_EIO: u32 = 5;
/// The spec's limit for names and messages (an error chunk's text).
pub const MAX_STRING: usize = 4096;
/// The spec's portable maximum payload (2^25): the most one request carries here.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

pub const REQUEST_SIZE: usize = 28;
pub const SIMPLE_REPLY_SIZE: usize = 16;
pub const CHUNK_HEADER_SIZE: usize = 20;

/// A request header: magic, flags, type, cookie, offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut out = [0u8; REQUEST_SIZE];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.typ.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The header in `bytes` (at least REQUEST_SIZE long), or its bad magic.
    pub fn decode(bytes: &[u8]) -> Result<Self, u32> {
        let magic = be_u32(bytes, 0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: be_u16(bytes, 4),
            typ: be_u16(bytes, 6),
            cookie: be_u64(bytes, 8),
            offset: be_u64(bytes, 16),
            length: be_u32(bytes, 24),
        })
    }
}

/// A simple reply header (after its magic): error, cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_SIZE] {
        let mut out = [0u8; SIMPLE_REPLY_SIZE];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    /// Decodes `bytes` (at least SIMPLE_REPLY_SIZE, magic already checked).
    pub fn decode(bytes: &[u8]) -> Self {
        Self {
            error: be_u32(bytes, 4),
            cookie: be_u64(bytes, 8),
        }
    }
}

/// A structured reply chunk header (after its magic): flags, type, cookie, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_SIZE] {
        let mut out = [0u8; CHUNK_HEADER_SIZE];
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.typ.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..20].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decodes `bytes` (at least CHUNK_HEADER_SIZE, magic already checked).
    pub fn decode(bytes: &[u8]) -> Self {
        Self {
            flags: be_u16(bytes, 4),
            typ: be_u16(bytes, 6),
            cookie: be_u64(bytes, 8),
            length: be_u32(bytes, 16),
        }
    }
}

pub fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

pub fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_the_layout_of_the_spec() {
        let req = RequestHeader {
            flags: FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let bytes = req.encode();
        // The layout of protocol.py's REQUEST (">IHHQQI").
        assert_eq!(&bytes[..8], &[0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1]);
        assert_eq!(RequestHeader::decode(&bytes), Ok(req));
        let mut bad = bytes;
        bad[0] = 0;
        assert_eq!(RequestHeader::decode(&bad), Err(0x0060_9513));
        let simple = SimpleReply {
            error: 5,
            cookie: u64::MAX,
        };
        assert_eq!(SimpleReply::decode(&simple.encode()), simple);
        let chunk = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            typ: CHUNK_ERROR_OFFSET,
            cookie: 3,
            length: 9,
        };
        assert_eq!(ChunkHeader::decode(&chunk.encode()), chunk);
        assert_eq!(be_u32(&chunk.encode(), 0), STRUCTURED_REPLY_MAGIC);
    }
}
